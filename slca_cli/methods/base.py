"""A method is a small policy the task loop consults; the default is the seed paper's slow learner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..presets import RunConfig
from ..recipe import TrainingRecipe
from .losses import classification_loss


class Method:
    """The hooks of one task loop (runner.run_seed); every hook's default is what seqft / sl / slca do.

    - ``task_sizes``: how the classes are split (``joint`` puts all in one task).
    - ``check_backbone``: refuse backbones the method cannot use, before anything is written.
    - ``wrap_backbone``: add the method's parameters (prompts, LoRA); they live under ``backbone.`` in
      model.safetensors, so checkpoints, ``slca eval`` and ``--resume`` rebuild them from the folder alone.
    - ``start_task``: per-task state (which E-prompt trains, LoRA initialization).
    - ``recipe``: which parameters train at what lr, optimizer, schedule, loss (None = the paper's SGD).
    - ``sample_transform`` / ``after_alignment``: changes to classifier alignment.
    - ``trains`` / ``fit_classifier``: methods whose classifier is computed, not trained (simplecil, ranpac) skip
      stage 1 and set the heads from the class statistics or a feature pass; the tensors they return are kept in
      each task's stats.safetensors (``method.*``) and handed back next task (also after ``--resume``).
    """

    name = "slca"
    label = "SLCA"
    description = "slow learner (backbone lr 1e-4, head 1e-2) + classifier alignment"

    def task_sizes(self, sizes: List[int], num_classes: int) -> List[int]:
        return sizes

    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        """Settings that depend on the resolved run (e.g. the number of tasks)."""
        return cfg

    def check_backbone(self, backbone_name: str, build_probe: Callable[[], nn.Module]) -> None:
        """``build_probe()`` gives the backbone without weights (on the meta device) for inspection."""

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        return backbone

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        pass

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> Optional[TrainingRecipe]:
        """The whole backbone at ``lr_backbone`` (0 = frozen, kept in eval mode) and the current head."""
        groups = [{"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        if cfg.lr_backbone > 0:
            groups.insert(0, {"params": list(model.backbone.parameters()), "lr": cfg.lr_backbone})
        frozen = (model.backbone,) if cfg.lr_backbone == 0 else ()
        return recipe_from_config(groups, cfg, frozen_modules=frozen)

    def sample_transform(self, task_sizes: List[int], cfg: RunConfig
                         ) -> Optional[Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]]:
        """``f(features, labels, generator) -> features`` applied to every batch of sampled features."""
        return None

    def after_alignment(self, model: nn.Module, task_sizes: List[int], cfg: RunConfig) -> None:
        pass

    def trains(self, task: int, cfg: RunConfig) -> bool:
        """Whether stage 1 (``learner.fit_task``) runs in this task."""
        return True

    def fit_classifier(self, model: nn.Module, task: int, cfg: RunConfig, inputs: "ClassifierInputs"
                       ) -> Dict[str, torch.Tensor]:
        """Set heads after the class statistics of ``task``; returns the state to store (default: none)."""
        return {}


@dataclass
class ClassifierInputs:
    """What ``Method.fit_classifier`` may use: this task's class means, a fresh pass over this process's shard of
    the task's training images under the test transform (``batches()`` -> (features, labels)), the accelerator
    (all-reduce, gather), the first label of the task, the state returned last task, and the run's log."""

    task_means: torch.Tensor
    batches: Callable[[], Iterator[Tuple[torch.Tensor, torch.Tensor]]]
    accelerator: Any
    offset: int
    state: Dict[str, torch.Tensor] = field(default_factory=dict)
    log: Callable[[str], None] = print


def recipe_from_config(groups, cfg: RunConfig, **changes) -> TrainingRecipe:
    """A recipe over explicit parameter groups with the run's optimizer, schedule, clipping and loss settings."""
    values = dict(groups=groups, optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                  schedule=cfg.schedule, lr_drop_epoch=cfg.lr_drop_epoch, min_lr=cfg.min_lr,
                  grad_clip=cfg.grad_clip, loss=classification_loss(cfg))
    values.update(changes)
    return TrainingRecipe(**values)
