"""What every Snakemake script needs: logging to the rule's log file, and settings from config."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .labels import LabelSettings
from .radiometry import Radiometry
from .tiles import TileSettings


def run_logged(snakemake: Any, main: Callable[[], object]) -> None:
    """Run ``main`` with logging sent to the rule's log (and stderr); errors end up in the log."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        # Appended, with a header per try: a retried or requeued job keeps the log of the try that failed.
        handlers.append(logging.FileHandler(snakemake.log[0], mode="a"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    job = os.environ.get("SLURM_JOB_ID")
    logging.getLogger("roadxfer").info("==== rule %s, try %s%s ====", snakemake.rule, getattr(snakemake, "attempt", 1),
                                       f", SLURM job {job} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')})" if job else "")
    try:
        main()
    except Exception:
        logging.getLogger("roadxfer").exception("rule %s failed", snakemake.rule)
        raise


def image_kwargs(image_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The checks of ``image:`` in the config, as keyword arguments of :func:`roadxfer.raster.image_info`."""
    bands = image_cfg.get("bands")
    count = len(bands) if bands else int(image_cfg.get("band_count", 3))
    return {"allowed_band_counts": (count,), "allowed_dtypes": tuple(image_cfg.get("dtypes", ["uint8"])), "bands": tuple(bands) if bands else None}


def radiometry(image_cfg: Mapping[str, Any]) -> Radiometry:
    return Radiometry.from_config(image_cfg.get("rescale"))


def label_settings(labels_cfg: Mapping[str, Any], classes: list[Mapping[str, Any]]) -> LabelSettings:
    return LabelSettings(
        buffer_radius=float(labels_cfg.get("buffer_radius", 2.0)),
        orientation_bin_size=int(labels_cfg.get("orientation_bin_size", 10)),
        class_field=labels_cfg.get("class_field", "Classvalue"),
        class_value=labels_cfg.get("class_value"),
        class_map=labels_cfg.get("class_map"),
        known_values=frozenset(int(c["value"]) for c in classes),
    )


def tile_settings(tiles_cfg: Mapping[str, Any], classes: list[Mapping[str, Any]], bin_size: int) -> TileSettings:
    return TileSettings(
        tile_size=int(tiles_cfg.get("tile_size", 256)),
        stride=int(tiles_cfg.get("stride", 128)),
        keep=tiles_cfg.get("keep", "features"),
        empty_fraction=float(tiles_cfg.get("empty_fraction", 0.0)),
        max_nodata_fraction=float(tiles_cfg.get("max_nodata_fraction", 0.5)),
        rotations=tuple(tiles_cfg.get("rotations", ())),
        chip_format=tiles_cfg.get("chip_format", "tif"),
        seed=int(tiles_cfg.get("seed", 0)),
        classes=tuple(dict(c) for c in classes),
        orientation_bin_size=bin_size,
        label_nodata=int(tiles_cfg.get("label_nodata", 255)),
        cell_size=tiles_cfg.get("cell_size"),
    )


def classify_settings(cfg: Mapping[str, Any], image_cfg: Mapping[str, Any] | None = None) -> Any:
    """Classification settings; the bands come from ``image.bands`` (the rescale from the model's package)."""
    from .classify import ClassifySettings

    keys = ("batch_size", "tile_size", "overlap", "margin", "tta", "threshold", "probability_dtype", "min_line_length", "bridge_gaps", "resample", "cell_size_tolerance", "centrelines")
    bands = (image_cfg or {}).get("bands")
    return ClassifySettings(**{k: cfg[k] for k in keys if k in cfg}, bands=tuple(bands) if bands else None)
