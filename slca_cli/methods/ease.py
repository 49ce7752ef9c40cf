"""EASE (Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning",
CVPR 2024): a frozen ViT with one AdaptFormer adapter per task (methods/adapters.py). Task t trains adapter t with a
cosine classifier over its own classes; the earlier adapters stay frozen. An image's feature is the concatenation of
its CLS features under every adapter so far (one subspace per task). Each class's prototype in a subspace is its
mean feature there; an old class has no images in the subspaces of later adapters, so its prototype there is
completed from the new classes' (semantic-guided prototype complement): softmax over the cosine similarities of
the old class to the new ones in the old class's own subspace, weighting the new classes' prototypes in the new
subspace. The classifier is the sum over subspaces of cosine similarities to the prototypes, the class's own
subspace weighted 1 and the others alpha / t (the authors' reweighting). Sources: CONTRIBUTING.md, "Methods".

The sum of per-subspace cosines is a linear head on per-subspace unit-normalized features: the backbone returns
the raw concatenation (its class means are the prototypes), ``backbone.head_input`` normalizes each subspace, and
every head's weights are the reweighted unit prototypes, so `slca eval`, `slca predict` and `--resume` need nothing
of their own. The feature has room for every task's subspace from the start (zeros for adapters not trained yet).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlcaError
from ..presets import RunConfig
from ..recipe import TrainingRecipe
from .adapters import active_adapters, adapted_blocks, adapter_parameters, inject_adapters
from .aper import CosineHead
from .base import ClassifierInputs, Method, Stage1Inputs, recipe_from_config, require_vit

ADAPTER_SCALE = 0.1  # LAMDA-PILOT utils/inc_net.py: ffn_adapter_scalar "0.1"
ADAPTER_DROPOUT = 0.1  # LAMDA-PILOT backbone/vit_ease.py: get_new_adapter(dropout=0.1)
PROTOTYPES = "prototypes"  # method-state key: (classes, tasks, dim) class means, zero where not measured


# ---- the math (pure) ----

def class_tasks(task_sizes: Sequence[int]) -> torch.Tensor:
    """The task of every class, in class order."""
    return torch.repeat_interleave(torch.arange(len(task_sizes)), torch.tensor(list(task_sizes)))


def complete_prototypes(prototypes: torch.Tensor, tasks: torch.Tensor, current: int, temperature: float = 1.0
                        ) -> torch.Tensor:
    """(C, S, D) prototypes, measured in subspaces ``j <= tasks[c]`` -> the same with every subspace ``j <=
    current`` filled. An old class of task i gets, in subspace j > i, ``softmax(cos(p_c^i, p_k^i) / temperature)
    over the anchor classes k`` times their ``p_k^j``; the anchors are the classes of tasks j..current, the ones
    measured in both subspaces (the authors' ``recalc_sim``: recomputed from measured prototypes every task)."""
    out = prototypes.clone()
    for i in range(current):
        old = tasks == i
        for j in range(i + 1, current + 1):
            anchors = (tasks >= j) & (tasks <= current)
            similarity = F.normalize(prototypes[old, i], dim=1) @ F.normalize(prototypes[anchors, i], dim=1).t()
            out[old, j] = torch.softmax(similarity / temperature, dim=1) @ prototypes[anchors, j]
    return out


def subspace_weights(tasks: torch.Tensor, current: int, subspaces: int, alpha: float) -> torch.Tensor:
    """(C, S) weight of each subspace in a class's score: 1 for the class's own task's subspace, ``alpha /
    current`` for the other ones up to ``current``, 0 for subspaces not trained yet."""
    weights = torch.zeros(len(tasks), subspaces, dtype=torch.float64)
    if current > 0:
        weights[:, :current + 1] = alpha / current
    weights[torch.arange(len(tasks)), tasks] = 1.0
    return weights


def prototype_heads(prototypes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(C, S * D) head weights: each subspace's unit prototype times its weight, so that a head on unit-normalized
    subspace features scores ``sum_j w_cj cos(x_j, p_c^j)``."""
    return (F.normalize(prototypes, dim=2) * weights[:, :, None]).flatten(1)


# ---- the model ----

class SubspaceNorm(nn.Module):
    """``backbone.head_input``: each ``dim``-wide subspace of the feature scaled to unit norm (zero stays zero).
    Inactive (``active`` False) while an adapter trains against its own cosine head."""

    def __init__(self, dim: int, subspaces: int):
        super().__init__()
        self.dim, self.subspaces = dim, subspaces
        self.out_features = dim * subspaces
        self.active = True

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        blocks = features.reshape(features.shape[0], self.subspaces, self.dim)
        return F.normalize(blocks, dim=2).reshape(features.shape[0], self.out_features)


class EaseBackbone(nn.Module):
    """The ViT with ``tasks`` adapters per block. ``task`` (saved with the weights) is the last adapter trained;
    the feature is ``[f_0, ..., f_task, 0, ...]``, ``f_j`` the CLS feature with adapter j. While adapter t
    trains (``training_adapter``) the feature is ``f_t`` alone."""

    def __init__(self, vit: nn.Module, tasks: int, bottleneck: int):
        super().__init__()
        self.vit = vit
        inject_adapters(vit, bottleneck, ADAPTER_SCALE, count=tasks, dropout=ADAPTER_DROPOUT)
        self.subspace_dim = int(vit.num_features)
        self.tasks = tasks
        self.num_features = self.subspace_dim * tasks
        self.head_input = SubspaceNorm(self.subspace_dim, tasks)
        self.register_buffer("task", torch.zeros((), dtype=torch.long))
        self.training_adapter = None

    def subspace(self, images: torch.Tensor, index: int) -> torch.Tensor:
        with active_adapters(self.vit, index):
            return self.vit(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training_adapter is not None:
            return self.subspace(images, self.training_adapter)
        features = [self.subspace(images, j) for j in range(int(self.task) + 1)]
        missing = self.tasks - len(features)
        if missing:
            features.append(features[0].new_zeros(features[0].shape[0], missing * self.subspace_dim))
        return torch.cat(features, dim=1)

    def frozen_parts(self) -> List[nn.Module]:
        """The pre-trained modules (kept in eval mode while an adapter trains)."""
        return ([m for name, m in self.vit.named_children() if name != "blocks"] +
                [b.block for b in adapted_blocks(self.vit)])


class EASE(Method):
    """A new adapter and cosine head per task; then every head is set from the (completed) prototypes."""

    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        if cfg.align:
            raise SlcaError("--method ease classifies by cosine similarity to class prototypes; classifier "
                            "alignment (--align) does not apply to it, drop --align")
        return cfg

    def class_covariances(self, cfg: RunConfig) -> bool:
        return False  # one ViT feature per task: (D T)^2 per class would be gigabytes, and only means are read

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        require_vit(self.name, cfg.backbone, backbone)
        return EaseBackbone(backbone, cfg.num_tasks, cfg.adapter_bottleneck)

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        """Adapter ``task`` trains on its own feature with a cosine head (learned scale) over the task's classes."""
        ease = model.backbone
        ease.task.fill_(task)
        ease.training_adapter = task
        ease.head_input.active = False
        device = model.task_heads[task].weight.device
        model.task_heads[task] = CosineHead(ease.subspace_dim, cfg.task_sizes[task]).to(device)

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        ease = model.backbone
        groups = [{"params": adapter_parameters(ease.vit, task), "lr": cfg.lr_backbone},
                  {"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        return recipe_from_config(groups, cfg, frozen_modules=tuple(ease.frozen_parts()))

    def after_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: Stage1Inputs
                     ) -> Dict[str, torch.Tensor]:
        """The adapter is trained: features become the concatenation over subspaces and the cosine training head
        gives way to a prototype head (``fit_classifier`` fills it)."""
        ease = model.backbone
        ease.training_adapter = None
        ease.head_input.active = True
        device = model.task_heads[task].weight.device
        model.task_heads[task] = nn.Linear(ease.head_input.out_features, cfg.task_sizes[task]).to(device)
        model.task_heads.requires_grad_(False)
        return inputs.state

    @torch.no_grad()
    def fit_classifier(self, model: nn.Module, task: int, cfg: RunConfig, inputs: ClassifierInputs
                       ) -> Dict[str, torch.Tensor]:
        """The new classes' prototypes are their means (all-reduced class statistics) in subspaces 0..task; every
        head is rebuilt from the measured prototypes of all seen classes, completed and reweighted for this task."""
        ease = model.backbone
        if task == 0:
            inputs.log(f"ease: one {ease.subspace_dim}-d subspace per task, {ease.num_features}-d features; class "
                       f"means only (no covariances) in stats.safetensors")
        new = inputs.task_means.to(torch.float32).cpu().reshape(-1, ease.tasks, ease.subspace_dim)
        new[:, task + 1:] = 0
        old = inputs.state.get(PROTOTYPES)
        prototypes = new if task == 0 or old is None else torch.cat([old.to(torch.float32).cpu(), new])
        sizes = list(cfg.task_sizes[:task + 1])
        if len(prototypes) != sum(sizes):
            raise SlcaError(f"--method ease: the stored prototypes cover {len(prototypes) - len(new)} classes, not the "
                            f"{sum(sizes[:-1])} of the earlier tasks; the run folder was written by another version: "
                            f"start a new --out")
        tasks = class_tasks(sizes)
        complete = complete_prototypes(prototypes.to(torch.float64), tasks, task)
        weights = prototype_heads(complete, subspace_weights(tasks, task, ease.tasks, cfg.ease_alpha))
        start = 0
        for index, size in enumerate(sizes):
            head = model.task_heads[index]
            head.weight.copy_(weights[start:start + size].to(head.weight))
            head.bias.zero_()
            start += size
        return {PROTOTYPES: prototypes}
