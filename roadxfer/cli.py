"""One scene without a scene sheet: the steps a GIS user runs alone, with the workflow's checks.

    python -m roadxfer labels   IMAGE LINES OUTDIR [--buffer 2] [--class-value 1 | --class-field F] [--where SQL]
    python -m roadxfer export   IMAGE LABELDIR OUTDIR [--tile-size 256] [--stride 128] [--keep features] [--label-nodata 255]
                                [--rescale auto|none|percentile|minmax|fixed] [--percentiles 2,98] [--low L] [--high H]
    python -m roadxfer classify IMAGE MODEL OUTDIR [--threshold 0.5] [--tta] [--tile-size N] [--rescale ...]
    python -m roadxfer vectorise CLASSIFIEDDIR [--out centrelines.gpkg] [--min-line-length 5] [--bridge-gaps 10] [--high 0.5] ...
    python -m roadxfer evaluate IMAGE CLASSIFIEDDIR LINES OUT.json [--buffer 2] [--ignore ROW,COL,H,W ...]
    python -m roadxfer share    MODEL OUTDIR [--float32]   (a trained package to share: float16 weights)

Every step takes --bands 3,2,1 (1-based image bands, in order; default every band but
the alpha). Imagery that is not 8-bit is rescaled to 8 bits (default: 2-98 percentiles
per band); classify uses the rescale the model was trained with unless --rescale is given.
MODEL is a roadxfer package folder, its .emd, or the reference tool's model folder, .emd
or .dlpk. Errors are the workflow's: they name the file and say what to do (exit code 2).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from . import PRECISIONS
from .atomic import refuse_overlap
from .config import default, describe, schema_node
from .errors import InputError


def _numbers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers") from exc
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give finite numbers")
    return values


def _bands(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1-based band numbers such as 3,2,1") from exc


def _number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False, multiple: int | None = None):
    """An argparse type: a finite number within bounds (NaN and infinity refused: no option means them)."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from exc
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text}: must be {'above' if low_open else 'at least'} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text}: must be at most {high}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"{text}: must be a multiple of {multiple}")
        return value

    return parse


