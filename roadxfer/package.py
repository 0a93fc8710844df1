"""Model packages: a self-describing folder (optionally also zipped as ``.dlpk``).

::

    <name>/<name>.pth                 weights (state dict)
    <name>/<name>.emd                 model definition, modelled on the reference tool's .emd
    <name>/metrics.csv                per-epoch metrics
    <name>/ModelCharacteristics/loss_graph.png

The ``.emd`` carries what classification needs (architecture, backbone, tile size,
bands, classes, orientation bins, normalisation, cell size) and our provenance
(parent weights' sha256, training data digest, training config, code version, metrics).
A model of the reference architecture also gets ``<name>/arcgis/<name>/`` and
``<name>/arcgis/<name>.dlpk`` in the reference tool's layout.

:func:`load_package` also reads the reference tool's packages (a folder, its ``.emd`` or
a ``.dlpk``; see :mod:`roadxfer.reference`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from . import __version__, reference
from .atomic import atomic_path, refuse_overlap
from .errors import InputError
from .package_info import find_emd, naming_archive, read_emd, sha256_file  # noqa: F401  (sha256_file: imported from here too)
from .model import ModelSpec, build_model, raw_pixel_scaling, read_state_dict
from .radiometry import Radiometry
from .styles import complete_classes

log = logging.getLogger(__name__)



@dataclass
class Package:
    path: Path
    emd: dict[str, Any]
    model: nn.Module
    weights_sha256: str
    reference_emd: dict[str, Any] | None = field(default=None)  # the fields read from a reference package

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def classes(self) -> list[dict[str, Any]]:
        return self.emd["Classes"]

    @property
    def tile_size(self) -> int:
        return int(self.emd["ImageHeight"])

    @property
    def radiometry(self) -> Radiometry:
        """The rescale the model was trained with (8-bit imagery used as is for packages that do not say)."""
        rec = self.emd.get("roadxfer", {}).get("radiometry")
        return Radiometry.from_config(rec["settings"]) if rec else Radiometry()

    @property
    def source_bands(self) -> tuple[int, ...] | None:
        """1-based bands of the training imagery, when recorded."""
        rec = self.emd.get("roadxfer", {}).get("radiometry") or {}
        return tuple(rec["source_bands"]) if rec.get("source_bands") else None

    @property
    def mean(self) -> list[float]:
        return self.emd["Normalization"]["mean"]

    @property
    def std(self) -> list[float]:
        return self.emd["Normalization"]["std"]

    @property
    def bin_size(self) -> int:
        return int(self.emd["RoadOrientation"]["orient_bin_size"])


def build_emd(name: str, spec: ModelSpec, *, tile_size: int, classes: list[dict[str, Any]], bin_size: int, mean: list[float], std: list[float],
              cell_size: float | None, provenance: dict[str, Any]) -> dict[str, Any]:
    return {
        "Framework": "roadxfer",
        "ModelConfiguration": "MultiTaskRoadExtractor",
        "ModelType": "ImageClassification",
        "ModelName": "MultiTaskRoadExtractor",
        "ModelFile": f"{name}.pth",
        "ExtractBands": list(range(spec.in_channels)),
        "DataType": "uint8",
        "SupportsVariableTileSize": True,
        "ImageHeight": tile_size,
        "ImageWidth": tile_size,
        "ModelParameters": {"backbone": spec.backbone, "mtl_model": spec.arch, "loss": "road_orient_loss"},
        "Classes": [{"Value": int(c["value"]), "Name": c["name"], "Color": list(c.get("color", [255, 0, 0]))} for c in classes],
        "RoadOrientation": {"orient_bin_size": bin_size, "orient_bins": spec.orientation_bins, "angle_range": 360 if spec.reference_layout else 180},
        "Normalization": {"mean": list(mean), "std": list(std)},
        "CellSize": cell_size,  # metres (of the training tiles), whatever their CRS
        "CellSizeUnit": "metre",
        "roadxfer": {"version": __version__, "spec": spec.to_dict(), **provenance},
    }


def write_package(folder: str | Path, model: nn.Module, emd: dict[str, Any], *, extras: dict[str, Path] | None = None, zip_dlpk: bool = False,
                  half: bool = False) -> Path:
    """Write a package atomically: a finished package is never replaced by a half-written one.

    ``half``: floating-point weights stored as float16 (half the size, for sharing); they
    load into a float32 model as usual.

    A model of the reference architecture also gets ``arcgis/<name>/`` and
    ``arcgis/<name>.dlpk`` in the reference tool's layout (one road class and no side
    network only: the reference's inference knows no other).
    """
    folder = Path(folder)
    name = folder.name
    with atomic_path(folder, directory=True, kind="model-package") as tmp:
        weights = tmp / f"{name}.pth"
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # plain layout, whatever the training's
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        check_finite(state, folder)  # before the commit: a package never holds NaN weights (nor float16 overflow)
        torch.save(state, weights)
        if set(torch.load(weights, map_location="cpu", weights_only=True)) != set(state):  # re-read before the commit
            raise OSError(f"{weights}: the weights read back differ from those written")
        emd = {**emd, "ModelFile": f"{name}.pth"}
        emd["roadxfer"] = {**emd.get("roadxfer", {}), "weights_sha256": sha256_file(weights)}
        (tmp / f"{name}.emd").write_text(json.dumps(emd, indent=2))
        for rel, src in (extras or {}).items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        spec = model.spec
        if spec.reference_layout:
            if spec.side_channels:
                log.warning("%s has a side network, which the reference tool's road extractor lacks: no reference-layout copy is written", name)
            elif spec.n_classes == 1:
                reference.write_reference_package(tmp / "arcgis", name, spec, emd, weights, extras or {})
            else:
                log.warning("%s has %d road classes: the reference tool's road extractor has one, so no reference-layout copy is written", name, spec.n_classes)
        if zip_dlpk:
            archive = shutil.make_archive(str(tmp.parent / f".{name}-dlpk"), "zip", tmp)
            shutil.move(archive, tmp / f"{name}.dlpk")
    return folder


def share_package(src: str | Path, dst: str | Path, *, half: bool = True) -> Path:
    """Copy a trained roadxfer package as one to share: float16 weights, the same model definition.

    The copy records the original weights' sha256 (``roadxfer.shared_from``); its own
    sha256 is checked on every load like any package's.
    """
    pkg = load_package(src)
    refuse_overlap({"OUTDIR": dst}, {"MODEL": pkg.path})
    if pkg.reference_emd is not None or pkg.emd.get("Framework") != "roadxfer":
        raise InputError(pkg.path, "is not a roadxfer package", "share a package trained by roadxfer (the reference tool's packages are shared as they are)")
    emd = json.loads(json.dumps(pkg.emd))
    emd["roadxfer"]["shared_from"] = {"name": Path(pkg.path).name, "weights_sha256": pkg.weights_sha256, "dtype": "float16" if half else "float32"}
    extras = {str(p.relative_to(pkg.path)): p for p in sorted(Path(pkg.path).rglob("*.png"))}
    write_package(dst, pkg.model, emd, extras=extras, half=half)
    log.info("wrote %s (%s weights) from %s", dst, "float16" if half else "float32", pkg.path)
    return Path(dst)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_emd_fields(emd: dict[str, Any], emd_path: Path) -> None:
    """Refuse, before any weights are read, the fields that would fail later or give a wrong map."""
    fix = "repair the .emd (or re-export the model): the reference tool writes these fields as numbers and a list of classes"
    for key in ("ImageHeight", "ImageWidth"):
        if key in emd and not (_is_int(emd[key]) and 0 < emd[key] <= 16384):
            raise InputError(emd_path, f"{key} {emd[key]!r} is not a tile size in pixels (a whole number from 1 to 16384)", fix)
    classes = emd.get("Classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, dict) for c in classes):
        raise InputError(emd_path, f"Classes must be a non-empty list of {{Value, Name, Color}}, not {str(classes)[:60]!r}", fix)
    values = [c.get("Value", c.get("value", c.get("ClassValue"))) for c in classes]
    for v in values:
        if not _is_int(v) or not 1 <= v <= 254:
            raise InputError(emd_path, f"class value {v!r} is not a whole number from 1 to 254 (0 is background and 255 nodata in the class raster)",
                             "give each class a value from 1 to 254 in the .emd's Classes")
    if len(set(values)) != len(values):
        raise InputError(emd_path, f"class values {values} repeat", "give each class its own value")
    norm = emd.get("Normalization")
    if norm is not None:
        numbers = [*(norm.get("mean") or []), *(norm.get("std") or [])] if isinstance(norm, dict) else [None]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) or not all(x > 0 for x in norm.get("std") or [1]):
            raise InputError(emd_path, f"Normalization {str(norm)[:80]} is not finite means and positive standard deviations", "re-train or re-export the model")


def model_file(emd: dict[str, Any], emd_path: Path) -> Path:
    """The weights file an ``.emd`` names (``ModelFile``): a file inside the package folder, never elsewhere."""
    name = emd.get("ModelFile", f"{emd_path.stem}.pth")
    folder = emd_path.parent.resolve()
    if not isinstance(name, str) or not name or "\0" in name:
        raise InputError(emd_path, f"ModelFile {name!r} is not a file name", "ModelFile names the weights file beside the .emd, e.g. model.pth")
    rel = PurePosixPath(name.replace("\\", "/"))
    weights = (folder / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not weights.is_relative_to(folder):
        raise InputError(emd_path, f"ModelFile {name!r} points outside the package folder {folder}", "a package's weights lie in its own folder: fix ModelFile or copy the weights beside the .emd")
    if weights.exists() and not weights.is_file():
        raise InputError(weights, "named by the .emd (ModelFile) is not a regular file", "ModelFile names the weights file beside the .emd")
    return weights


def check_finite(state: dict[str, torch.Tensor], weights: Path, *, fix: str = "use another checkpoint of the model (a training run that diverged writes none)") -> None:
    """One NaN or infinite weight turns every pixel's output into NaN (an all-background map): refuse it."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise InputError(weights, f"holds NaN or infinite weights ({bad}): the model would classify every pixel as background", fix)


