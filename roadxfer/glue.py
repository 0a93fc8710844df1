"""What every Snakemake script needs: logging to the rule's log file, and a GPU when the rule asked for one.

Settings objects come from :mod:`roadxfer.settings`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from .errors import InputError


def run_logged(snakemake: Any, main: Callable[[], object]) -> None:
    """Run ``main`` with logging sent to the rule's log (and stderr); errors end up in the log."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        # Appended, with a header per try: a retried or requeued job keeps the log of the try that failed.
        handlers.append(logging.FileHandler(snakemake.log[0], mode="a"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    job = os.environ.get("SLURM_JOB_ID")
    logging.getLogger("roadxfer").info("==== rule %s, try %s%s ====", snakemake.rule, getattr(snakemake, "attempt", 1),
                                       f", SLURM job {job} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')})" if job else "")
    try:
        check_gpu(snakemake)
        main()
    except Exception:
        logging.getLogger("roadxfer").exception("rule %s failed", snakemake.rule)
        raise


def check_gpu(snakemake: Any) -> None:
    """A job that asked for GPUs (``gpu: N``) must see them, or fail saying so before any work.

    Without CUDA torch silently runs on the CPU, many times slower than the job was sized
    for. ``resources.cpu_fallback: true`` in the config turns the failure into a warning.
    """
    wanted = int(getattr(getattr(snakemake, "resources", None), "gpu", 0) or 0)
    if wanted <= 0:
        return
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen >= wanted:
        return
    fallback = bool((getattr(snakemake, "config", None) or {}).get("resources", {}).get("cpu_fallback", False))
    where = f"SLURM job {os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else "this machine"
    problem = (f"rule {snakemake.rule} asks for {wanted} GPU(s) but {where} has {seen} usable by torch "
               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, torch {torch.__version__}, CUDA build {torch.version.cuda})")
    if fallback and seen == 0:
        logging.getLogger("roadxfer").warning("%s: running on the CPU (resources.cpu_fallback is on)", problem)
        return
    if fallback:
        logging.getLogger("roadxfer").warning("%s: running on %d", problem, seen)
        return
    raise InputError(None, problem, "run on a GPU node (check the profile's partition / gpu_model), set the rule family's gpu to 0 under `resources:` "
                                    "in the config, or set resources.cpu_fallback: true to run on the CPU anyway")
