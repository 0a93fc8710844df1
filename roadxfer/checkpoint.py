"""Resumable training: the per-epoch checkpoint, read back safely, and SIGTERM turned into a clean stop."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path

log = logging.getLogger(__name__)


# Settings that do not change what training computes: a checkpoint written under others still resumes.
RESUME_NEUTRAL = ("checkpoint_seconds", "stage_tiles", "zip_dlpk")


class Stopped(RuntimeError):
    """Training stopped on SIGTERM (SLURM preemption or the time limit) after writing a checkpoint."""


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While open, SIGTERM only sets a flag (read at the end of each epoch) instead of killing the process.

    SLURM sends SIGTERM, then SIGKILL ``KillWait`` seconds later (30 by default): time to
    finish the epoch and checkpoint it. Off the main thread (where signals cannot be
    handled) the flag is never set.
    """
    asked: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: asked.append(signum))
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The last epoch's checkpoint, or None; a corrupt or foreign file is set aside, never trusted or run.

    ``weights_only=True``: a checkpoint holding pickled objects is refused without running them.
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not {"digest", "epoch", "model", "optimizer", "history", "best_state", "rng"} <= set(ckpt):
            raise ValueError("it is not a roadxfer training checkpoint")
        return ckpt
    except Exception as exc:  # truncated, corrupt, foreign or malicious: all start over
        aside = path.with_name(f"{path.name}.rejected-{time.strftime('%Y%m%dT%H%M%S')}")
        path.rename(aside)
        log.warning("%s cannot be used (%s): set aside as %s, training starts over", path, str(exc).splitlines()[0][:200], aside.name)
        return None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint atomically: a job killed while writing leaves the previous one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
