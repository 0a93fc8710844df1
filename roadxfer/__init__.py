"""roadxfer: transfer learning for road extraction, as a Snakemake workflow.

The workflow (``Snakefile``) is glue; the logic lives in this package so that it
can be imported, tested and reused outside Snakemake.
"""

__version__ = "0.1.0"

IGNORE_VALUE = 255
"""Label/orientation value for pixels that count neither as road nor background (image nodata)."""
