"""Prompt-based methods on a frozen ViT: L2P (prompt tuning at the input) and DualPrompt (prefix tuning).

Both keep a pool of prompts with learned keys; an image's query is the frozen, un-prompted ViT's CLS token, and
the prompts whose keys are most cosine-similar to it are used. A surrogate loss pulls the chosen keys towards
the queries. Numbers and their sources: CONTRIBUTING.md, "Methods".
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlcaError
from ..presets import RunConfig
from ..recipe import TrainingRecipe
from .base import Method, recipe_from_config, require_vit

# ---- the matching math (pure) ----

def cosine_similarity_matrix(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, D) queries x (M, D) keys -> (B, M) cosine similarities."""
    return F.normalize(queries, dim=-1, eps=1e-12) @ F.normalize(keys, dim=-1, eps=1e-12).t()


def select_prompts(queries: torch.Tensor, keys: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, top_k) of the keys most cosine-similar to each query (most similar first), and the (B, M)
    similarity matrix. Per image: the official code's batch-wise majority vote is not used, so a prediction does
    not depend on which other images share its batch."""
    similarity = cosine_similarity_matrix(queries, keys)
    return similarity.topk(top_k, dim=1).indices, similarity


def matching_loss(similarity: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sum_k (1 - cos(q, k_selected))``: the L2P/DualPrompt surrogate loss."""
    return (1.0 - similarity.gather(1, indices)).sum(dim=1).mean()


# ---- ViT plumbing ----

