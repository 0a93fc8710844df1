"""Atomic outputs: write under a temporary name next to the target, then rename.

A killed or failed job therefore never leaves a file (or folder) under the final name
that looks complete. The rename is atomic because the temporary lives in the same
directory (same filesystem) as the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _tmp_name(target: Path) -> Path:
    # Keep the suffix: some drivers (GPKG, COG) check the extension of the name they write.
    return target.with_name(f".{target.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write instead of ``target``; move it into place on success.

    With ``directory=True`` the temporary is created as an empty folder. An existing
    ``target`` is replaced only once the new output is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {target}")
        if target.is_dir() and not target.is_symlink():
            old = _tmp_name(target)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
