import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.report import write_report  # noqa: E402

sm = snakemake  # noqa: F821
run_logged(
    sm,
    lambda: write_report(
        sm.output.html,
        summary_csv=sm.input.summary,
        scenes_csv=sm.input.scenes,
        retention_csv=sm.input.retention,
        models=dict(zip(sm.params.models, sm.input.models)),
        test_scenes=sm.params.test_scenes,
        retention_scenes=sm.params.retention_scenes,
        config=sm.params.config,
        scene_sheet=sm.params.scene_sheet,
        sample_sizes=sm.params.sample_sizes,
        items={k: sm.output[k] for k in ("targets", "charts", "before_after", "training")},
    ),
)
