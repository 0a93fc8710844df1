import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.demo import write_scene  # noqa: E402
from roadxfer.glue import run_logged  # noqa: E402

p = snakemake.params  # noqa: F821
run_logged(snakemake, lambda: write_scene(p.seed, snakemake.output.image, snakemake.output.labels, size=p.size, kind=p.kind, **p.look))  # noqa: F821
