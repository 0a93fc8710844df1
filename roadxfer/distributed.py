"""Training on several processes (DistributedDataParallel): batches split across ranks, the process group, the wrapper."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def global_batches(n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batches of a shuffled epoch, each split across ``world`` processes (this rank's share).

    The order is the one a DataLoader with ``shuffle=True`` and this generator gives, so one
    process sees the same global batches as ``world`` processes together.
    """
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if world == 1:
        return batches
    per = batch_size // world
    return [b[rank * per : (rank + 1) * per] for b in batches]


def training_processes(gpus: Any) -> int:
    """Processes for a job that asked for ``gpus``: one per GPU it sees (N > 1 trains with DDP), else one."""
    wanted = int(gpus or 0)
    if wanted <= 1 or not torch.cuda.is_available():
        return 1
    return max(1, min(wanted, torch.cuda.device_count()))


def process_group_backend(cuda: bool) -> str:
    """NCCL for the GPUs' tensors and gloo for the CPU's: the per-epoch loss sums, the SIGTERM
    flag and the range test's loss are small CPU tensors, which NCCL alone refuses ("No
    backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel(model: torch.nn.Module, world: int, dev: torch.device) -> torch.nn.Module:
    """The module to call in training: ``model`` itself, or its DDP wrapper on several processes."""
    if world == 1:
        return model
    if dev.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm needs CUDA; same parameters, same state-dict keys)
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

