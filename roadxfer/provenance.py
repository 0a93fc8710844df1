"""What a model package records of how it was made: digests of settings and data, the code's version. No torch here (the report reads it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__

if TYPE_CHECKING:
    from .data import TileData


def settings_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_digest(data: TileData) -> str:
    h = hashlib.sha256()
    for arr in (data.images, data.seg, data.orient):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def code_version() -> str:
    """Git commit of the workflow when available (``git describe``), else the package version."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__