def _outdir(path: str) -> Path:
    """OUTDIR: a folder (made when missing), never an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(out, "is an existing file, not a folder for the outputs", "give a folder name")
    return out


def _image_kwargs(a: argparse.Namespace) -> dict:
    return {"allowed_band_counts": None, "allowed_dtypes": None, "bands": a.bands}


def _rescale(a: argparse.Namespace) -> dict | None:
    if a.rescale is None:
        return None
    return {"method": a.rescale, "percentiles": a.percentiles, "low": a.low, "high": a.high, "max_clipped": a.max_clipped}


def labels_config(a: argparse.Namespace) -> dict:
    """The ``labels:`` config section the options stand for (the workflow builds its settings from the same)."""
    return {"buffer_radius": a.buffer, "class_field": a.class_field, "class_value": a.class_value, "orientation_bin_size": a.orientation_bin_size}


def tiles_config(a: argparse.Namespace) -> dict:
    """The ``tiles:`` config section the options stand for."""
    return {"tile_size": a.tile_size, "stride": a.stride, "keep": a.keep, "label_nodata": a.label_nodata, "chip_format": a.chip_format}


def classify_config(a: argparse.Namespace) -> dict:
    """The ``classify:`` config section the options stand for."""
    return {"threshold": a.threshold, "tta": a.tta, "tile_size": a.tile_size, "batch_size": a.batch_size, "precision": a.precision, "resample": a.resample}


def _labels(a: argparse.Namespace) -> dict:
    from .labels import rasterize_scene
    from .settings import label_settings

    out = _outdir(a.outdir)
    refuse_overlap({"OUTDIR/label.tif": out / "label.tif", "OUTDIR/orientation.tif": out / "orientation.tif", "OUTDIR/summary.json": out / "summary.json"},
                   {"IMAGE": a.image, "LINES": a.lines})
    settings = label_settings(labels_config(a), classes=None)
    return rasterize_scene(a.image, a.lines, out / "label.tif", out / "orientation.tif", out / "summary.json", settings, layer=a.layer, where=a.where,
                           image_kwargs=_image_kwargs(a))


def _export(a: argparse.Namespace) -> dict:
    from .radiometry import Radiometry
    from .settings import tile_settings
    from .tiles import export_tiles

    labels = Path(a.labeldir)
    refuse_overlap({"OUTDIR": a.outdir}, {"IMAGE": a.image, "LABELDIR/label.tif": labels / "label.tif", "LABELDIR/orientation.tif": labels / "orientation.tif"})
    classes = [{**default("classes")[0], "name": a.class_name}]
    settings = tile_settings(tiles_config(a), classes, default("labels.orientation_bin_size"))
    stats = export_tiles(a.image, labels / "label.tif", labels / "orientation.tif", a.outdir, settings, scene_id=Path(a.image).stem,
                         image_kwargs=_image_kwargs(a), radiometry=Radiometry.from_config(_rescale(a)))
    return {"tiles": stats["NumTiles"], "folder": str(a.outdir)}


def _classify(a: argparse.Namespace) -> dict:
    from .classify import classify_scene
    from .settings import classify_settings, vectorise_settings

    out = _outdir(a.outdir)
    refuse_overlap({f"OUTDIR/{n}": out / n for n in ("classes.tif", "probability.tif", "direction.tif", "centrelines.gpkg")}, {"IMAGE": a.image, "MODEL": a.model})
    settings = classify_settings(classify_config(a), {"bands": a.bands}, device=a.device, rescale=_rescale(a))
    vector = vectorise_settings(None)  # the road graph with the defaults; `vectorise` re-makes it with others
    return classify_scene(a.image, a.model, out / "classes.tif", out_probability=out / "probability.tif", out_centrelines=out / "centrelines.gpkg",
                         out_direction=out / "direction.tif",
                          settings=settings, threads=a.threads, vector=vector)


def vectorise_config(a: argparse.Namespace) -> dict:
    """The ``vectorise:`` config section the options stand for."""
    return {key: getattr(a, key) for key in schema_node("vectorise")["properties"]}


def _vectorise(a: argparse.Namespace) -> dict:
    from .settings import vectorise_settings
    from .vectorise import vectorise_scene

    folder = Path(a.classified)
    out = Path(a.out) if a.out else folder / "centrelines.gpkg"
    probability, direction = folder / "probability.tif", folder / "direction.tif"
    return vectorise_scene(folder / "classes.tif", out, probability=probability if probability.is_file() else None,
                           direction=direction if direction.is_file() else None, settings=vectorise_settings(vectorise_config(a)), scene=folder.name)


def _add_schema_options(p: argparse.ArgumentParser, section: str) -> None:
    """One option per key of a config section, with the schema's type, bounds, default and description."""
    for key, node in schema_node(section)["properties"].items():
        kind = node.get("type")
        flag = "--" + key.replace("_", "-")
        if kind == "boolean":
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=default(f"{section}.{key}"), help=describe(f"{section}.{key}"))
            continue
        low = node.get("minimum", node.get("exclusiveMinimum"))
        parse = _number(int if kind == "integer" else float, low, node.get("maximum"), low_open="exclusiveMinimum" in node)
        p.add_argument(flag, dest=key, type=parse, default=default(f"{section}.{key}"), help=describe(f"{section}.{key}"))


