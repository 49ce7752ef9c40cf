"""APER (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024; ADAM in its first version): a copy of the backbone is adapted on the first
task only (a cosine classifier, SGD, cosine schedule), then frozen; every class's prototype is the mean of the
concatenated features of the pre-trained and the adapted backbone, and the classifier is cosine similarity to the
prototypes (SimpleCIL on the concatenation). ``--aper-variant`` says what adapts: the whole backbone (finetune),
AdaptFormer adapters (adapter, methods/adapters.py), SSF scales and shifts (ssf) or deep visual prompts (vpt); the
rest of the adapted copy stays frozen. Sources: CONTRIBUTING.md, "Methods".
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlcaError
from ..presets import RunConfig
from ..recipe import TrainingRecipe
from .adapters import adapter_parameters, inject_adapters, set_active
from .base import Stage1Inputs, is_vit, recipe_from_config
from .prompts import embed_tokens
from .simplecil import SimpleCIL
from .ssf import inject_ssf, ssf_parameters

# The adapter variant's AdaptFormer adapters: output scale and dropout as LAMDA-PILOT builds its *_adapter backbones
# (utils/inc_net.py tuning_config ffn_adapter_scalar "0.1"; backbone/vit_adapter.py Block: Adapter(dropout=0.1)).
ADAPTER_SCALE = 0.1
ADAPTER_DROPOUT = 0.1


class DualBranch(nn.Module):
    """The pre-trained backbone (frozen, ``pretrained``) beside its adapted copy (``adapted``: the backbone itself,
    or a copy with adapters, SSF layers or deep prompts); features are their concatenation, ``[pre-trained,
    adapted]``, except while the first task adapts (the adapted branch's alone). Both branches are saved under
    ``backbone.``, so a run folder rebuilds the model alone."""

    def __init__(self, pretrained: nn.Module, adapted: nn.Module):
        super().__init__()
        self.adapted = adapted
        self.pretrained = pretrained.requires_grad_(False)
        self.branch_features = int(pretrained.num_features)
        self.num_features = 2 * self.branch_features
        self.adapting = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.adapting:
            return self.adapted(images)
        return torch.cat([self.pretrained(images), self.adapted(images)], dim=1)


class DeepPrompts(nn.Module):
    """VPT-deep (Jia et al., "Visual Prompt Tuning", ECCV 2022) as LAMDA-PILOT's ``convs/vpt.py`` builds it:
    ``length`` learned tokens (zeros at first, no position embedding) appended to the sequence before every block
    and dropped after it; the frozen ViT's own norm and pooling give the feature."""

    def __init__(self, vit: nn.Module, length: int):
        super().__init__()
        self.vit = vit
        self.num_features = int(vit.num_features)
        device = next(vit.parameters()).device
        self.prompts = nn.Parameter(torch.zeros(len(vit.blocks), length, int(vit.embed_dim), device=device))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.norm_pre(embed_tokens(self.vit, images))
        tokens = x.shape[1]
        for block, prompt in zip(self.vit.blocks, self.prompts):
            x = block(torch.cat([x, prompt.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1))[:, :tokens]
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)


def check_vit(backbone: Optional[nn.Module], cfg: RunConfig) -> None:
    """The adapter, ssf and vpt variants change transformer blocks (None: not inspectable, checked when built)."""
    if backbone is not None and not is_vit(backbone):
        raise SlcaError(f"--aper-variant {cfg.aper_variant} changes transformer blocks; {cfg.backbone} is a "
                        f"{type(backbone).__name__}: use a ViT backbone or --aper-variant finetune")


def adapted_copy(backbone: nn.Module, cfg: RunConfig) -> nn.Module:
    """A copy of ``backbone`` with what ``cfg.aper_variant`` (adapter, ssf, vpt) trains added to it."""
    variant = cfg.aper_variant
    check_vit(backbone, cfg)
    adapted = copy.deepcopy(backbone)
    if variant == "ssf":
        inject_ssf(adapted)
        return adapted
    if variant == "vpt":
        return DeepPrompts(adapted, cfg.prompt_length)
    if variant == "adapter":  # one adapter per block, always on
        inject_adapters(adapted, cfg.adapter_bottleneck, ADAPTER_SCALE, count=1, dropout=ADAPTER_DROPOUT)
        set_active(adapted, 0)
        return adapted
    raise SlcaError(f"--aper-variant {variant} is not built; use finetune, adapter, ssf or vpt")


def adapted_parameters(adapted: nn.Module, cfg: RunConfig) -> List[nn.Parameter]:
    """What trains on the first task: every parameter (finetune), the adapters (adapter), the scales and shifts
    (ssf), the prompts (vpt)."""
    if cfg.aper_variant == "adapter":
        return adapter_parameters(adapted, 0)
    if cfg.aper_variant == "ssf":
        return list(ssf_parameters(adapted))
    if cfg.aper_variant == "vpt":
        return [adapted.prompts]
    return list(adapted.parameters())


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

    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        """Refuse a variant the backbone cannot take before anything is written (its modules on the meta device)."""
        if cfg.aper_variant != "finetune":
            from ..backbones import get_backbone
            try:
                with torch.device("meta"):
                    probe = get_backbone(cfg.backbone).build(None, False)
            except Exception:  # a builder that cannot run on the meta device: wrap_backbone checks it
                probe = None
            check_vit(probe, cfg)
        return cfg

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        if cfg.aper_variant == "finetune":  # the backbone adapts, a copy stays pre-trained
            return DualBranch(copy.deepcopy(backbone), backbone)
        return DualBranch(backbone, adapted_copy(backbone, cfg))

    def trains(self, task: int, cfg: RunConfig) -> bool:
        return task == 0

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        """The first task trains the adapted branch with a cosine head on its own features."""
        if task == 0:
            model.backbone.adapting = True
            device = model.task_heads[0].weight.device
            model.task_heads[0] = CosineHead(model.backbone.branch_features, cfg.task_sizes[0]).to(device)

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        """What the variant adapts at ``lr_backbone`` and the cosine head at ``lr_head``; everything else stays
        frozen (the pre-trained branch also in eval mode)."""
        groups = [{"params": adapted_parameters(model.backbone.adapted, cfg), "lr": cfg.lr_backbone},
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
