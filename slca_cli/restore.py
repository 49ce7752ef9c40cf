"""Models and resume points rebuilt from a run folder alone: `slca eval`, `slca probe` and `--resume` share them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .backbones import BackboneSpec, get_backbone

from .checkpoint import (MODEL_FILE, STATS_FILE, TaskState, check_tensor_file, intact_tasks, load_tensors,
                         read_state)
from .data import DatasetSplits
from .drift import compensate
from .errors import SlcaError
from .methods import get_method
from .model import ContinualModel, replace_final_norm
from .presets import IDENTITY_FIELDS, RunConfig
from .resolve import load_data_for
from .speed import compile_backbone, enable_fused_attention
from .statistics import cholesky_factors
from .validation import stored_data_root

Tensors = Dict[str, torch.Tensor]


def build_model(cfg: RunConfig, spec: BackboneSpec, pretrained: bool, seed: int) -> ContinualModel:
    """The backbone (pre-trained weights when ``pretrained``), the method's additions, no heads yet."""
    torch.manual_seed(seed)
    backbone = spec.build(cfg.weights, pretrained)
    if cfg.fresh_norm:
        try:
            replace_final_norm(backbone)
        except ValueError as exc:
            raise SlcaError(str(exc)) from None
    enable_fused_attention(backbone)
    backbone = get_method(cfg.method).wrap_backbone(backbone, cfg)
    if cfg.compile:
        compile_backbone(backbone)
    return ContinualModel(backbone, int(backbone.num_features))


def restore_model(task_dir: Path, *, cfg: Optional[RunConfig] = None, stage1_heads: bool = False,
                  opened: Optional[Tuple[TaskState, Tensors]] = None) -> Tuple[ContinualModel, TaskState]:
    """The model of a finished task folder: built without pre-trained weights by the stored RunConfig (compile
    off) or by ``cfg`` (a resuming run's), every head up to the task, the weights of model.safetensors.
    ``stage1_heads``: the heads as stage 1 left them, instead of the aligned ones. ``opened``: the state and
    model tensors already read (and hashed) by the caller; else both tensor files are checked here."""
    if opened is None:
        state = read_state(task_dir)
        tensors = load_tensors(task_dir, MODEL_FILE, state)
        check_tensor_file(task_dir, STATS_FILE, state)  # not needed to score, but a damaged folder is reported
    else:
        state, tensors = opened
    cfg = (cfg or state.config.replace(compile=False)).replace(weights=None)
    model = build_model(cfg, get_backbone(cfg.backbone), pretrained=False, seed=0)
    for size in state.seen_sizes:
        model.add_head(size)
    prefix = "stage1_heads." if stage1_heads else "task_heads."
    weights = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    weights.update({"task_heads." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    model.load_state_dict(weights)
    return model, state


@dataclass
class ResumePoint:
    """What the finished tasks of a run folder hand to the next one."""

    start_task: int = 0
    counts: List[Dict[str, List[int]]] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    memory: List[float] = field(default_factory=list)
    train_loss: List[List[float]] = field(default_factory=list)
    means: List[torch.Tensor] = field(default_factory=list)
    chols: List[torch.Tensor] = field(default_factory=list)
    last: Optional[Tuple[TaskState, Tensors]] = None  # the last finished task's state and model tensors
    state_sha256: Optional[str] = None  # the last finished task's state checksum: the next one links to it
    method_state: Tensors = field(default_factory=dict)  # what Method.fit_classifier returned after it


def check_same_experiment(stored: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    before, now = stored.to_dict(), cfg.to_dict()
    diffs = [f"{k}={before[k]!r} (now {now[k]!r})" for k in IDENTITY_FIELDS if before[k] != now[k]]
    if diffs:
        raise SlcaError(f"--resume: {run_dir} is another experiment: {'; '.join(diffs[:4])}; pass the same flags "
                        f"as that run or choose another --out")


def find_resume_point(run_dir: Path, cfg: RunConfig, log: Callable[[str], None]) -> ResumePoint:
    """The last intact task folder (falling back past damaged ones) and the statistics of all before it; every
    tensor file is read and hashed once."""
    warnings: List[str] = []
    point = ResumePoint()
    for state, tensors in intact_tasks(run_dir, warnings, load=(MODEL_FILE, STATS_FILE)):
        stats = tensors[STATS_FILE]
        if "drift" in stats:  # --drift-compensation: this task moved the earlier Gaussians
            point.means, point.chols = compensate(stats["drift"], point.means, point.chols)
        point.means.append(stats["means"])
        point.chols.append(stats["chol"] if "chol" in stats else cholesky_factors(stats["covs"]))  # older: covs
        point.last = (state, tensors[MODEL_FILE])
        point.method_state = {k[len("method."):]: v for k, v in stats.items() if k.startswith("method.")}
    for warning in warnings:
        log(f"warning: {warning}")
    if point.last is None:
        return ResumePoint()
    state = point.last[0]
    check_same_experiment(state.config, cfg, run_dir)
    point.start_task = state.task + 1
    point.counts, point.seconds, point.memory = state.counts, state.seconds, state.peak_memory_mb
    point.train_loss = state.train_loss
    point.state_sha256 = state.raw.get("state_sha256")
    log(f"resuming {run_dir} after {state.task_dir.name} ({point.start_task}/{cfg.num_tasks} tasks done)")
    return point


def checkpoint_data(state: TaskState, data_root: Optional[str]) -> DatasetSplits:
    """The data of a finished task: --data-root, else the validated root recorded at training time; the file-list
    checksum must equal the one the task was trained on."""
    cfg = state.config
    if "sources" in state.raw:  # a continued run: its classes came from several folders (grow.py)
        from .grow import data_for_state
        data = data_for_state(state, data_root)
    else:
        root = data_root if data_root is not None else stored_data_root(cfg, state.task_dir / "state.json")
        data = load_data_for(cfg, root)
    if not data.matches(state.data_fingerprint):
        raise SlcaError(f"the data under {data.root or cfg.dataset} differs from the data this checkpoint was "
                        f"trained on (file list checksum); point --data-root at the same files")
    return data


@dataclass
class ScoredCheckpoint:
    """What `slca eval` and `slca probe` start from: a finished task's model on the device, its state, the data."""

    model: ContinualModel
    state: TaskState
    data: DatasetSplits
    accelerator: object


def open_checkpoint(task_dir: Path, data_root: Optional[str], device: str) -> ScoredCheckpoint:
    """The model of a task folder on ``device`` (at the run's precision) and the very data it was trained on."""
    from .speed import make_accelerator
    model, state = restore_model(task_dir)
    data = checkpoint_data(state, data_root)
    accelerator = make_accelerator(device, state.config.precision)
    model.to(accelerator.device)
    return ScoredCheckpoint(model, state, data, accelerator)
