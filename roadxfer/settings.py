"""Settings objects from the configuration: one place for the workflow's scripts and the command line alike.

Every default lives in the config schema (``schemas/config.schema.yaml``); the sections
given here are filled from it (:func:`roadxfer.config.with_defaults`), so a missing key
means the same whoever builds the settings. The settings classes take their field
defaults from the schema too (:func:`roadxfer.config.default`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import with_defaults
from .labels import LabelSettings
from .radiometry import Radiometry
from .tiles import TileSettings

if TYPE_CHECKING:
    from .centrelines import VectorSettings
    from .classify import ClassifySettings


def section(name: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The config section ``name`` as given (possibly partial), with the schema's defaults filled in."""
    return with_defaults({name: dict(given or {})})[name]


def image_kwargs(image_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checks of ``image:`` in the config, as keyword arguments of :func:`roadxfer.raster.image_info`."""
    cfg = section("image", image_cfg)
    bands = cfg["bands"]
    count = len(bands) if bands else int(cfg["band_count"])
    return {"allowed_band_counts": (count,), "allowed_dtypes": tuple(cfg["dtypes"]), "bands": tuple(bands) if bands else None}


def radiometry(image_cfg: Mapping[str, Any] | None) -> Radiometry:
    return Radiometry.from_config(section("image", image_cfg)["rescale"])


def label_settings(labels_cfg: Mapping[str, Any] | None, classes: Sequence[Mapping[str, Any]] | None) -> LabelSettings:
    """``classes``: the values a label may take (None: any value 1-254, as on the command line)."""
    cfg = section("labels", labels_cfg)
    return LabelSettings(
        buffer_radius=float(cfg["buffer_radius"]),
        orientation_bin_size=int(cfg["orientation_bin_size"]),
        class_field=cfg["class_field"],
        class_value=cfg["class_value"],
        class_map=cfg["class_map"],
        known_values=frozenset(int(c["value"]) for c in classes) if classes is not None else None,
    )


def tile_settings(tiles_cfg: Mapping[str, Any] | None, classes: Sequence[Mapping[str, Any]], bin_size: int) -> TileSettings:
    cfg = section("tiles", tiles_cfg)
    return TileSettings(
        tile_size=int(cfg["tile_size"]),
        stride=int(cfg["stride"]),
        keep=cfg["keep"],
        empty_fraction=float(cfg["empty_fraction"]),
        max_nodata_fraction=float(cfg["max_nodata_fraction"]),
        rotations=tuple(cfg["rotations"]),
        chip_format=cfg["chip_format"],
        seed=int(cfg["seed"]),
        classes=tuple(dict(c) for c in classes),
        orientation_bin_size=bin_size,
        label_nodata=int(cfg["label_nodata"]),
        cell_size=cfg["cell_size"],
    )


# classify.* keys that are the workflow's, not the classification's: which models, and the shard jobs.
WORKFLOW_ONLY = ("models", "shard_size")


def classify_settings(classify_cfg: Mapping[str, Any] | None, image_cfg: Mapping[str, Any] | None = None, **extra: Any) -> ClassifySettings:
    """Classification settings; the bands come from ``image.bands`` (the rescale from the model's package
    unless ``extra`` gives one). ``extra``: what is not in the config (device, rescale)."""
    from .classify import ClassifySettings

    cfg = {k: v for k, v in section("classify", classify_cfg).items() if k not in WORKFLOW_ONLY}
    bands = section("image", image_cfg)["bands"]
    return ClassifySettings(**cfg, bands=tuple(bands) if bands else None, **extra)


def vectorise_settings(vectorise_cfg: Mapping[str, Any] | None) -> VectorSettings:
    """The road graph's settings from ``vectorise:`` (missing keys: the schema's defaults)."""
    from .centrelines import VectorSettings
    from .roadmask import MaskSettings

    cfg = section("vectorise", vectorise_cfg)
    return VectorSettings(min_length=float(cfg["min_line_length"]), bridge=float(cfg["bridge_gaps"]), bridge_direction=bool(cfg["bridge_direction"]),
                          bridge_reach=float(cfg["bridge_reach"]), bridge_reach_angle=float(cfg["bridge_reach_angle"]), snap=float(cfg["snap"]),
                          min_probability=float(cfg["min_probability"]),
                          mask=MaskSettings(high=float(cfg["high"]), low=float(cfg["low"]), hole_area=float(cfg["hole_area"]), min_area=float(cfg["min_area"])))
