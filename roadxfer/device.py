"""Where and how training and classification compute: the device, CPU threads, malloc behaviour and mixed precision."""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from . import PRECISIONS
from .errors import InputError


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (honouring CUDA_VISIBLE_DEVICES as SLURM sets it), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    A CPU training step allocates and frees tensors of tens of MB; by default glibc maps
    each one afresh and unmaps it when freed, so every step page-faults all of it in again
    (measured: a fifth of a demo training step on a 2-core VM). The process keeps its peak
    instead, which a job's memory limit must allow for anyway. The ``MALLOC_*`` variables,
    when set, win (the user's choice), and ``ROADXFER_MALLOC=default`` leaves glibc as it is.
    Returns whether the setting was applied (False off glibc, e.g. macOS or musl).
    """
    if os.environ.get("ROADXFER_MALLOC") == "default" or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 32 MiB, glibc's largest mmap threshold on 64 bits; freed heap memory is never trimmed.
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def set_threads(threads: int) -> int:
    """Torch threads from the rule's ``threads`` (and malloc kept from page-faulting: :func:`keep_freed_memory`);
    returns the DataLoader worker count to use."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    keep_freed_memory()
    # Tiles are in memory, so workers only augment: one per 4 threads, none on small machines.
    return min(8, threads // 4)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (Intel AMX, or AVX512-BF16 as on AMD
    Zen 4), where CPU mixed precision pays.

    Measured on 2 cores of an AMD EPYC with AVX512-BF16 and no AMX: a training step of the
    demo's U-Net/ResNet-18 1.6-1.8 times as fast as in float32, classification 1.75 times.
    Elsewhere bfloat16 is emulated on the CPU and slower than float32.
    A CPU held below its own kernels (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``,
    as to measure what an AVX2-only machine does) counts as what it is held to: its bfloat16
    would be emulated there too.
    """
    if not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):  # honours ATEN_CPU_CAPABILITY
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in ("ALL", "DEFAULT") and not isa.startswith(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")):
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


def amp_dtype(dev: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``dev`` (None: float32 throughout).

    ``auto``: bfloat16 on CUDA where supported (else float16), bfloat16 on a CPU with AMX or AVX512-BF16
    (three times faster training of the demo's U-Net on this project's CPU), float32 on
    other CPUs and devices. Weights, optimiser state and losses stay float32.
    """
    if precision not in PRECISIONS:
        raise InputError(None, f"precision {precision!r} is not one of {list(PRECISIONS)}", "choose one of them")
    if precision == "fp32" or (precision == "auto" and dev.type not in ("cuda", "cpu")):
        return None
    if precision == "fp16":
        if dev.type != "cuda":
            raise InputError(None, f"precision fp16 needs a CUDA GPU (the device is {dev})", "use bf16 or fp32 here")
        return torch.float16
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise InputError(None, f"this GPU ({torch.cuda.get_device_name(dev)}) has no bfloat16", "use fp16 or auto")
        return torch.float16
    if precision == "auto" and not cpu_has_bf16():
        return None
    return torch.bfloat16


def channels_last(dev: torch.device) -> bool:
    """NHWC tensors: faster convolutions on CUDA and with oneDNN on the CPU (25 % on this project's CPU in float32)."""
    return dev.type in ("cuda", "cpu")


def precision_name(dtype: torch.dtype | None) -> str:
    """A precision as logged and recorded: the autocast dtype, float32 without autocast."""
    return str(dtype or torch.float32).removeprefix("torch.")

