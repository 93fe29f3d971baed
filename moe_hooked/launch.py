"""Start the `torch.distributed` process group of a run launched by `torchrun`.

`torchrun` (or any launcher that sets the same environment: `RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) starts one process per GPU or per CPU share;
:func:`process_group_from_env` joins them into a process group, with NCCL on GPUs (rank `r`
uses `cuda:{LOCAL_RANK}`) and gloo on CPUs. What runs inside is ordinary code: the corpus
analyses split their batches across the group by themselves (:mod:`moe_hooked.corpus`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0
"""How long a rank waits for the others at a synchronisation point before failing (torch's
default). A rank that raises tells the others at once; this bounds the wait when a rank is lost
without a word (killed, hung)."""


class LaunchError(ValueError):
    """The launch asks for something this machine cannot do (e.g. CUDA without a GPU)."""


@dataclass(frozen=True)
class Launch:
    """How this process runs: `device` for the model (None: the caller's default), `backend`
    of the process group ("gloo", "nccl", or "none" without one), `rank` and `world_size`."""

    device: str | None
    backend: str
    rank: int = 0
    world_size: int = 1


def launched_by_torchrun() -> bool:
    """True when the environment names this process's rank and the group's size."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def process_group_from_env(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Launch]:
    """Join the process group described by the environment (set by `torchrun`) for the `with`
    body, then leave it; outside `torchrun` (or if a group already exists) change nothing.

    `device`: "cpu", "cuda" (or None: CUDA if available, else the CPU). On CUDA, rank `r` uses
    `cuda:{LOCAL_RANK}` (any index given is replaced) and the group uses NCCL; on the CPU, gloo.
    `timeout_s` bounds every wait for another rank.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield _current(device)
        return
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError(f"device '{device}' was asked for but CUDA is not available here: use --device cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield Launch(device, backend, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def _current(device: str | None) -> Launch:
    if dist.is_available() and dist.is_initialized():
        return Launch(device, str(dist.get_backend()), dist.get_rank(), dist.get_world_size())
    return Launch(device, "none")
