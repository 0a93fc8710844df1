import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.settings import image_kwargs, label_settings  # noqa: E402
from roadxfer.labels import rasterize_scene  # noqa: E402
from roadxfer.sheet import TRAINING_ROLES  # noqa: E402

sm = snakemake  # noqa: F821
row = sm.params.row
run_logged(
    sm,
    lambda: rasterize_scene(
        sm.input.image,
        sm.input.labels,
        sm.output.label,
        sm.output.orientation,
        sm.output.summary,
        label_settings(sm.params.labels, sm.params.classes),
        layer=row["layer"] or None,
        where=row["filter"] or None,
        training=row["role"] in TRAINING_ROLES,
        image_kwargs=image_kwargs(sm.params.image),
    ),
)
