"""APER (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024; ADAM in its first version), fine-tuning variant: the whole backbone is
adapted on the first task only (a cosine classifier, SGD, cosine schedule), then frozen; every class's prototype
is the mean of the concatenated features of the pre-trained and the adapted backbone, and the classifier is
cosine similarity to the prototypes (SimpleCIL on the concatenation). Sources: CONTRIBUTING.md, "Methods".
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..presets import RunConfig
from ..recipe import TrainingRecipe
from .base import Stage1Inputs, recipe_from_config
from .simplecil import SimpleCIL


class DualBranch(nn.Module):
    """The pre-trained backbone (frozen, ``pretrained``) beside its adapted copy (``adapted``); features are
    their concatenation, ``[pre-trained, adapted]``, except while the first task adapts (the adapted branch's
    alone). Both branches are saved under ``backbone.``, so a run folder rebuilds the model alone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.adapted = backbone
        self.pretrained = copy.deepcopy(backbone).requires_grad_(False)
        self.branch_features = int(backbone.num_features)
        self.num_features = 2 * self.branch_features
        self.adapting = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.adapting:
            return self.adapted(images)
        return torch.cat([self.pretrained(images), self.adapted(images)], dim=1)


class CosineHead(nn.Module):
    """The first task's training classifier: ``sigma * cos(feature, w_c)`` with a learned scale (init 1)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.sigma = nn.Parameter(torch.ones(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()


class APER(SimpleCIL):
    """Stage 1 on the first task only; every task's head is set from its prototypes (SimpleCIL's hook)."""

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        return DualBranch(backbone)

    def trains(self, task: int, cfg: RunConfig) -> bool:
        return task == 0

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        """The first task trains the adapted branch with a cosine head on its own features."""
        if task == 0:
            model.backbone.adapting = True
            device = model.task_heads[0].weight.device
            model.task_heads[0] = CosineHead(model.backbone.branch_features, cfg.task_sizes[0]).to(device)

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        """The adapted branch at ``lr_backbone`` and the cosine head at ``lr_head``; the pre-trained branch stays
        frozen (and in eval mode)."""
        groups = [{"params": list(model.backbone.adapted.parameters()), "lr": cfg.lr_backbone},
                  {"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        return recipe_from_config(groups, cfg, frozen_modules=(model.backbone.pretrained,))

    def after_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: Stage1Inputs
                     ) -> Dict[str, torch.Tensor]:
        """Adaptation done: features become the concatenation (for the statistics that give the prototypes) and
        the cosine training head gives way to a prototype head (SimpleCIL's ``fit_classifier`` fills it)."""
        model.backbone.adapting = False
        device = model.task_heads[task].weight.device
        model.task_heads[task] = nn.Linear(model.feature_dim, cfg.task_sizes[task]).to(device)
        model.task_heads.requires_grad_(False)
        return inputs.state
