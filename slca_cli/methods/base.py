"""A method is a small policy the task loop consults; the default is the seed paper's slow learner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from torch import nn

from ..alignment import AlignmentRecipe
from ..errors import SlcaError
from ..presets import RunConfig
from ..recipe import TrainingRecipe
from .catalog import MethodSpec
from .losses import classification_loss

VIT_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens", "embed_dim")


class Method:
    """The hooks of one task loop (runner.run_seed); every hook's default is what seqft / sl / slca do. Name,
    label, presets and backbone needs are the method's catalog entry (``self.spec``, catalog.py).

    - ``task_sizes``: how the classes are split (``joint`` puts all in one task).
    - ``check_backbone``: refuse backbones the method cannot use, before anything is written.
    - ``wrap_backbone``: add the method's parameters (prompts, LoRA); they live under ``backbone.`` in
      model.safetensors, so checkpoints, ``slca eval`` and ``--resume`` rebuild them from the folder alone.
    - ``start_task``: per-task state (which E-prompt trains, LoRA initialization).
    - ``before_stage1``: prepare what trains from the task's training images, before stage 1 (InfLoRA designs its
      LoRA down-projection from them).
    - ``recipe``: which parameters train at what lr, optimizer, schedule, loss.
    - ``alignment`` / ``after_alignment``: how classifier alignment runs, and what follows it.
    - ``after_stage1``: change the model after stage 1, before anything reads its features (CoFiMA merges the
      backbone with the previous task's; APER switches to its two-branch features).
    - ``trains`` / ``fit_classifier``: methods whose classifier is computed, not trained (simplecil, ranpac) skip
      stage 1 and set the heads from the class statistics or a feature pass.
    - ``class_covariances``: whether the class statistics include covariances (alignment needs them); a method
      whose features are very wide and whose classifier reads only the means turns them off (EASE).
    The tensors ``after_stage1`` and ``fit_classifier`` return are kept in each task's stats.safetensors
    (``method.*``) and handed back next task (also after ``--resume``); by default they pass on what they got.
    """

    def __init__(self, spec: MethodSpec):
        self.spec = spec
        self.name = spec.name

    def task_sizes(self, sizes: List[int], num_classes: int) -> List[int]:
        return sizes

    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        """Settings that depend on the resolved run (e.g. the number of tasks)."""
        return cfg

    def check_backbone(self, backbone_name: str, build_probe: Callable[[], Optional[nn.Module]]) -> None:
        """``build_probe()`` gives the backbone without weights (on the meta device) for inspection."""
        if self.spec.needs_vit:
            require_vit(self.name, backbone_name, build_probe())

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        return backbone

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        pass

    def before_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: "Stage1Inputs") -> None:
        """Before stage 1 of a task that trains, after ``start_task``: ``inputs`` as ``after_stage1`` gets them (the
        task's fixed-draw training views, the state kept from the last task). Changes the model only; must be
        deterministic, since --resume (also mid-task) runs it again. Default: nothing."""

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        """The whole backbone at ``lr_backbone`` (0 = frozen, kept in eval mode) and the current head."""
        groups = [{"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        if cfg.lr_backbone > 0:
            groups.insert(0, {"params": list(model.backbone.parameters()), "lr": cfg.lr_backbone})
        frozen = (model.backbone,) if cfg.lr_backbone == 0 else ()
        return recipe_from_config(groups, cfg, frozen_modules=frozen)

    def class_covariances(self, cfg: RunConfig) -> bool:
        """False: the class statistics hold means only (``chol`` is stored as a (classes, 0, 0) tensor)."""
        return True

    def alignment(self, task_sizes: List[int], cfg: RunConfig) -> AlignmentRecipe:
        """Classifier alignment over the seen classes (``task_sizes``; the last is the current task)."""
        return alignment_from_config(cfg)

    def after_alignment(self, model: nn.Module, task_sizes: List[int], cfg: RunConfig) -> None:
        pass

    def after_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: "Stage1Inputs"
                     ) -> Dict[str, torch.Tensor]:
        """After stage 1 of a task that trains, before the class statistics; returns the state to keep."""
        return inputs.state

    def trains(self, task: int, cfg: RunConfig) -> bool:
        """Whether stage 1 (``learner.fit_task``) runs in this task."""
        return True

    def fit_classifier(self, model: nn.Module, task: int, cfg: RunConfig, inputs: "ClassifierInputs"
                       ) -> Dict[str, torch.Tensor]:
        """Set heads after the class statistics of ``task``; returns the state to store (default: what it got)."""
        return inputs.state


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


@dataclass
class Stage1Inputs:
    """What ``Method.before_stage1`` and ``Method.after_stage1`` may use: the task's training images under the train
    transform with fixed draws (``train_views()``: the same images, crops and order under any number of processes),
    the accelerator, the first label of the task, the state kept from the last task, the run's log and whether to
    show progress."""

    train_views: Callable[[], Any]
    accelerator: Any
    offset: int
    state: Dict[str, torch.Tensor] = field(default_factory=dict)
    log: Callable[[str], None] = print
    show_progress: bool = False


def recipe_from_config(groups, cfg: RunConfig, **changes) -> TrainingRecipe:
    """A recipe over explicit parameter groups with the run's optimizer, schedule, clipping and loss settings."""
    values = dict(groups=groups, epochs=cfg.epochs, optimizer=cfg.optimizer, momentum=cfg.momentum,
                  weight_decay=cfg.weight_decay, schedule=cfg.schedule, lr_drop_epoch=cfg.lr_drop_epoch,
                  min_lr=cfg.min_lr, grad_clip=cfg.grad_clip, loss=classification_loss(cfg), freeze_bn=cfg.freeze_bn)
    values.update(changes)
    return TrainingRecipe(**values)


def alignment_from_config(cfg: RunConfig, **changes) -> AlignmentRecipe:
    """The run's alignment settings (spec section 5); momentum and weight decay are stage 1's."""
    values = dict(epochs=cfg.ca_epochs, samples_per_class=cfg.ca_samples, batch_size=cfg.ca_batch_size,
                  lr=cfg.ca_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, tau=cfg.tau,
                  logit_norm=cfg.logit_norm, mean_scaling=cfg.mean_scaling, mode=cfg.align_mode)
    values.update(changes)
    return AlignmentRecipe(**values)


def is_vit(module: nn.Module) -> bool:
    return all(hasattr(module, part) for part in VIT_PARTS)


def require_vit(method: str, backbone_name: str, module: Optional[nn.Module]) -> None:
    """Refuse a backbone without transformer blocks (``module`` None: not inspectable here, checked later)."""
    if module is not None and not is_vit(module):
        raise SlcaError(f"--method {method} needs a ViT backbone (it changes transformer blocks); {backbone_name} "
                        f"is a {type(module).__name__}: use --backbone vit-b16-in21k (or vit-tiny-test for a "
                        f"smoke run)")