def _window(text: str) -> list[int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: give ROW,COL,HEIGHT,WIDTH")
    return parts


def _evaluate(a: argparse.Namespace) -> dict:
    from .evaluate import EvalSettings, evaluate_scene

    folder = Path(a.classified)
    lines = folder / "centrelines.gpkg"
    refuse_overlap({"OUT": a.out}, {"IMAGE": a.image, "CLASSIFIEDDIR/classes.tif": folder / "classes.tif", "CLASSIFIEDDIR/centrelines.gpkg": lines, "LINES": a.lines})
    if Path(a.out).is_dir():
        raise InputError(a.out, "is a folder, not the metrics JSON file to write", "give a file name such as metrics.json")
    settings = EvalSettings(buffer_radius=a.buffer, road_type_field=a.road_type_field, ignore_windows=a.ignore or ())
    result = evaluate_scene(a.image, folder / "classes.tif", lines if lines.is_file() else None, a.lines, a.out, settings,
                            scene_id=Path(a.image).stem, model=folder.name, layer=a.layer, where=a.where, image_kwargs=_image_kwargs(a))
    return {"rows": result["rows"], "apls": result.get("apls")}


def _share(a: argparse.Namespace) -> dict:
    from .package import load_package, share_package

    out = share_package(a.model, _outdir(a.out), half=not a.float32)
    pkg = load_package(out)
    return {"package": str(out), "weights_sha256": pkg.weights_sha256, "bytes": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())}


