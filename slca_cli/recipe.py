"""How stage 1 optimizes one task: parameter groups, optimizer, schedule, loss, clipping, frozen modules."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .presets import CHOICES, DEFAULTS


@dataclass
class TrainingRecipe:
    """Everything the stage-1 loop needs to know about a method; the loop itself stays the same for all.

    Defaults are RunConfig's (the paper's). ``groups`` are torch parameter groups (each with its ``lr``); only
    their parameters train, for ``epochs`` epochs. The schedule steps once per epoch: ``step`` divides every lr by
    10 after ``lr_drop_epoch`` epochs, ``cosine`` anneals to ``min_lr`` over the task, ``constant`` keeps it. ``frozen_modules`` stay in eval mode while training,
    so a frozen backbone's BatchNorm statistics and dropout do not move either; ``freeze_bn`` keeps every
    BatchNorm's running statistics (CNN backbones).
    """

    groups: List[Dict[str, Any]]
    epochs: int = DEFAULTS["epochs"]
    optimizer: str = DEFAULTS["optimizer"]
    momentum: float = DEFAULTS["momentum"]
    weight_decay: float = DEFAULTS["weight_decay"]
    schedule: str = DEFAULTS["schedule"]
    lr_drop_epoch: Optional[int] = DEFAULTS["lr_drop_epoch"]
    min_lr: float = DEFAULTS["min_lr"]
    grad_clip: Optional[float] = DEFAULTS["grad_clip"]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    frozen_modules: Sequence[nn.Module] = field(default_factory=tuple)
    freeze_bn: bool = DEFAULTS["freeze_bn"]

    def parameters(self) -> Iterator[nn.Parameter]:
        for group in self.groups:
            yield from group["params"]

    def mark_trainable(self, model: nn.Module) -> None:
        """Freeze everything, then unfreeze exactly the parameters of the groups."""
        model.requires_grad_(False)
        for p in self.parameters():
            p.requires_grad_(True)

    def make(self):
        """(optimizer, per-epoch scheduler)."""
        epochs = self.epochs
        groups = [dict(g, params=list(g["params"])) for g in self.groups if len(list(g["params"]))]
        fused = fused_supported(groups, self.optimizer)
        if self.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=self.momentum,
                                        weight_decay=self.weight_decay, **fused)
        elif self.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, lr=groups[0]["lr"], betas=(0.9, 0.999),
                                         weight_decay=self.weight_decay, **fused)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(CHOICES['optimizer'])}")
        if self.schedule == "step":
            milestones = [self.lr_drop_epoch] if self.lr_drop_epoch and self.lr_drop_epoch < epochs else []
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        elif self.schedule == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1),
                                                                  eta_min=self.min_lr)
        elif self.schedule == "constant":
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
        else:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(CHOICES['schedule'])}")
        return optimizer, schedule


def fused_supported(groups: List[Dict[str, Any]], optimizer: str = "sgd") -> Dict[str, bool]:
    """``{"fused": True}`` when every parameter is a floating-point CUDA tensor (one kernel per step for all
    parameters) and this torch has the fused ``optimizer`` there, else nothing: CPU runs keep the default
    implementation, so their results stay as they were."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_cuda and p.is_floating_point() for p in params) \
            and fused_optimizer_supported(optimizer, params[0].device):
        return {"fused": True}
    return {}


@functools.lru_cache(maxsize=None)
def fused_optimizer_supported(optimizer: str, device: torch.device) -> bool:
    """Whether this torch builds and steps the fused kernel of ``optimizer`` (sgd, adam) on ``device``: torch>=2.1
    is allowed, and ``SGD(fused=True)`` is younger than that (an unknown keyword there, a RuntimeError where a
    device has no kernel)."""
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
            "adam": lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True)}[optimizer]
    try:
        param = nn.Parameter(torch.ones(2, device=device))
        param.grad = torch.ones_like(param)
        make([param]).step()
    except (TypeError, RuntimeError, ValueError):
        return False
    return True
