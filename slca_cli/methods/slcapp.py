"""SLCA++ (arXiv 2408.08295, spec section 9): hybrid slow learner with LoRA, symmetric cross-entropy, and
alignment that shrinks sampled old-class features instead of their means."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..presets import RunConfig
from ..recipe import TrainingRecipe
from ..alignment import AlignmentRecipe
from ..protocol import task_of_class
from .base import Method, alignment_from_config, recipe_from_config
from .lora import inject_lora, lora_layers

# Backbone parameters the hybrid slow learner trains besides LoRA (matched against parameter names).
HYBRID_TRAINABLE = ("norm", "bias", "cls_token")


def shrink_old_samples(features: torch.Tensor, labels: torch.Tensor, class_task: torch.Tensor, current_task: int,
                       mu: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Scale each sample of class c by ``1 / (1 + s (T - t_c))`` with s ~ U(mu - 0.01, mu + 0.01) drawn per
    sample (mu 0.02: s in [0.01, 0.03]); current-task samples (t_c = T) are unchanged."""
    gap = (current_task - class_task.to(features.device)[labels]).to(features.dtype)
    s = mu + 0.02 * (torch.rand(len(labels), generator=generator, device=features.device,
                                dtype=features.dtype) - 0.5)
    return features / (1.0 + s * gap)[:, None]


def inference_scales(task_sizes: Sequence[int], mu: float) -> List[float]:
    """Fixed input scale of each head at inference after alignment: ``1 + mu (T - t)`` for head t."""
    current = len(task_sizes) - 1
    return [1.0 + mu * (current - t) for t in range(len(task_sizes))]


class SLCAPlusPlus(Method):
    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        if cfg.lora_rank > 0:
            inject_lora(backbone, cfg.lora_rank, cfg.lora_scale)
        return backbone

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        if task == 0:
            for layer in lora_layers(model.backbone):
                layer.init_from_svd()

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        lora, others = [], []
        for name, p in model.backbone.named_parameters():
            if ".lora_" in name:
                lora.append(p)
            elif any(part in name for part in HYBRID_TRAINABLE):
                others.append(p)
        lr_lora = (cfg.lr_lora_first if task == 0 else cfg.lr_lora) or cfg.lr_backbone
        groups = [{"params": lora, "lr": lr_lora}, {"params": others, "lr": cfg.lr_backbone},
                  {"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        return recipe_from_config(groups, cfg)

    def alignment(self, task_sizes: List[int], cfg: RunConfig) -> AlignmentRecipe:
        """Old-class samples shrunk towards the origin (``--sample-shrink``) instead of shrunk means."""
        recipe = alignment_from_config(cfg)
        if not cfg.sample_shrink:
            return recipe
        class_task = task_of_class(task_sizes)
        current = len(task_sizes) - 1
        recipe.sample_transform = lambda features, labels, generator: shrink_old_samples(
            features, labels, class_task, current, cfg.sample_shrink, generator)
        return recipe

    @torch.no_grad()
    def after_alignment(self, model: nn.Module, task_sizes: List[int], cfg: RunConfig) -> None:
        """Heads trained on shrunk samples see features scaled up by ``1 + mu (T - t)`` at inference; scaling
        a linear head's input equals scaling its weight (not its bias), so the scale is folded into the
        weights of the aligned heads (which the checkpoint stores)."""
        if not cfg.sample_shrink:
            return
        for head, scale in zip(model.task_heads, inference_scales(task_sizes, cfg.sample_shrink)):
            head.weight.mul_(scale)
