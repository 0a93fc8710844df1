import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.distributed import training_processes  # noqa: E402
from roadxfer.train import train, TrainConfig  # noqa: E402

sm = snakemake  # noqa: F821
run_logged(
    sm,
    lambda: train(
        list(sm.input.tiles),
        sm.output[0],
        TrainConfig.from_dict(sm.params.training),
        classes=sm.params.classes,
        pretrained=sm.input.pretrained[0] if sm.input.pretrained else None,
        workdir=sm.params.workdir,
        threads=sm.threads,
        rehearsal=list(sm.input.rehearsal),
        processes=training_processes(sm.resources.get("gpu", 0)),
    ),
)
