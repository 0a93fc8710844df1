"""Atomic outputs: write under a temporary name next to the target, then rename.

A killed or failed job therefore never leaves a file (or folder) under the final name
that looks complete. The rename is atomic because the temporary lives in the same
directory (same filesystem) as the target. Temporaries that a killed job left behind
are removed the next time the same output is written, and a write that fails because
the disk is full says so, naming the disk, instead of showing libtiff's or GDAL's text.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from .errors import InputError

log = logging.getLogger(__name__)

# What GDAL/libtiff/SQLite say when a write hits a full disk (their errors carry no errno).
_DISK_FULL_TEXT = re.compile(r"no space left|disk (is )?full|seek error|write failed|failed to commit|database or disk is full|short write", re.IGNORECASE)


def _tmp_name(target: Path) -> Path:
    # Keep the suffix: some drivers (GPKG, COG) check the extension of the name they write.
    return target.with_name(f".{target.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def remove_stale(parent: Path, pattern: str) -> int:
    """Remove temporaries matching ``pattern`` in ``parent`` that no live job of ours is writing.

    Snakemake runs one job per output at a time, so a temporary of the same output with
    another process id was left by a killed job.
    """
    n = 0
    own = f"-{os.getpid()}-"
    for p in parent.glob(pattern):
        if own not in p.name:
            _remove(p)
            n += 1
    if n:
        log.info("removed %d temporary file(s) a killed job left in %s", n, parent)
    return n


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() or (not os.path.ismount(path) and path != path.parent):
        path = path.parent
    return path


def disk_full_error(exc: BaseException, where: Path, name: Path | None = None) -> InputError | None:
    """An error naming the full disk, when ``exc`` (or its cause) is a write that ran out of space.

    ``where`` is what was being written (call this while it still exists: its size tells
    how much was needed); ``name`` the output to name in the message (default ``where``).
    """
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    by_errno = any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain)
    by_text = any(_DISK_FULL_TEXT.search(str(x)) for x in chain)
    if not (by_errno or by_text):
        return None
    probe = where if where.exists() else where.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    written = _tree_bytes(where)
    if not by_errno and free > max(4 * written, 64 << 20):
        return None  # a write error, but the disk has room: not a full disk
    need_mb = max(1, int(2 * written / 1e6) + 1)
    mount = _mount_point(probe)
    return InputError(name or where, f"no space left on {mount} ({free / 1e6:.1f} MB free; {written / 1e6:.1f} MB had been written)",
                      f"free at least {need_mb} MB on {mount}, or point the outputs (or TMPDIR, for scratch files) at a disk with room, then run again")


# A folder output carries this file: how a later run knows the folder is a previous output
# of the same step (and may be replaced), not a user's folder that happens to be named so.
MARKER = ".roadxfer-output.json"


def output_kind(folder: Path) -> str | None:
    """The step that wrote ``folder`` (its marker), or None."""
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_replaceable(target: str | Path, *, directory: bool, kind: str | None = None) -> None:
    """Refuse an output path that would replace something that is not a previous output of this step.

    A folder output may replace an empty folder or one that this step wrote before (its
    marker says so); never a user's folder, whatever it holds, nor a file. A file output
    may not replace a folder.
    """
    target = Path(target)
    if target.is_symlink() or not target.exists():
        return
    if directory:
        if not target.is_dir():
            raise InputError(target, f"is an existing file, not a folder the {kind or 'output'} can be written to", "give a new folder name for the output")
        if any(target.iterdir()) and output_kind(target) != kind:
            raise InputError(target, f"exists and is not a previous {kind or 'output'} folder written by roadxfer: it is left as it is",
                             "give a new (or empty) folder for the output; remove the folder yourself if you do mean to replace it")
    elif target.is_dir():
        raise InputError(target, "is an existing folder, not a file the output can be written to", "give a file name for the output")


def refuse_overlap(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output that is, or contains, an input (named by the option or argument each one came from)."""
    ins = {name: Path(p).resolve() for name, p in inputs.items() if p is not None}
    for oname, out in outputs.items():
        if out is None:
            continue
        o = Path(out).resolve()
        for iname, i in ins.items():
            same = o == i or (o.exists() and i.exists() and os.path.samefile(o, i))
            if same or o in i.parents:
                what = "is" if same else "contains"
                raise InputError(out, f"the output {oname} {what} the input {iname} ({inputs[iname]}): writing it would destroy the input",
                                 f"give {oname} a path outside the inputs")


@contextlib.contextmanager
def atomic_path(target: str | Path, *, directory: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write instead of ``target``; move it into place on success.

    With ``directory=True`` the temporary is created as an empty folder and ``kind`` names
    the step: the folder gets a marker, and an existing ``target`` is replaced only when it
    is empty or a previous output of the same kind (:func:`check_replaceable`, checked
    before anything is written and again at the end), and only once the new output is
    complete. Temporaries of the same target left by a killed job are removed first.
    """
    target = Path(target)
    check_replaceable(target, directory=directory, kind=kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, f".{target.stem}.tmp-*{target.suffix}")
    tmp = _tmp_name(target)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {target}")
        check_replaceable(target, directory=directory, kind=kind)
        if directory:
            (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        if target.is_dir() and not target.is_symlink():
            old = _tmp_name(target)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        full = disk_full_error(exc, tmp, target) if isinstance(exc, Exception) and not isinstance(exc, InputError) else None
        _remove(tmp)
        if full is not None:
            raise full from exc
        raise


def check_room(path: str | Path, min_free: int = 1 << 20) -> None:
    """After a write: a disk left with (almost) no room means a write may have failed in silence.

    GDAL and libtiff report some failed flushes only on stderr; a disk that is full right
    after our writes is the sign. Raises the same error as a write that failed loudly.
    """
    path = Path(path)
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    if free < min_free:
        err = disk_full_error(OSError(errno.ENOSPC, "no space left after writing"), path)
        if err is not None:
            raise err


@contextlib.contextmanager
def scratch_dir(parent: str | Path, tag: str) -> Iterator[Path]:
    """A private scratch folder ``parent/.<tag>.scratch-<pid>-<id>``, removed afterwards (and when a killed job left one)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, f".{tag}.scratch-*")
    path = parent / f".{tag}.scratch-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    except Exception as exc:
        full = None if isinstance(exc, InputError) else disk_full_error(exc, path, parent)
        if full is not None:
            _remove(path)
            raise full from exc
        raise
    finally:
        _remove(path)
