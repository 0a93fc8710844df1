"""The reference tool's model packages: read them in, write ours out in their layout.

A model saved by the reference library (``arcgis.learn``) for a MultiTaskRoadExtractor
is a folder ``<name>/`` with ``<name>.emd`` (JSON model definition) and ``<name>.pth``
(a plain state dict), zipped as ``<name>.dlpk``. roadxfer imports the LinkNet/ResNet-34
variant (:mod:`roadxfer.linknet_mtl` holds the same layers under the same names) and
exports models of that architecture back to the same layout.

What the ``.emd`` says and the reference does disagree on one point that matters: the
reference feeds this model raw 0-255 pixels, although its ``.emd`` says
``IsImageNetNormalization: true`` and lists a Normalize transform. We import it with raw
scaling and write ``true`` on export, as the reference does.
"""

from __future__ import annotations

import json
import logging
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import InputError
from .model import REFERENCE_ARCH, ModelSpec

log = logging.getLogger(__name__)

FRAMEWORK = "arcgis.learn.models._inferencing"
MODEL_NAME = "MultiTaskRoadExtractor"
SUPPORTED = "MultiTaskRoadExtractor with mtl_model 'linknet' and backbone 'resnet34' on 3-band imagery"
FORMAT_VERSION = "2.4.4"  # the reference library version whose layout we read and write
MAX_DLPK_BYTES = 8 << 30  # uncompressed: a model package is far smaller; refuses zip bombs


def is_reference_emd(emd: dict[str, Any]) -> bool:
    return emd.get("Framework") == FRAMEWORK or str(emd.get("ModelConfiguration", "")).startswith("_road")


def reference_spec(emd: dict[str, Any], emd_path: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The model spec of a reference ``.emd``, and the fields we read from it; refuses what we cannot run."""
    fix = f"roadxfer imports the {SUPPORTED}; export such a model from the reference tool, or train one with training.arch: {REFERENCE_ARCH}"
    if emd.get("ModelName") != MODEL_NAME:
        raise InputError(emd_path, f"is a {emd.get('ModelName')!r} model, not a {MODEL_NAME}", fix)
    params = emd.get("ModelParameters") or {}
    mtl = params.get("mtl_model", "linknet")
    if mtl != "linknet":
        raise InputError(emd_path, f"uses mtl_model {mtl!r}, which roadxfer does not implement", fix)
    backbone = params.get("backbone", "resnet34")
    if backbone != "resnet34":
        raise InputError(emd_path, f"uses backbone {backbone!r}, which roadxfer does not implement for the reference architecture", fix)
    bands = emd.get("ExtractBands", [0, 1, 2])
    if emd.get("IsMultispectral") or len(bands) != 3:
        raise InputError(emd_path, f"is a multispectral model ({len(bands)} bands {bands})", fix)
    orient = emd.get("RoadOrientation") or {}
    bin_size = int(orient.get("orient_bin_size", 20))
    if bin_size <= 0 or 180 % bin_size:
        raise InputError(emd_path, f"RoadOrientation.orient_bin_size {bin_size} does not divide 180", "the reference's bins must divide 180 degrees (e.g. 10, 20, 30)")
    classes = emd.get("Classes") or []
    if not classes:
        raise InputError(emd_path, "lists no Classes", "the .emd needs a Classes list of {Value, Name, Color}")
    tile = int(emd.get("ImageHeight", 256))
    spec = ModelSpec(arch=REFERENCE_ARCH, backbone="resnet34", in_channels=3, n_classes=len(classes), orientation_bins=360 // bin_size)
    fields = {
        "ModelName": emd.get("ModelName"),
        "ArcGISLearnVersion": emd.get("ArcGISLearnVersion"),
        "ModelParameters": params,
        "RoadOrientation": {k: orient.get(k) for k in ("orient_bin_size", "orient_theta", "class_mapping", "multi_scale") if k in orient},
        "Classes": classes,
        "ImageHeight": tile,
        "ImageWidth": int(emd.get("ImageWidth", tile)),
        "ExtractBands": bands,
        "IsImageNetNormalization": emd.get("IsImageNetNormalization"),
        "input_scaling": "raw 0-255 (what the reference feeds this model)",
    }
    return spec, fields


def extract_dlpk(archive: Path, dest: Path) -> None:
    """Unzip a ``.dlpk`` into ``dest``, refusing any member that would land outside it.

    Absolute names, drive letters, ``..`` components and symbolic links are refused
    before anything is written, as is an archive that unpacks to more than 8 GB.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(archive, f"is not a readable .dlpk (zip) file ({exc})", "copy the package again") from exc
    with zf:
        members = zf.infolist()
        total = 0
        for info in members:
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
                raise InputError(archive, f"member {info.filename!r} would be written outside the package folder", "do not use this file: a package never needs such a member")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise InputError(archive, f"member {info.filename!r} is a symbolic link", "do not use this file: a package never needs links")
            total += info.file_size
        if total > MAX_DLPK_BYTES:
            raise InputError(archive, f"unpacks to {total / 1e9:.1f} GB", "a model package is far smaller: do not use this file")
        root = dest.resolve()
        for info in members:
            target = (dest / info.filename.replace("\\", "/")).resolve()
            if not target.is_relative_to(root):
                raise InputError(archive, f"member {info.filename!r} would be written outside the package folder", "do not use this file")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)


