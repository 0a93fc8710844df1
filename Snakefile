# roadxfer: transfer learning for road extraction.
# Settings, includes and the target rule; everything else lives in rules/ and roadxfer/.

from snakemake.utils import min_version

min_version("9.0")


# The defaults, found wherever snakemake runs; --configfile files are merged over them.
configfile: f"{workflow.basedir}/config/config.yaml"


# Snakemake's own report (snakemake --report report.zip) shows our results beside the
# provenance it records; results/report/report.html is our self-contained report.
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/labels.smk"
include: "rules/tiles.smk"
include: "rules/train.smk"
include: "rules/classify.smk"
include: "rules/vectorise.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        all_targets(),
    default_target: True