def parser() -> argparse.ArgumentParser:
    """The command line; defaults and help of the options that are config keys come from the config schema."""
    ap = argparse.ArgumentParser(prog="python -m roadxfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("labels", help="step 1: burn buffered lines into label and orientation rasters on the image's grid")
    p.add_argument("image", help="the scene (GeoTIFF or any raster GDAL reads)"), p.add_argument("lines", help="the polylines (any vector format OGR reads)")
    p.add_argument("outdir", help="folder for label.tif, orientation.tif and summary.json")
    p.add_argument("--buffer", type=_number(float, 0, low_open=True), default=default("labels.buffer_radius"), help=describe("labels.buffer_radius"))
    p.add_argument("--class-field", default=default("labels.class_field"), help=describe("labels.class_field"))
    p.add_argument("--class-value", type=_number(int, 1, 254), default=default("labels.class_value"), help=describe("labels.class_value", extra=": --class-field is used"))
    p.add_argument("--layer", default=None, help="layer of LINES (default: its only layer)")
    p.add_argument("--where", default=None, help="OGR SQL WHERE clause selecting the lines (default: every line)")
    p.add_argument("--orientation-bin-size", type=int, choices=schema_node("labels.orientation_bin_size")["enum"], default=default("labels.orientation_bin_size"),
                   help=describe("labels.orientation_bin_size"))
    p.set_defaults(run=_labels)

    p = sub.add_parser("export", help="step 2: cut the image and labels into classified tiles (the reference tool's layout)")
    p.add_argument("image", help="the scene the labels were made on"), p.add_argument("labeldir", help="folder written by `labels`")
    p.add_argument("outdir", help="folder for the tiles (new, empty, or a previous export)")
    p.add_argument("--tile-size", type=_number(int, 32, multiple=32), default=default("tiles.tile_size"), help=describe("tiles.tile_size"))
    p.add_argument("--stride", type=_number(int, 1), default=default("tiles.stride"), help=describe("tiles.stride"))
    p.add_argument("--keep", choices=["features", "all"], default=default("tiles.keep"), help="which chips to keep: features (with a labelled pixel) or all (default: \"features\")")
    p.add_argument("--label-nodata", type=int, choices=[255, 0], default=default("tiles.label_nodata"), help=describe("tiles.label_nodata"))
    p.add_argument("--chip-format", choices=schema_node("tiles.chip_format")["enum"], default=default("tiles.chip_format"), help=describe("tiles.chip_format"))
    p.add_argument("--class-name", default=default("classes")[0]["name"], help="name of class 1 in the tiles' model definition (default: \"road\")")
    p.set_defaults(run=_export)

    p = sub.add_parser("classify", help="step 4: classify a whole scene (class, probability and road direction COGs, centrelines)")
    p.add_argument("image", help="the scene to classify"), p.add_argument("model", help="package folder, .emd or .dlpk")
    p.add_argument("outdir", help="folder for classes.tif, probability.tif, direction.tif and centrelines.gpkg")
    p.add_argument("--threshold", type=_number(float, 0, 1), default=default("classify.threshold"), help=describe("classify.threshold"))
    p.add_argument("--tta", action="store_true", default=default("classify.tta"), help=describe("classify.tta"))
    p.add_argument("--tile-size", type=_number(int, 32, multiple=32), default=default("classify.tile_size"), help=describe("classify.tile_size"))
    p.add_argument("--batch-size", type=_number(int, 1), default=default("classify.batch_size"), help=describe("classify.batch_size"))
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    p.add_argument("--precision", default=default("classify.precision"), choices=PRECISIONS, help=describe("classify.precision"))
    p.add_argument("--threads", type=_number(int, 1), default=1, help="CPU threads (default: 1)")
    p.add_argument("--resample", choices=schema_node("classify.resample")["enum"], default=default("classify.resample"), help=describe("classify.resample"))
    p.set_defaults(run=_classify)

    p = sub.add_parser("vectorise", help="step 4b: the road graph (centrelines.gpkg) of a classified scene, from the rasters `classify` wrote")
    p.add_argument("classified", help="folder written by `classify` (classes.tif with its .aux.xml; probability.tif and direction.tif when present)")
    p.add_argument("--out", default=None, help="GeoPackage to write (default: CLASSIFIEDDIR/centrelines.gpkg)")
    _add_schema_options(p, "vectorise")
    p.set_defaults(run=_vectorise)

    p = sub.add_parser("evaluate", help="step 5: pixel metrics and APLS of a classified scene against reference lines")
    p.add_argument("image", help="the classified scene"), p.add_argument("classified", help="folder written by `classify`")
    p.add_argument("lines", help="reference polylines"), p.add_argument("out", help="metrics JSON to write")
    p.add_argument("--buffer", type=_number(float, 0, low_open=True), default=default("labels.buffer_radius"), help="buffer radius of the reference lines, as labels.buffer_radius "
                   f"(default: {default('labels.buffer_radius')})")
    p.add_argument("--road-type-field", default=None, help="field of LINES with the road type, scored per type (default: none: all lines one type)")
    p.add_argument("--layer", default=None, help="layer of LINES (default: its only layer)")
    p.add_argument("--where", default=None, help="OGR SQL WHERE clause selecting the reference lines (default: every line)")
    p.add_argument("--ignore", type=_window, nargs="*", help="windows ROW,COL,HEIGHT,WIDTH left out, e.g. a burned-in logo (default: none)")
    p.set_defaults(run=_evaluate)

    for name, p in sub.choices.items():
        if name == "vectorise":  # reads rasters classification wrote, not the image
            continue
        p.add_argument("--bands", type=_bands, default=default("image.bands"), help="1-based image bands to use, in order, e.g. 3,2,1 (default: every band but the alpha)")
        if name in ("export", "classify"):
            p.add_argument("--rescale", choices=schema_node("image.rescale.method")["enum"], default=default("image.rescale.method") if name == "export" else None,
                           help=describe("image.rescale.method") if name == "export" else "rescale to 8 bits as image.rescale.method (default: the model's own, recorded in its package)")
            p.add_argument("--percentiles", type=_numbers, default=default("image.rescale.percentiles"), help=describe("image.rescale.percentiles"))
            p.add_argument("--low", type=_numbers, default=default("image.rescale.low"), help=describe("image.rescale.low"))
            p.add_argument("--high", type=_numbers, default=default("image.rescale.high"), help=describe("image.rescale.high"))
            p.add_argument("--max-clipped", type=_number(float, 0, 1), default=default("image.rescale.max_clipped"), help=describe("image.rescale.max_clipped"))

    p = sub.add_parser("share", help="copy a trained package as one to share: float16 weights (half the size), checksummed")
    p.add_argument("model", help="roadxfer package folder or .emd"), p.add_argument("out", help="package folder to write")
    p.add_argument("--float32", action="store_true", help="keep float32 weights (default: float16)")
    p.set_defaults(run=_share)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = args.run(args)
    except InputError as exc:
        print(f"roadxfer {args.command}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
