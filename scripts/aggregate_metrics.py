import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.evaluate import aggregate  # noqa: E402
from roadxfer.glue import run_logged  # noqa: E402

sm = snakemake  # noqa: F821
run_logged(sm, lambda: aggregate(list(sm.input), sm.output.scenes, sm.output.summary, out_retention=sm.output.retention, retention_scenes=sm.params.retention))
