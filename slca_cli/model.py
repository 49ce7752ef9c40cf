"""Backbone + per-task linear heads; logits over all seen classes are the heads' outputs concatenated."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class ContinualModel(nn.Module):
    """``task_heads[t]`` scores the classes of task ``t``; earlier heads are frozen while a later task trains."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.task_heads = nn.ModuleList()

    @property
    def num_seen_classes(self) -> int:
        return sum(h.out_features for h in self.task_heads)

    def add_head(self, num_classes: int) -> nn.Linear:
        """A new head: truncated normal weights (std 0.02), zero bias, as in the authors' code."""
        head = nn.Linear(self.head_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        device = next(self.backbone.parameters()).device
        self.task_heads.append(head.to(device))
        return head

    @property
    def head_input(self) -> Optional[nn.Module]:
        """A method's fixed map from features to what the heads read (RanPAC's random projection), kept as
        ``backbone.head_input`` so that it is saved and rebuilt with the backbone; None: the features themselves."""
        project = getattr(self.backbone, "head_input", None)
        return project if project is not None and getattr(project, "active", True) else None

    @property
    def head_dim(self) -> int:
        return self.feature_dim if self.head_input is None else int(self.head_input.out_features)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def logits(self, features: torch.Tensor, head: Optional[int] = None) -> torch.Tensor:
        if self.head_input is not None:
            features = self.head_input(features)
        if head is not None:
            return self.task_heads[head](features)
        return torch.cat([h(features) for h in self.task_heads], dim=1)

    @property
    def scores_images(self) -> bool:
        """Whether the backbone classifies test images itself (``backbone.test_logits(images, model)``: MOS encodes
        each image again with the adapter it retrieves) instead of the heads reading one feature vector."""
        return callable(getattr(self.backbone, "test_logits", None))

    def forward(self, images: torch.Tensor, head: Optional[int] = None) -> torch.Tensor:
        if head is None and not self.training and self.scores_images:
            return self.backbone.test_logits(images, self)
        return self.logits(self.features(images), head)

    def head_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.task_heads.state_dict().items()}

    def load_head_state(self, state: Dict[str, torch.Tensor]) -> None:
        self.task_heads.load_state_dict(state)


def replace_final_norm(backbone: nn.Module) -> None:
    """The authors' quirk: drop the pre-trained final LayerNorm for a fresh one (weight 1, bias 0, eps 1e-5)."""
    norm = getattr(backbone, "norm", None)
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError("--fresh-norm needs a backbone with a final LayerNorm `norm` (a ViT); use --keep-norm")
    backbone.norm = nn.LayerNorm(norm.normalized_shape, eps=1e-5).to(norm.weight.device)


def freeze_batchnorm_statistics(module: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode, so a training step normalizes with, and leaves unchanged, its
    running statistics; the affine weights still learn. Returns the number of layers frozen."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)
