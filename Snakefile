# roadxfer: transfer learning for road extraction.
# Settings, includes and the target rule; everything else lives in rules/ and roadxfer/.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/labels.smk"
include: "rules/tiles.smk"
include: "rules/train.smk"


rule all:
    input:
        all_targets(),
    default_target: True
