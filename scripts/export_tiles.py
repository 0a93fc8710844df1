import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.settings import image_kwargs, radiometry, tile_settings  # noqa: E402
from roadxfer.tiles import export_tiles  # noqa: E402

sm = snakemake  # noqa: F821
run_logged(
    sm,
    lambda: export_tiles(
        sm.input.image,
        sm.input.label,
        sm.input.orientation,
        sm.output[0],
        tile_settings(sm.params.tiles, sm.params.classes, sm.params.bin_size),
        scene_id=sm.wildcards.scene,
        image_kwargs=image_kwargs(sm.params.image),
        radiometry=radiometry(sm.params.image),
    ),
)
