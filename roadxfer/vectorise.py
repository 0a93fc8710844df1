"""Step 4b: the road graph of a classified scene, traced from its rasters (no model, no torch).

Reads what classification wrote (``classes.tif`` with its attribute table, ``probability.tif``
and ``direction.tif``) and writes ``centrelines.gpkg`` (:func:`roadxfer.centrelines.centrelines_from_raster`).
A step of its own, so the road graph can be re-made with other ``vectorise:`` settings
without running the model again.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import rasterio

from .atomic import atomic_path, refuse_overlap
from .centrelines import VectorSettings, centrelines_from_raster
from .errors import InputError

log = logging.getLogger(__name__)

# classify's probability.tif: uint8 holds P x 250 (255 nodata); float32 holds P.
PROBABILITY_SCALE = {"uint8": 250.0, "float32": 1.0}


def scene_classes(classes_tif: str | Path) -> list[dict[str, Any]]:
    """The classes of a classified raster, from the attribute table classification writes beside it (``.aux.xml``)."""
    aux = Path(f"{classes_tif}.aux.xml")
    if not aux.is_file():
        raise InputError(classes_tif, f"has no attribute table ({aux.name}) naming its classes",
                         "classify the scene with roadxfer (it writes one), or copy it along with the raster")
    try:
        table = ET.parse(aux).getroot().find("PAMRasterBand/GDALRasterAttributeTable")
        names = [f.findtext("Name") for f in table.findall("FieldDefn")]
        rows = [dict(zip(names, (f.text or "" for f in row.findall("F")))) for row in table.findall("Row")]
        classes = [{"value": int(r["Value"]), "name": r["Class_Name"], "color": [int(r["Red"]), int(r["Green"]), int(r["Blue"])]} for r in rows]
    except (ET.ParseError, AttributeError, KeyError, ValueError) as exc:
        raise InputError(aux, f"is not the attribute table classification writes ({exc})", "classify the scene again") from exc
    classes = [c for c in classes if c["value"] != 0]  # background
    if not classes:
        raise InputError(aux, "names no class but the background", "classify the scene again")
    return classes


def vectorise_scene(classes_tif: str | Path, out_gpkg: str | Path, *, probability: str | Path | None = None, direction: str | Path | None = None,
                    settings: VectorSettings | None = None, scene: str | None = None) -> dict[str, Any]:
    """Write the road graph of a classified scene as ``out_gpkg`` (committed atomically); returns a summary."""
    inputs = {"CLASSES": classes_tif, **({"PROBABILITY": probability} if probability else {}), **({"DIRECTION": direction} if direction else {})}
    refuse_overlap({"OUT": out_gpkg}, inputs)
    for name, path in inputs.items():
        if not Path(path).is_file():
            raise InputError(path, "is missing", f"classify the scene first (it writes the {name.lower()} raster)")
    classes = scene_classes(classes_tif)
    scale = None
    if probability:
        with rasterio.open(probability) as src:
            scale = PROBABILITY_SCALE.get(src.dtypes[0])
        if scale is None:
            raise InputError(probability, f"holds {src.dtypes[0]} values; classification writes uint8 or float32", "classify the scene again")
    t0 = time.perf_counter()
    with atomic_path(out_gpkg) as tmp:
        lines = centrelines_from_raster(classes_tif, tmp, classes=classes, probability=probability, probability_scale=scale or 250.0,
                                        direction=direction, settings=settings, scene=scene or str(classes_tif))
    seconds = time.perf_counter() - t0
    log.info("%s: %d centreline(s) in %.1f s -> %s", scene or classes_tif, lines, seconds, out_gpkg)
    return {"centrelines": lines, "seconds": seconds, "out": str(out_gpkg)}
