"""roadxfer: transfer learning for road extraction, as a Snakemake workflow.

The workflow (``Snakefile``) is glue; the logic lives in this package so that it
can be imported, tested and reused outside Snakemake.
"""

__version__ = "0.1.0"

IGNORE_VALUE = 255
"""Label/orientation value for pixels that count neither as road nor background (image nodata)."""

UNLABELLED_VALUE = 254
"""Training label of rehearsal tiles' background when ``training.rehearsal_open`` is set:
background unless the model being trained calls it road (:func:`roadxfer.train.open_background`)."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""training.precision and classify.precision (:func:`roadxfer.train.amp_dtype`); here, free of torch, for the CLI."""
