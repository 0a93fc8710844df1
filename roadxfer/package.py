"""Model packages: a self-describing folder (optionally also zipped as ``.dlpk``).

::

    <name>/<name>.pth                 weights (state dict)
    <name>/<name>.emd                 model definition, modelled on the reference tool's .emd
    <name>/metrics.csv                per-epoch metrics
    <name>/ModelCharacteristics/loss_graph.png

The ``.emd`` carries what classification needs (architecture, backbone, tile size,
bands, classes, orientation bins, normalisation, cell size) and our provenance
(parent weights' sha256, training data digest, training config, code version, metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_path
from .errors import InputError
from .model import ModelSpec, MultiTaskRoadModel

log = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Package:
    path: Path
    emd: dict[str, Any]
    model: MultiTaskRoadModel
    weights_sha256: str

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
        "RoadOrientation": {"orient_bin_size": bin_size, "orient_bins": spec.orientation_bins, "angle_range": 180},
        "Normalization": {"mean": list(mean), "std": list(std)},
        "CellSize": cell_size,
        "roadxfer": {"version": __version__, "spec": spec.to_dict(), **provenance},
    }


def write_package(folder: str | Path, model: MultiTaskRoadModel, emd: dict[str, Any], *, extras: dict[str, Path] | None = None, zip_dlpk: bool = False) -> Path:
    """Write a package atomically: a finished package is never replaced by a half-written one."""
    folder = Path(folder)
    name = folder.name
    with atomic_path(folder, directory=True) as tmp:
        weights = tmp / f"{name}.pth"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        emd = {**emd, "ModelFile": f"{name}.pth"}
        emd["roadxfer"] = {**emd.get("roadxfer", {}), "weights_sha256": sha256_file(weights)}
        (tmp / f"{name}.emd").write_text(json.dumps(emd, indent=2))
        for rel, src in (extras or {}).items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        if zip_dlpk:
            archive = shutil.make_archive(str(tmp.parent / f".{name}-dlpk"), "zip", tmp)
            shutil.move(archive, tmp / f"{name}.dlpk")
    return folder


def _find_emd(path: Path) -> Path:
    if path.is_file() and path.suffix == ".emd":
        return path
    if path.is_dir():
        candidates = [path / f"{path.name}.emd"] + sorted(path.glob("*.emd"))
        for c in candidates:
            if c.is_file():
                return c
    raise InputError(path, "is not a model package: no .emd model definition found", "point to the package folder written by the train rule (or its .emd file)")


def load_package(path: str | Path, *, device: str | torch.device = "cpu") -> Package:
    """Load a package for classification or as a pretrained start; fails clearly on anything odd."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model package does not exist", "train it first or fix the path in the config")
    emd_path = _find_emd(path)
    try:
        emd = json.loads(emd_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(emd_path, f"model definition is corrupt ({exc})", "re-export or re-train the model") from exc
    if emd.get("Framework") != "roadxfer" or emd.get("ModelName") != "MultiTaskRoadExtractor":
        raise InputError(emd_path, f"is a {emd.get('Framework')!r}/{emd.get('ModelName')!r} model, not a roadxfer MultiTaskRoadExtractor", "use a package trained by roadxfer")
    try:
        spec = ModelSpec(**emd["roadxfer"]["spec"])
    except (KeyError, TypeError) as exc:
        raise InputError(emd_path, f"lacks a valid model spec ({exc})", "re-train the model with roadxfer") from exc
    weights = emd_path.parent / emd.get("ModelFile", f"{emd_path.stem}.pth")
    if not weights.is_file():
        raise InputError(weights, "model weights file is missing", "copy the whole package folder")
    digest = sha256_file(weights)
    expected = emd["roadxfer"].get("weights_sha256")
    if expected and expected != digest:
        raise InputError(weights, "weights do not match the sha256 recorded in the .emd (corrupt or replaced)", "copy the package again")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(weights, f"cannot be read as PyTorch weights ({exc})", "copy the package again") from exc
    model = MultiTaskRoadModel(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(weights, f"weights do not fit a {spec.arch}/{spec.backbone} model ({str(exc).splitlines()[0]})", "the .emd and .pth belong to different models") from exc
    model.to(device).eval()
    return Package(emd_path.parent, emd, model, digest)


def check_compatible(pkg: Package, *, spec: ModelSpec, classes: list[dict[str, Any]], bands: int, tile_size: int, source: str | Path) -> list[str]:
    """Check a pretrained package can start training ``spec``; returns what must be re-initialised."""
    p = pkg.spec
    if (p.arch, p.backbone) != (spec.arch, spec.backbone):
        raise InputError(pkg.path, f"is a {p.arch}/{p.backbone} model but the config asks for {spec.arch}/{spec.backbone}", "set training.arch/backbone to the pretrained model's, or train from scratch")
    if p.in_channels != bands:
        raise InputError(source, f"has {bands}-band tiles but the pretrained model {pkg.path} takes {p.in_channels} bands", "export tiles from imagery with the pretrained model's bands")
    if tile_size % 32:
        raise InputError(source, f"tile size {tile_size} is not a multiple of 32 as the pretrained model needs", "export tiles of 128, 256 or 512 px")
    reset = []
    if [(c["Value"], c["Name"]) for c in pkg.classes] != [(int(c["value"]), c["name"]) for c in classes]:
        reset.append("segmentation head")
    if p.orientation_bins != spec.orientation_bins:
        reset.append("orientation head")
    return reset
