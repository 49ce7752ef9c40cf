"""AdaptFormer-style parallel bottleneck adapters for timm ViT blocks (shared by EASE and MOS).

Each adapted block keeps the pre-trained block untouched and adds, beside its MLP branch, a list of adapters of
which the active ones are summed in:
``x = x + attn(norm1(x)); x = x + mlp(norm2(x)) + sum_active scale * up(dropout(relu(down(x))))``.
The up-projection starts at zero, so a fresh adapter leaves the block's output unchanged. The facts (parallel
placement, input = the residual stream after attention, no LayerNorm inside, ReLU, LoRA-style init, scale 0.1,
bottleneck 64, dropout 0.1) are LAMDA-PILOT's (utils/inc_net.py ``tuning_config``, backbone/vit_ease.py); see
CONTRIBUTING.md. The adapters are modules under the ViT, so they are saved under ``backbone.`` in
model.safetensors and a run folder rebuilds them alone (the method injects the same count again).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import SlcaError

Selection = Union[None, int, Sequence[int]]


class BottleneckAdapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))``: down-projection to ``bottleneck`` dims, up-projection back. Down
    weights Kaiming-uniform (a = sqrt 5, nn.Linear's own rule), up weights and both biases zero (the authors'
    "lora" init): the adapter's output is exactly 0 until it trains."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        self.dropout = float(dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.dropout(torch.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(hidden) * self.scale


class AdaptedBlock(nn.Module):
    """A pre-norm timm ``Block`` (``block``, unchanged) with ``adapters`` beside its MLP branch; ``active`` (a
    tuple of adapter indices, empty = the pre-trained block) says which are added in this forward pass."""

    def __init__(self, block: nn.Module, dim: int, bottleneck: int, scale: float, count: int, dropout: float):
        super().__init__()
        self.block = block
        self.adapters = nn.ModuleList(BottleneckAdapter(dim, bottleneck, scale, dropout) for _ in range(count))
        self.active: Tuple[int, ...] = ()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        b = self.block
        if attn_mask is not None or is_causal:
            attended = b.attn(b.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        else:
            attended = b.attn(b.norm1(x))
        x = x + b.drop_path1(b.ls1(attended))
        out = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        for index in self.active:
            out = out + self.adapters[index](x)
        return out


def _check_block(block: nn.Module) -> None:
    parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    missing = [p for p in parts if not hasattr(block, p)]
    if missing:
        raise SlcaError(f"adapters need timm's pre-norm ViT blocks; {type(block).__name__} lacks "
                        f"{', '.join(missing)}: use a ViT backbone such as --backbone vit-b16-in21k")


def inject_adapters(vit: nn.Module, bottleneck: int, scale: float, count: int = 1, dropout: float = 0.0
                    ) -> List[AdaptedBlock]:
    """Wrap every block of ``vit.blocks`` in place with ``count`` fresh adapters (none active); returns the
    adapted blocks. The pre-trained weights move to ``blocks.<i>.block.*``, the adapters sit at
    ``blocks.<i>.adapters.<k>.{down,up}.*``. Parameters are created on the blocks' device and dtype."""
    if count < 1 or bottleneck < 1:
        raise SlcaError(f"adapters: need count >= 1 and bottleneck >= 1, got count {count}, bottleneck {bottleneck}")
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not len(blocks):
        raise SlcaError(f"adapters need a ViT with transformer blocks; {type(vit).__name__} has none: use a ViT "
                        f"backbone such as --backbone vit-b16-in21k")
    dim = int(vit.embed_dim)
    adapted = []
    for i, block in enumerate(blocks):
        if isinstance(block, AdaptedBlock):
            raise SlcaError("adapters are already injected into this ViT")
        _check_block(block)
        reference = next(block.parameters())
        wrapped = AdaptedBlock(block, dim, bottleneck, scale, count, dropout)
        wrapped.adapters.to(device=reference.device, dtype=reference.dtype)
        blocks[i] = wrapped
        adapted.append(wrapped)
    return adapted


def adapted_blocks(module: nn.Module) -> List[AdaptedBlock]:
    """Every adapted block under ``module``, in order."""
    return [m for m in module.modules() if isinstance(m, AdaptedBlock)]


def adapter_count(module: nn.Module) -> int:
    """Adapters per block (0 when none are injected)."""
    blocks = adapted_blocks(module)
    return len(blocks[0].adapters) if blocks else 0


def _selection(index: Selection, count: int) -> Tuple[int, ...]:
    chosen = () if index is None else (int(index),) if isinstance(index, int) else tuple(int(i) for i in index)
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise SlcaError(f"adapter index {bad[0]} does not exist: each block holds {count} adapter(s)")
    return chosen


def set_active(module: nn.Module, index: Selection) -> None:
    """Make adapter ``index`` (an int, a sequence of ints whose outputs add up, or None for the pre-trained ViT)
    the active one in every adapted block under ``module``."""
    blocks = adapted_blocks(module)
    chosen = _selection(index, len(blocks[0].adapters) if blocks else 0)
    for block in blocks:
        block.active = chosen


@contextmanager
def active_adapters(module: nn.Module, index: Selection) -> Iterator[None]:
    """``set_active`` for the duration of a ``with`` block; the previous choice is restored afterwards."""
    blocks = adapted_blocks(module)
    before = [block.active for block in blocks]
    set_active(module, index)
    try:
        yield
    finally:
        for block, active in zip(blocks, before):
            block.active = active


def adapter_parameters(module: nn.Module, index: int) -> List[nn.Parameter]:
    """The parameters of adapter ``index`` in every block (what trains when that adapter learns)."""
    _selection(index, adapter_count(module))
    return [p for block in adapted_blocks(module) for p in block.adapters[index].parameters()]
