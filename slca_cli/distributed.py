"""Data-parallel passes without duplicates: each process reads its own strided shard, results are summed.

accelerate's prepared data loaders pad the last batch with repeated samples so every process gets the same
number of batches (``even_batches``); that suits training (DDP needs matching steps) but would count some
samples twice in statistics and evaluation. The feature passes therefore shard the data themselves: process
``r`` of ``w`` reads items ``r, r + w, r + 2w, ...`` with no padding, so every sample is read exactly once
whatever the shard sizes, and per-class sums (statistics, correct/total counts) are all-reduced afterwards.
No collective runs inside these passes, so unequal batch counts per process cannot hang.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import SlcaError


def shard_indices(num_items: int, rank: int, world: int) -> range:
    """Items ``rank, rank + world, ...``: the shards of all processes partition ``range(num_items)``."""
    return range(rank, num_items, world)


class ProcessShard(Dataset):
    """The items of ``dataset`` that process ``rank`` of ``world`` reads in a feature pass."""

    def __init__(self, dataset: Dataset, rank: int, world: int):
        self.dataset, self.indices = dataset, shard_indices(len(dataset), rank, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def process_loader(loader, accelerator):
    """This process's shard of an evaluation/statistics ``loader`` (a DataLoader or an on-device loader)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if hasattr(loader, "for_process"):
        return loader.for_process(rank, world)
    if world == 1:
        return loader
    return DataLoader(ProcessShard(loader.dataset, rank, world), batch_size=loader.batch_size, shuffle=False,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=False)


def sum_across_processes(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all processes (the tensor itself with one process)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.contiguous(), reduction="sum")


def check_batch_split(batch_size: int, num_processes: int) -> None:
    """The global batch (``--batch-size``) is split evenly across processes, as in a one-process run."""
    if num_processes > 1 and batch_size % num_processes:
        raise SlcaError(f"--batch-size {batch_size} is the global batch and must split evenly across the "
                        f"{num_processes} processes; choose a multiple of {num_processes}")


def workers_per_process(tensor_data: bool, local_processes: Optional[int] = None) -> int:
    """Loader workers for one process: none for generated tensors, else the machine's cores shared among the
    processes of this node, one core left for each process's main loop, at most 8."""
    if tensor_data:
        return 0
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(local, 1) - 1))
