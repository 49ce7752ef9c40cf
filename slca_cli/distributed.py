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
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

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
    processes of this node, one core left for each process's main loop, at most 8; none where that leaves fewer
    than 2 (one worker beside the main loop on 2 cores doubled the wall time of `slca demo`: the forked worker
    competes for the cores and every page the trainer writes meanwhile is copied)."""
    if tensor_data:
        return 0
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(8, cores // max(local, 1) - 1)
    return workers if workers >= 2 else 0


LAUNCHED_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU")


def _flag_value(argv: List[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _default_accelerate_config() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "accelerate" / "default_config.yaml"


class Relaunch(NamedTuple):
    """``slca train`` re-run under ``accelerate launch``: the full command line and the config it uses."""

    argv: List[str]
    config_file: Path


def launcher_command(argv: List[str]) -> Optional[Relaunch]:
    """``slca train`` started outside a launcher with an accelerate config (``--accelerate-config FILE``, or
    accelerate's default config when it asks for several processes): the same command under ``accelerate
    launch --config_file FILE``. None when it should simply run here."""
    if len(argv) < 2 or argv[1] != "train" or any(k in os.environ for k in LAUNCHED_ENV):
        return None
    explicit = _flag_value(argv, "--accelerate-config")
    if explicit is not None and explicit.lower() == "none":
        return None
    path = Path(explicit).expanduser() if explicit else _default_accelerate_config()
    if not path.is_file():
        if explicit:
            raise SlcaError(f"--accelerate-config {explicit} does not exist; write one with `accelerate config "
                            f"--config_file {explicit}` or drop the flag")
        return None
    try:
        import yaml
        config = yaml.safe_load(path.read_text()) or {}
    except Exception as exc:  # yaml raises many kinds of parse errors
        raise SlcaError(f"accelerate config {path} is not readable YAML/JSON ({exc.__class__.__name__}); fix it, "
                        f"or pass --accelerate-config none") from None
    if not isinstance(config, dict):
        if explicit:
            raise SlcaError(f"--accelerate-config {explicit} is not an accelerate config (a YAML mapping such as "
                            f"`accelerate config --config_file FILE` writes); fix it, or pass --accelerate-config none")
        return None
    try:
        processes = int(config.get("num_processes") or 1)
    except (TypeError, ValueError):
        raise SlcaError(f"accelerate config {path}: num_processes {config.get('num_processes')!r} is not a number; "
                        f"fix it, or pass --accelerate-config none") from None
    if not explicit and processes <= 1:
        return None
    return Relaunch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "-m", "slca_cli",
                     *argv[1:]], path)
