"""LoRA written out: a frozen nn.Linear plus a trainable low-rank update ``scale * B @ A``."""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlcaError

# Per ViT block: the linear layers SLCA++ adapts.
LORA_TARGETS = ("attn.qkv", "mlp.fc1", "mlp.fc2")


class LoRALinear(nn.Module):
    """``y = x (W + scale * B A)^T + b``. ``base`` (W, b) is the pre-trained layer; ``lora_A`` (rank x in)
    starts truncated-normal (std 0.02) and ``lora_B`` (out x rank) at zero, so the layer starts unchanged.
    ``rows`` (start, stop) limits the update to those output rows (``lora_B`` is then (stop - start) x rank):
    InfLoRA adapts only the key and value thirds of a ViT's qkv layer."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, rows: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, scale
        self.rows = (0, base.out_features) if rows is None else (int(rows[0]), int(rows[1]))
        if not 0 <= self.rows[0] < self.rows[1] <= base.out_features:
            raise SlcaError(f"LoRA: output rows {self.rows} are outside the layer's {base.out_features}")
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.rows[1] - self.rows[0], rank, device=base.weight.device))
        nn.init.trunc_normal_(self.lora_A, std=0.02)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """``scale * B A`` as a full (out x in) matrix: zero outside ``rows``."""
        update = self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        start, stop = self.rows
        if (start, stop) == (0, self.base.out_features):
            return update
        return F.pad(update, (0, 0, start, self.base.out_features - stop))

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.delta()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.base.bias)

    @torch.no_grad()
    def init_from_svd(self) -> None:
        """A = the top-``rank`` right singular vectors of W (the authors' first-task initialization)."""
        _, _, vh = torch.linalg.svd(self.base.weight.detach().float(), full_matrices=False)
        self.lora_A.copy_(vh[: self.rank].to(self.lora_A.dtype))


def _get(module: nn.Module, dotted: str) -> Tuple[nn.Module, str, nn.Module]:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    return parent, leaf, getattr(parent, leaf)


def inject_lora(vit: nn.Module, rank: int, scale: float, targets=LORA_TARGETS,
                rows: Optional[Callable[[nn.Linear], Tuple[int, int]]] = None) -> List[LoRALinear]:
    """Replace each block's ``targets`` (nn.Linear) by a LoRALinear around it; returns the new layers.
    ``rows(layer)``: the output rows each update may touch (default: all)."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise SlcaError("LoRA needs a ViT with transformer blocks (blocks[i].attn.qkv, mlp.fc1, mlp.fc2); use "
                        "--backbone vit-b16-in21k or set --lora-rank 0")
    added = []
    for block in blocks:
        for target in targets:
            try:
                parent, leaf, layer = _get(block, target)
            except AttributeError:
                raise SlcaError(f"LoRA: the backbone's blocks have no {target}; use a timm ViT backbone or "
                                f"--lora-rank 0") from None
            if not isinstance(layer, nn.Linear):
                raise SlcaError(f"LoRA: {target} is a {type(layer).__name__}, not nn.Linear")
            if rank > layer.in_features:
                raise SlcaError(f"--lora-rank {rank} is above the {layer.in_features} inputs of the blocks' {target}: "
                                f"a LoRA rank is at most its layer's input width (the papers use 4-10)")
            wrapped = LoRALinear(layer, rank, scale, rows(layer) if rows else None)
            setattr(parent, leaf, wrapped)
            added.append(wrapped)
    return added


def lora_layers(module: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in module.modules() if isinstance(m, LoRALinear))
