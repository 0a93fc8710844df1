"""What every Snakemake script needs: logging to the rule's log file, and settings from config."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .errors import InputError
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
        check_gpu(snakemake)
        main()
    except Exception:
        logging.getLogger("roadxfer").exception("rule %s failed", snakemake.rule)
        raise


def check_gpu(snakemake: Any) -> None:
    """A job that asked for GPUs (``gpu: N``) must see them, or fail saying so before any work.

    Without CUDA torch silently runs on the CPU, many times slower than the job was sized
    for. ``resources.cpu_fallback: true`` in the config turns the failure into a warning.
    """
    wanted = int(getattr(getattr(snakemake, "resources", None), "gpu", 0) or 0)
    if wanted <= 0:
        return
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen >= wanted:
        return
    fallback = bool((getattr(snakemake, "config", None) or {}).get("resources", {}).get("cpu_fallback", False))
    where = f"SLURM job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else "this machine"
    problem = (f"rule {snakemake.rule} asks for {wanted} GPU(s) but {where} has {seen} usable by torch "
               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, torch {torch.__version__}, CUDA build {torch.version.cuda})")
    if fallback and seen == 0:
        logging.getLogger("roadxfer").warning("%s: running on the CPU (resources.cpu_fallback is on)", problem)
        return
    if fallback:
        logging.getLogger("roadxfer").warning("%s: running on %d", problem, seen)
        return
    raise InputError(None, problem, "run on a GPU node (check the profile's partition / gpu_model), set the rule family's gpu to 0 under `resources:` "
                                    "in the config, or set resources.cpu_fallback: true to run on the CPU anyway")


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

    keys = ("batch_size", "tile_size", "overlap", "margin", "tta", "threshold", "probability_dtype", "min_line_length", "bridge_gaps", "resample", "cell_size_tolerance", "centrelines", "direction", "background_io", "precision")
    bands = (image_cfg or {}).get("bands")
    return ClassifySettings(**{k: cfg[k] for k in keys if k in cfg}, bands=tuple(bands) if bands else None)
