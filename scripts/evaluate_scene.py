import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.evaluate import EvalSettings, evaluate_scene  # noqa: E402
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.settings import image_kwargs  # noqa: E402

sm = snakemake  # noqa: F821
row = sm.params.row
run_logged(
    sm,
    lambda: evaluate_scene(
        sm.input.image,
        sm.input.classes,
        sm.input.centrelines,
        sm.input.labels,
        sm.output[0],
        EvalSettings(**sm.params.settings),
        scene_id=sm.wildcards.scene,
        model=sm.wildcards.model,
        layer=row["layer"] or None,
        where=row["filter"] or None,  # the lines the scene's labels were made from
        image_kwargs=image_kwargs(sm.params.image),
        direction=sm.input.direction,
    ),
)
