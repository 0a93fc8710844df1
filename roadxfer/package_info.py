"""A model package's record without loading its network (no torch): for the report and other torch-free steps.

Reads the ``.emd`` of a roadxfer package, of the reference tool's model folder or ``.emd``,
or of a ``.dlpk`` (unpacked safely), and the weights file's sha256. :func:`roadxfer.package.load_package`
checks the weights and builds the network; this only describes the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import reference
from .errors import InputError
from .spec import REFERENCE_ARCH


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_emd(path: Path) -> Path:
    """The model definition of a package folder, or the ``.emd`` given."""
    if path.is_file() and path.suffix == ".emd":
        return path
    if path.is_dir():
        candidates = [path / f"{path.name}.emd"] + sorted(path.glob("*.emd"))
        for c in candidates:
            if c.is_file():
                return c
    raise InputError(path, "is not a model package: no .emd model definition found", "point to a package folder (roadxfer's or the reference tool's), its .emd file or a .dlpk")


def read_emd(emd_path: Path) -> dict[str, Any]:
    if emd_path.stat().st_size > reference.MAX_EMD_BYTES:
        raise InputError(emd_path, f"model definition is {emd_path.stat().st_size / 1e6:.0f} MB; a .emd is a few kB", "use the package's own .emd")
    try:
        emd = json.loads(emd_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InputError(emd_path, f"model definition is corrupt ({detail})", "re-export or re-train the model") from exc
    if not isinstance(emd, dict):
        raise InputError(emd_path, "model definition is not a JSON object", "re-export or re-train the model")
    return emd


@contextlib.contextmanager
def naming_archive(archive: Path, folder: Path) -> Iterator[None]:
    """Errors about a package unpacked from ``archive`` into ``folder`` name the archive (and the
    member at fault), not a temporary folder that is gone when the user reads the message."""
    try:
        yield
    except InputError as exc:
        inner = Path(exc.path).resolve() if exc.path else None
        member = inner.relative_to(folder.resolve()) if inner is not None and inner.is_relative_to(folder.resolve()) else None
        if exc.path and member is None:
            raise
        raise InputError(archive, f"{exc.problem}{f' (member {member})' if member and str(member) != '.' else ''}", exc.fix) from exc


def package_info(path: str | Path) -> dict[str, Any]:
    """``{"emd", "provenance", "weights_sha256", "architecture", "side_channels"}`` of a package, without torch.

    ``provenance`` is the roadxfer record of how it was made (``emd["roadxfer"]``); a reference
    package has none of its own: ``{"imported_from": <its .emd>}``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "model package does not exist", "train it first or fix the path in the config")
    if path.is_file() and path.suffix.lower() == ".dlpk":
        with tempfile.TemporaryDirectory(prefix="roadxfer-dlpk-") as tmp, naming_archive(path, Path(tmp)):
            reference.extract_dlpk(path, Path(tmp))
            info = package_info(tmp)
        if "imported_from" in info["provenance"]:
            info["provenance"]["imported_from"] = str(path)
        return info
    emd_path = find_emd(path)
    emd = read_emd(emd_path)
    weights = (emd_path.parent / str(emd.get("ModelFile") or f"{emd_path.stem}.pth")).resolve()
    inside = weights.is_relative_to(emd_path.parent.resolve())  # a ModelFile naming a file elsewhere is not read
    digest = sha256_file(weights) if inside and weights.is_file() else None
    if reference.is_reference_emd(emd):
        return {"emd": emd, "provenance": {"imported_from": str(emd_path)}, "weights_sha256": digest,
                "architecture": f"{REFERENCE_ARCH}/{(emd.get('ModelParameters') or {}).get('backbone', 'resnet34')}", "side_channels": 0}
    record = emd.get("roadxfer") or {}
    params = emd.get("ModelParameters") or {}
    return {"emd": emd, "provenance": record, "weights_sha256": digest, "architecture": f"{params.get('mtl_model')}/{params.get('backbone')}",
            "side_channels": int((record.get("spec") or {}).get("side_channels") or 0)}