def _transforms(tile: int) -> str:
    # The reference records its training transforms as text; nothing reads them back.
    return (f"[[[RandomCrop(size=({tile}, {tile}), padding=None), Resize(size={tile}, interpolation=bilinear, max_size=None, antialias=True), "
            "RandomHorizontalFlip(p=0.5), RandomVerticalFlip(p=0.5), Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])], "
            "[ColorJitter(brightness=(0.9, 1.1), contrast=(0.9, 1.1), saturation=None, hue=None), ToTensor()]], "
            f"[[Resize(size={tile}, interpolation=bilinear, max_size=None, antialias=True)], [ToTensor()], "
            "[Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]]]")


def build_reference_emd(name: str, spec: ModelSpec, emd: dict[str, Any]) -> dict[str, Any]:
    """The ``.emd`` the reference library writes for this model, from our package's ``.emd``."""
    ours = emd.get("roadxfer", {})
    cfg = ours.get("training_config", {})
    best = ours.get("best") or {}
    parent_fields = ((ours.get("parent") or {}).get("reference_emd")) or {}
    parent_orient = parent_fields.get("RoadOrientation", {})
    tile = int(emd["ImageHeight"])
    road_iou = best.get("val_road_iou")
    classes = emd["Classes"]
    return {
        "Framework": FRAMEWORK,
        "InferenceFunction": "ArcGISImageClassifier.py",
        "ModelConfiguration": "_road_infrencing",  # sic: the reference's spelling
        "ModelType": "ImageClassification",
        "ExtractBands": list(range(spec.in_channels)),
        "SupportsVariableTileSize": True,
        "ModelParameters": {
            "backbone": spec.backbone,
            "backend": "pytorch",
            "opt_func": None,
            "opt_func_args": "",
            "loss": "road_orient_loss",
            "loss_weights": [1.0, float(cfg.get("orientation_weight", 1.0))],
            "mtl_model": "linknet",
            "model_init_kwargs": {},
            "learner_params": {},
        },
        "Classes": [{"Value": int(c["Value"]), "Name": str(c["Name"]), "Color": list(c.get("Color", [255, 0, 0]))} for c in classes],
        "RoadOrientation": {
            "class_mapping": {"0": 0, **{str(int(c["Value"])): i for i, c in enumerate(classes, start=1)}},
            "orient_bin_size": 360 // spec.orientation_bins,
            "orient_theta": float(parent_orient.get("orient_theta") or 8.0),
            "multi_scale": parent_orient.get("multi_scale"),
            "transforms": _transforms(tile),
        },
        "ModelFormat": "NCHW",
        "MinCellSize": None,
        "MaxCellSize": None,
        "ArcGISLearnVersion": FORMAT_VERSION,
        "monitored_miou": road_iou,
        "ModelFile": f"{name}.pth",
        "ImageHeight": tile,
        "ImageWidth": tile,
        "ImageSpaceUsed": "MAP_SPACE",
        "LearningRate": f"{float(ours.get('lr_found') or cfg.get('lr', 1e-3)):.4e}",  # lr: auto records what it found
        "ModelName": MODEL_NAME,
        "backend": "pytorch",
        "accuracy": str(best.get("val_road_iou", "")),
        "mIoU": str(road_iou if road_iou is not None else ""),
        "resize_to": tile,
        "IsMultispectral": False,
        # The reference writes true for this model and feeds it raw pixels all the same.
        "IsImageNetNormalization": True,
        "roadxfer": {
            "note": "written by roadxfer; accuracy and mIoU are the validation road IoU of roadxfer's training",
            "version": ours.get("version"),
            "code_version": ours.get("code_version"),
            "source_weights_sha256": ours.get("weights_sha256"),
            "cell_size_m": emd.get("CellSize"),
        },
    }


def write_reference_package(out_dir: Path, name: str, spec: ModelSpec, emd: dict[str, Any], weights: Path, extras: dict[str, Path]) -> Path:
    """Write ``out_dir/<name>/{<name>.emd, <name>.pth, ModelCharacteristics/...}`` and ``out_dir/<name>.dlpk``.

    ``weights`` is our package's ``.pth``: the reference architecture's state dict is the
    reference's, key for key, so it is copied as it is.
    """
    folder = out_dir / name
    (folder / "ModelCharacteristics").mkdir(parents=True, exist_ok=True)
    files = {f"{name}.emd": json.dumps(build_reference_emd(name, spec, emd), indent=4).encode()}
    files[f"{name}.pth"] = weights.read_bytes()
    for rel, src in extras.items():
        if rel.startswith("ModelCharacteristics/"):
            files[rel] = Path(src).read_bytes()
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    dlpk = out_dir / f"{name}.dlpk"
    with zipfile.ZipFile(dlpk, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ModelCharacteristics/", b"")
        for rel, data in files.items():
            zf.writestr(rel, data)
    log.info("wrote the reference-tool layout %s and %s", folder, dlpk)
    return folder
