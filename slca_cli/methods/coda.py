"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting", CVPR 2023) on a
frozen ViT: at each prompted block the prefix is a weighted sum of prompt components, the weights being the cosine
similarity between the query (the frozen ViT's CLS token) masked by each component's attention vector and the
component's key. Each task adds its own slice of ``pool / tasks`` components (keys, attention vectors and prompts,
initialized orthogonal to the earlier ones by Gram-Schmidt); earlier slices are frozen. Sources: CONTRIBUTING.md,
"Methods".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlcaError
from ..presets import RunConfig
from ..recipe import TrainingRecipe
from .base import Method, recipe_from_config, require_vit
from .prompts import block_with_prefix, embed_tokens, uniform_parameter, vit_query

MAX_PROMPTED_BLOCKS = 5  # blocks 0-4 carry prompts, as in the paper


def component_weights(query: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, D) queries, (M, D) attention vectors and keys -> (B, M) weights ``cos(q * a_m, k_m)``."""
    attended = query[:, None, :] * attention[None]
    return torch.einsum("bmd,md->bm", F.normalize(attended, dim=2), F.normalize(keys, dim=1))


def orthogonality_penalty(rows: torch.Tensor) -> torch.Tensor:
    """``mean((R R^T - I)^2)`` over the rows of a (M, ...) tensor: zero when they are orthonormal."""
    flat = rows.reshape(rows.shape[0], -1)
    eye = torch.eye(flat.shape[0], device=flat.device, dtype=flat.dtype)
    return ((flat @ flat.t() - eye) ** 2).mean()


@torch.no_grad()
def gram_schmidt_rows(rows: torch.Tensor, start: int, stop: int, generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
    """``rows`` with rows ``start:stop`` replaced by random unit vectors orthogonal to every row before them (the
    earlier ones kept as they are; rows ``:start`` are assumed orthonormal, as this function leaves them)."""
    flat = rows.reshape(rows.shape[0], -1).clone()
    for k in range(start, stop):
        v = torch.randn(flat.shape[1], generator=generator, dtype=flat.dtype)
        for j in range(k):
            u = flat[j]
            v = v - (u @ v) / (u @ u).clamp_min(1e-12) * u
        flat[k] = v / v.norm().clamp_min(1e-12)
    return flat.reshape(rows.shape)


class CodaBackbone(nn.Module):
    """The frozen ViT with CODA's components at the first ``MAX_PROMPTED_BLOCKS`` blocks; a component's prompt of
    ``length`` tokens gives ``length / 2`` prefix keys and ``length / 2`` prefix values. ``task`` (set by the method)
    decides which components exist (``:(task + 1) * per_task``) and which train (the last ``per_task``). The feature
    is the CLS token after the final norm."""

    def __init__(self, vit: nn.Module, pool_size: int, length: int, tasks: int):
        super().__init__()
        self.vit = vit
        self.num_features = dim = int(vit.embed_dim)
        self.layers = tuple(range(min(MAX_PROMPTED_BLOCKS, len(vit.blocks))))
        self.length = length
        layers = len(self.layers)
        self.prompt_keys = uniform_parameter(layers, pool_size, dim)
        self.prompt_attention = uniform_parameter(layers, pool_size, dim)
        self.prompts = uniform_parameter(layers, pool_size, length, dim)
        # The task being trained or, in a saved model, the last one: saved with the weights, so a restored model
        # uses exactly the components that existed.
        self.register_buffer("task", torch.zeros((), dtype=torch.long))
        # Components per task, fixed when the run starts (saved: a continued run keeps its slices).
        self.register_buffer("per_task", torch.tensor(pool_size // tasks, dtype=torch.long))

    @torch.no_grad()
    def start_task(self, task: int) -> None:
        """Task ``task``'s components: random, orthonormal to the earlier ones (from the global RNG, reseeded per
        task by the runner)."""
        self.task.fill_(task)
        per_task = int(self.per_task)
        start, stop = task * per_task, (task + 1) * per_task
        if stop > self.prompts.shape[1]:
            raise SlcaError(f"--method coda-prompt: task {task + 1} needs components {start}-{stop - 1} but the pool "
                            f"holds {self.prompts.shape[1]}; train with a larger --prompt-pool")
        for tensor in (self.prompt_keys, self.prompt_attention, self.prompts):
            for layer in range(tensor.shape[0]):
                tensor[layer].copy_(gram_schmidt_rows(tensor[layer].cpu().float(), start, stop).to(tensor))

    def components(self, tensor: torch.Tensor, layer: int) -> torch.Tensor:
        """The components that exist for this task; in training the earlier tasks' are cut from the graph."""
        task, per_task = int(self.task), int(self.per_task)
        start, stop = task * per_task, (task + 1) * per_task
        rows = tensor[layer, :stop]
        if self.training and start > 0:
            rows = torch.cat([rows[:start].detach(), rows[start:]])
        return rows

    def prefix(self, layer: int, query: torch.Tensor) -> torch.Tensor:
        """(B, 2, length / 2, D) prefix keys and values of one prompted block."""
        keys = self.components(self.prompt_keys, layer)
        attention = self.components(self.prompt_attention, layer)
        prompts = self.components(self.prompts, layer)
        weights = component_weights(query, attention, keys)
        prompt = torch.einsum("bm,mld->bld", weights, prompts)
        half = self.length // 2
        return torch.stack([prompt[:, :half], prompt[:, half:2 * half]], dim=1)

    def orthogonality(self) -> torch.Tensor:
        """The paper's regularizer over every prompted block's keys, attention vectors and prompts."""
        total = torch.zeros((), device=self.prompts.device)
        for layer in range(len(self.layers)):
            for tensor in (self.prompt_keys, self.prompt_attention, self.prompts):
                total = total + orthogonality_penalty(self.components(tensor, layer))
        return total

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        query = vit_query(self.vit, images)
        x = self.vit.norm_pre(embed_tokens(self.vit, images))
        for index, block in enumerate(self.vit.blocks):
            if index in self.layers:
                x = block_with_prefix(block, x, self.prefix(self.layers.index(index), query).to(x.dtype))
            else:
                x = block(x)
        return self.vit.norm(x)[:, 0]


class CODAPrompt(Method):
    """Frozen ViT; the current task's components and head train with Adam (cosine schedule)."""

    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        if cfg.prompt_pool < cfg.num_tasks:
            raise SlcaError(f"--method coda-prompt gives each task prompt_pool / tasks components: --prompt-pool "
                            f"{cfg.prompt_pool} is smaller than the {cfg.num_tasks} tasks; pass --prompt-pool "
                            f"{cfg.num_tasks} or more (the paper: 100)")
        if cfg.prompt_length < 2 or cfg.prompt_length % 2:
            raise SlcaError(f"--method coda-prompt splits each prompt into prefix keys and values: --prompt-length "
                            f"must be even and at least 2, got {cfg.prompt_length} (the paper: 8)")
        return cfg

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        require_vit(self.name, cfg.backbone, backbone)
        return CodaBackbone(backbone, cfg.prompt_pool, cfg.prompt_length, cfg.num_tasks)

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        model.backbone.start_task(task)

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        coda = model.backbone
        groups = [{"params": [coda.prompt_keys, coda.prompt_attention, coda.prompts], "lr": cfg.lr_backbone},
                  {"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        recipe = recipe_from_config(groups, cfg, frozen_modules=(coda.vit,))
        if not cfg.ortho_weight:
            return recipe
        classify = recipe.loss

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return classify(logits, targets) + cfg.ortho_weight * coda.orthogonality()

        recipe.loss = loss
        return recipe