def load_package(path: str | Path, *, device: str | torch.device = "cpu") -> Package:
    """Load a package for classification or as a pretrained start; fails clearly on anything odd.

    ``path``: a roadxfer package folder or its ``.emd``; a reference-tool model folder,
    its ``.emd``, or its ``.dlpk`` (unpacked safely into a temporary folder).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model package does not exist", "train it first or fix the path in the config")
    if path.is_file() and path.suffix.lower() == ".dlpk":
        with tempfile.TemporaryDirectory(prefix="roadxfer-dlpk-") as tmp, naming_archive(path, Path(tmp)):
            reference.extract_dlpk(path, Path(tmp))
            pkg = load_package(tmp, device=device)
        pkg.path = path
        return pkg
    emd_path = find_emd(path)
    emd = read_emd(emd_path)  # size, JSON and object checked, as the report's reader does
    if reference.is_reference_emd(emd):
        return _load_reference(emd_path, emd, device)
    if emd.get("Framework") != "roadxfer" or emd.get("ModelName") != "MultiTaskRoadExtractor":
        raise InputError(emd_path, f"is a {emd.get('Framework')!r}/{emd.get('ModelName')!r} model, not a roadxfer or reference MultiTaskRoadExtractor", f"use a package trained by roadxfer or a reference {reference.SUPPORTED}")
    check_emd_fields(emd, emd_path)
    try:
        spec = ModelSpec(**emd["roadxfer"]["spec"])
    except (KeyError, TypeError) as exc:
        raise InputError(emd_path, f"lacks a valid model spec ({exc})", "re-train the model with roadxfer") from exc
    weights = model_file(emd, emd_path)
    if not weights.is_file():
        raise InputError(weights, "model weights file is missing", "copy the whole package folder")
    digest = sha256_file(weights)
    expected = emd["roadxfer"].get("weights_sha256")
    if expected and expected != digest:
        raise InputError(weights, "weights do not match the sha256 recorded in the .emd (corrupt or replaced)", "copy the package again")
    state = read_state_dict(weights, "PyTorch weights")
    check_finite(state, weights)
    model = _strict_model(spec, state, weights)
    model.to(device).eval()
    return Package(emd_path.parent, emd, model, digest)


def _strict_model(spec: ModelSpec, state: dict[str, torch.Tensor], weights: Path) -> nn.Module:
    model = build_model(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise InputError(weights, f"weights do not fit a {spec.arch}/{spec.backbone} model ({detail})", "the .emd and .pth belong to different models") from exc
    return model


def _load_reference(emd_path: Path, emd: dict[str, Any], device: str | torch.device) -> Package:
    """A reference-tool package, described by an ``.emd`` of ours built from its fields."""
    if emd.get("ModelName") == reference.MODEL_NAME:  # another model's .emd is refused by name first
        check_emd_fields(emd, emd_path)
    spec, fields = reference.reference_spec(emd, emd_path)
    weights = model_file(emd, emd_path)
    if not weights.is_file():
        raise InputError(weights, "model weights file named by the .emd (ModelFile) is missing", "copy the whole model folder, or use its .dlpk")
    digest = sha256_file(weights)
    state = read_state_dict(weights, "PyTorch weights")
    check_finite(state, weights)
    model = _strict_model(spec, state, weights)
    mean, std = raw_pixel_scaling(spec.in_channels)
    ours = build_emd(emd_path.stem, spec, tile_size=fields["ImageHeight"], classes=complete_classes(emd["Classes"]), bin_size=360 // spec.orientation_bins,
                     mean=mean, std=std, cell_size=None, provenance={"imported_from": str(emd_path), "reference_emd": fields})
    model.to(device).eval()
    log.info("imported the reference model %s (%s/%s, %d orientation classes, raw 0-255 input)", emd_path, spec.arch, spec.backbone, spec.orientation_bins + 1)
    return Package(emd_path.parent, ours, model, digest, reference_emd=fields)


def check_compatible(pkg: Package, *, spec: ModelSpec, classes: list[dict[str, Any]], bands: int, tile_size: int, source: str | Path) -> list[str]:
    """Check a pretrained package can start training ``spec``; returns the parts that start fresh.

    Heads for other classes or bins are re-initialised; a side network the pretrained model
    lacks is added (its output starting at zero).
    """
    p = pkg.spec
    if p.arch == spec.arch and p.backbone != spec.backbone:
        raise InputError(pkg.path, f"is a {p.arch}/{p.backbone} model but the config asks for {spec.arch}/{spec.backbone}", "set training.arch/backbone to the pretrained model's, or train from scratch")
    if p.arch != spec.arch:
        raise InputError(pkg.path, f"is a {p.arch} model but the config asks for {spec.arch}", f"set training.arch: {p.arch} for this model, or train from scratch")
    if p.side_channels and p.side_channels != spec.side_channels:
        raise InputError(pkg.path, f"has a side network of {p.side_channels} channels but the config asks for {spec.side_channels or 'none'}",
                         f"set training.side_channels: {p.side_channels} to keep it (a model without it would lose what it learnt)")
    if p.in_channels != bands:
        raise InputError(source, f"has {bands}-band tiles but the pretrained model {pkg.path} takes {p.in_channels} bands", "export tiles from imagery with the pretrained model's bands")
    if tile_size % 32:
        raise InputError(source, f"tile size {tile_size} is not a multiple of 32 as the pretrained model needs", "export tiles of 128, 256 or 512 px")
    reset = []
    theirs, ours = [(int(c["Value"]), str(c["Name"])) for c in pkg.classes], [(int(c["value"]), str(c["name"])) for c in classes]
    if pkg.reference_emd is not None:
        # Reference packages often name their class by its value ("1"): the values decide.
        theirs, ours = [v for v, _ in theirs], [v for v, _ in ours]
        if theirs == ours and pkg.classes != classes:
            log.info("%s: class names %s taken as the config's %s (same values)", pkg.path, [c["Name"] for c in pkg.classes], [c["name"] for c in classes])
    if theirs != ours:
        reset.append("segmentation head")
    if p.orientation_bins != spec.orientation_bins:
        reset.append("orientation head")
    if spec.side_channels and not p.side_channels:
        reset.append("side network")
    return reset
