"""CPU threads for torch: the cores this process may run on (its affinity mask: a SLURM or container CPU set, not
the whole machine), shared among the processes of one node, unless ``--threads N`` says otherwise."""
from __future__ import annotations

import os
from typing import Optional

from .errors import SlcaError


def available_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that does not exist)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores: Optional[int] = None, local_processes: Optional[int] = None) -> int:
    """``cores`` shared among the training processes of this node (``LOCAL_WORLD_SIZE`` under accelerate launch /
    torchrun), at least one each."""
    cores = available_cores() if cores is None else cores
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_processes))


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``threads`` (``--threads``) or ``default_threads()``; returns the number."""
    if threads is not None and threads < 1:
        raise SlcaError(f"--threads must be 1 or more (threads per process), got {threads}")
    import torch
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def quiet_waits(environ=os.environ) -> bool:
    """OpenMP threads that wait for work sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless the user
    set a wait setting: spinning threads on a shared CPU burn the cores their peers need (benchmarks/README.md,
    bench_threads). Takes effect only before torch is imported (the OpenMP runtime reads it when it loads), so
    ``slca``'s entry point calls it first."""
    if any(name in environ for name in WAIT_SETTINGS):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
