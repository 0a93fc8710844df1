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
from .spec import REFERENCE_ARCH, ModelSpec

log = logging.getLogger(__name__)

FRAMEWORK = "arcgis.learn.models._inferencing"
MODEL_NAME = "MultiTaskRoadExtractor"
SUPPORTED = "MultiTaskRoadExtractor with mtl_model 'linknet' and backbone 'resnet34' on 3-band imagery"
FORMAT_VERSION = "2.4.4"  # the reference library version whose layout we read and write
MAX_DLPK_BYTES = 8 << 30  # uncompressed: a model package is far smaller; refuses zip bombs
MAX_DLPK_MEMBERS = 10_000  # a package holds a few dozen files (charts, the model, its definition)
MAX_DLPK_RATIO = 20  # unpacked model / archive size: weights compress by a few per cent, a zip bomb by thousands
MAX_DLPK_SMALL = 64 << 20  # below this a model may unpack at any ratio
MAX_EMD_BYTES = 4 << 20  # a model definition is a few kB; the reference's with its history, under 100 kB


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


def _member_names(zf: zipfile.ZipFile, archive: Path) -> dict[str, zipfile.ZipInfo]:
    """The archive's file members by normalised name; refuses what no package holds (see :func:`extract_dlpk`)."""
    members = zf.infolist()
    if len(members) > MAX_DLPK_MEMBERS:
        raise InputError(archive, f"holds {len(members)} members; a model package holds a few dozen", "do not use this file")
    files: dict[str, zipfile.ZipInfo] = {}
    folders: set[str] = set()
    for info in members:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise InputError(archive, f"member {info.filename!r} would be written outside the package folder", "do not use this file: a package never needs such a member")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(archive, f"member {info.filename!r} is a symbolic link", "do not use this file: a package never needs links")
        if any(len(p.encode()) > 255 for p in parts) or len(name) > 1024:
            raise InputError(archive, f"member name {info.filename[:40]!r}... is longer than file systems allow", "do not use this file")
        if info.flag_bits & 0x1:
            raise InputError(archive, f"member {info.filename!r} is encrypted", "export the package again without a password")
        key = "/".join(parts)
        if info.is_dir():
            folders.add(key)
            continue
        if key in files:
            raise InputError(archive, f"holds member {key!r} twice (which one would be used is up to the reader)", "do not use this file: export the package again")
        files[key] = info
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(set(files) & folders)
    if clash:
        raise InputError(archive, f"holds {clash[0]!r} both as a file and as a folder", "do not use this file")
    return files


def extract_dlpk(archive: Path, dest: Path) -> None:
    """Unpack the model of a ``.dlpk`` into ``dest``: its ``.emd`` and the weights that names, nothing else.

    Refused before anything is written: members that would land outside ``dest`` (absolute
    names, drive letters, ``..``), links, encrypted members, duplicate names, a name that is
    both a file and a folder, names no file system takes, more than
    ``MAX_DLPK_MEMBERS`` members, and a model that unpacks to more than ``MAX_DLPK_RATIO``
    times the archive's size (weights barely compress; a zip bomb does). Damaged members
    (bad CRC, unsupported compression) are named.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError) as exc:
        raise InputError(archive, f"is not a readable .dlpk (zip) file ({exc})", "copy the package again") from exc
    with zf:
        files = _member_names(zf, archive)
        emds = sorted(k for k in files if "/" not in k and k.lower().endswith(".emd"))
        if not emds:
            raise InputError(archive, "holds no .emd model definition at its top level", "use the .dlpk the reference tool or roadxfer wrote")
        stem = archive.stem
        emd_name = next((k for k in emds if k == f"{stem}.emd"), emds[0])
        wanted = [emd_name]
        emd_info = files[emd_name]
        if emd_info.file_size > MAX_EMD_BYTES:
            raise InputError(archive, f"its {emd_name} is {emd_info.file_size / 1e6:.0f} MB; a .emd is a few kB", "do not use this file")
        try:  # only to find ModelFile: the loader reads the .emd again and names what is wrong with it
            emd = json.loads(_read_member(zf, emd_info, archive).decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            emd = None
        model_file = emd.get("ModelFile", f"{PurePosixPath(emd_name).stem}.pth") if isinstance(emd, dict) else None
        if isinstance(model_file, str):
            key = "/".join(PurePosixPath(model_file.replace("\\", "/")).parts)
            if key in files:
                wanted.append(key)
        total = sum(files[k].file_size for k in wanted)
        cap = max(MAX_DLPK_SMALL, MAX_DLPK_RATIO * archive.stat().st_size)
        if total > min(cap, MAX_DLPK_BYTES):
            raise InputError(archive, f"its model unpacks to {total / 1e6:.0f} MB from a {archive.stat().st_size / 1e6:.1f} MB archive", "do not use this file: model weights barely compress")
        root = dest.resolve()
        for key in wanted:
            target = (dest / key).resolve()
            if not target.is_relative_to(root):
                raise InputError(archive, f"member {key!r} would be written outside the package folder", "do not use this file")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_read_member(zf, files[key], archive))


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path) -> bytes:
    """A member's bytes, at most its declared size; a damaged or unsupported member is named."""
    try:
        with zf.open(info) as src:
            data = src.read(info.file_size + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise InputError(archive, f"member {info.filename!r} cannot be unpacked ({exc})", "copy the package again; the archive is damaged or uses a compression zip files for models do not") from exc
    if len(data) > info.file_size:
        raise InputError(archive, f"member {info.filename!r} is larger than the archive declares", "do not use this file")
    return data


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
