import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.settings import vectorise_settings  # noqa: E402
from roadxfer.vectorise import vectorise_scene  # noqa: E402

sm = snakemake  # noqa: F821
run_logged(
    sm,
    lambda: vectorise_scene(
        sm.input.classes,
        sm.output[0],
        probability=sm.input.probability,
        direction=sm.input.direction,
        settings=vectorise_settings(sm.params.settings),
        scene=sm.wildcards.scene,
    ),
)