def embed_tokens(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + position embedding, as the ViT's own forward does."""
    x = vit._pos_embed(vit.patch_embed(images))
    return vit.patch_drop(x) if hasattr(vit, "patch_drop") else x


@torch.no_grad()
def vit_query(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The frozen, un-prompted ViT's CLS token after its final norm."""
    return vit.forward_features(images)[:, 0].detach()


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` with learned prefix keys and values: ``prefix`` (B, 2, L, D) holds L keys and L
    values (in model width, split into heads like the model's own) that every token also attends to."""
    if getattr(attn, "gate", None) is not None or not hasattr(attn, "qkv"):
        raise SlcaError("DualPrompt's prefix tuning needs timm's standard ViT attention (fused qkv, no gate)")
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    length = prefix.shape[2]
    prefix = prefix.to(x.dtype).reshape(batch, 2, length, heads, head_dim).permute(1, 0, 3, 2, 4)
    k = torch.cat([prefix[0], k], dim=2)
    v = torch.cat([prefix[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return attn.proj_drop(attn.proj(attn.norm(out)))


def block_with_prefix(block: nn.Module, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """A pre-norm timm ``Block`` whose attention also sees ``prefix``."""
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def uniform_parameter(*shape: int) -> nn.Parameter:
    """Prompts and keys start uniform in [-1, 1], as in both papers' code."""
    return nn.Parameter(torch.empty(*shape).uniform_(-1.0, 1.0))


class L2PBackbone(nn.Module):
    """L2P: ``top_k`` prompts of ``length`` tokens, chosen per image from a pool of ``pool_size``, are inserted
    after the class token of the embedded input (prompt tuning); the feature is the mean of the prompt tokens'
    outputs after the final norm (L2P's "prompt" classifier input)."""

    def __init__(self, vit: nn.Module, pool_size: int, length: int, top_k: int):
        super().__init__()
        self.vit = vit
        self.top_k, self.length = top_k, length
        self.num_features = int(vit.embed_dim)
        self.prompt_keys = uniform_parameter(pool_size, self.num_features)
        self.prompts = uniform_parameter(pool_size, length, self.num_features)
        self.matching_loss: Optional[torch.Tensor] = None
        self.last_selection: Optional[torch.Tensor] = None

    def insert_prompts(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, N + top_k * length, D): class token(s), selected prompts, patches."""
        prompts = self.prompts[indices].flatten(1, 2).to(tokens.dtype)
        n = int(self.vit.num_prefix_tokens)
        return torch.cat([tokens[:, :n], prompts, tokens[:, n:]], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        indices, similarity = select_prompts(vit_query(self.vit, images), self.prompt_keys, self.top_k)
        self.last_selection = indices.detach()
        self.matching_loss = matching_loss(similarity, indices) if self.training else None
        x = self.insert_prompts(embed_tokens(self.vit, images), indices)
        x = self.vit.norm(self.vit.blocks(self.vit.norm_pre(x)))
        n = int(self.vit.num_prefix_tokens)
        return x[:, n:n + self.top_k * self.length].mean(dim=1)


def dualprompt_layers(depth: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(G-prompt layers, E-prompt layers): blocks 0-1 and 2-4 as in DualPrompt; for ViTs under 5 blocks
    (the test model) block 0 and the rest."""
    if depth >= 5:
        return (0, 1), (2, 3, 4)
    return (0,), tuple(range(1, depth))


class DualPromptBackbone(nn.Module):
    """DualPrompt: a shared G-prompt at ``g_layers`` and one E-prompt per task at ``e_layers``, both as prefix
    keys/values of the attention (prefix tuning). While training task t, E-prompt t is used (the task is known);
    at test time the E-prompt whose key best matches the query. The feature is the CLS token after the norm."""

    def __init__(self, vit: nn.Module, pool_size: int, e_length: int, g_length: int,
                 g_layers: Sequence[int], e_layers: Sequence[int]):
        super().__init__()
        self.vit = vit
        self.g_layers, self.e_layers = tuple(g_layers), tuple(e_layers)
        self.num_features = dim = int(vit.embed_dim)
        self.prompt_keys = uniform_parameter(pool_size, dim)
        self.g_prompts = uniform_parameter(len(self.g_layers), 2, g_length, dim)
        self.e_prompts = uniform_parameter(len(self.e_layers), pool_size, 2, e_length, dim)
        self.train_task: Optional[int] = None
        self.matching_loss: Optional[torch.Tensor] = None
        self.last_selection: Optional[torch.Tensor] = None

    def choose(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 1) E-prompt indices and the (B, pool) similarities to the keys."""
        query = vit_query(self.vit, images)
        indices, similarity = select_prompts(query, self.prompt_keys, 1)
        if self.training and self.train_task is not None:
            indices = torch.full_like(indices, self.train_task)
        return indices, similarity

    def layer_prefix(self, layer: int, e_index: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
        """(B, 2, L, D) prefix for one block, or None where the block has no prompt."""
        parts = []
        if layer in self.g_layers:
            parts.append(self.g_prompts[self.g_layers.index(layer)].expand(batch, -1, -1, -1))
        if layer in self.e_layers:
            parts.append(self.e_prompts[self.e_layers.index(layer)][e_index])
        return torch.cat(parts, dim=2) if parts else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        indices, similarity = self.choose(images)
        self.last_selection = indices.detach()
        self.matching_loss = matching_loss(similarity, indices) if self.training else None
        x = self.vit.norm_pre(embed_tokens(self.vit, images))
        for layer, block in enumerate(self.vit.blocks):
            prefix = self.layer_prefix(layer, indices[:, 0], x.shape[0])
            x = block(x) if prefix is None else block_with_prefix(block, x, prefix)
        return self.vit.norm(x)[:, 0]


class PromptMethod(Method):
    """Shared policy of L2P and DualPrompt: frozen ViT, prompts + keys + current head train with Adam."""

    def prompted(self, model: nn.Module) -> nn.Module:
        return model.backbone

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        prompted = self.prompted(model)
        prompt_params = [p for name, p in prompted.named_parameters() if not name.startswith("vit.")]
        groups = [{"params": prompt_params, "lr": cfg.lr_backbone},
                  {"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        base = recipe_from_config(groups, cfg, frozen_modules=(prompted.vit,))
        classify = base.loss

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            value = classify(logits, targets)
            if cfg.matching_weight and prompted.matching_loss is not None:
                value = value + cfg.matching_weight * prompted.matching_loss
            return value

        base.loss = loss
        return base


class L2P(PromptMethod):
    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        require_vit(self.name, cfg.backbone, backbone)
        return L2PBackbone(backbone, cfg.prompt_pool, cfg.prompt_length, cfg.prompt_top_k)


class DualPrompt(PromptMethod):
    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        """One E-prompt per task, as in the paper (pool 10 for 10 tasks), unless --prompt-pool says otherwise."""
        if "prompt_pool" not in cfg.overridden:
            return cfg.replace(prompt_pool=cfg.num_tasks)
        if cfg.prompt_pool < cfg.num_tasks:
            raise SlcaError(f"--method dualprompt keeps one E-prompt per task: --prompt-pool {cfg.prompt_pool} is "
                            f"smaller than the {cfg.num_tasks} tasks; pass --prompt-pool {cfg.num_tasks}")
        return cfg

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        require_vit(self.name, cfg.backbone, backbone)
        g_layers, e_layers = dualprompt_layers(len(backbone.blocks))
        return DualPromptBackbone(backbone, cfg.prompt_pool, cfg.prompt_length, cfg.g_prompt_length,
                                  g_layers, e_layers)

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        model.backbone.train_task = task
