import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rasterio.windows import Window  # noqa: E402

from roadxfer.classify import classify_scene  # noqa: E402
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.settings import classify_settings  # noqa: E402

sm = snakemake  # noqa: F821
run_logged(
    sm,
    lambda: classify_scene(
        sm.input.image,
        sm.input.model,
        sm.output.classes,
        out_probability=sm.output.probability,
        out_direction=sm.output.direction,
        settings=classify_settings(sm.params.settings, sm.params.image),
        threads=sm.threads,
        window=Window(*sm.params.window),
    ),
)
