"""SSF (Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022): a learned per-channel scale and shift after a
frozen layer, ``y = layer(x) * scale + shift``. On a ViT, where LAMDA-PILOT's ``backbone/vit_ssf.py`` puts them: after
the patch embedding, each block's norm1, qkv, proj, norm2, fc1 and fc2, and the final norm."""
from __future__ import annotations

from typing import Iterator, List

import torch
from torch import nn

from ..errors import SlcaError

# Per ViT block, and on the ViT itself.
SSF_BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
SSF_VIT_TARGETS = ("patch_embed.proj", "norm")


class ScaleShift(nn.Module):
    """``base(x) * ssf_scale + ssf_shift`` along the channel axis (1 for a convolution's NCHW output, else the
    last); scale starts N(1, 0.02) and shift N(0, 0.02), as in the SSF code."""

    def __init__(self, base: nn.Module, channels: int):
        super().__init__()
        self.base = base
        self.channel_dim = 1 if isinstance(base, nn.Conv2d) else -1
        device = next(base.parameters(), torch.empty(0)).device
        self.ssf_scale = nn.Parameter(torch.empty(channels, device=device))
        self.ssf_shift = nn.Parameter(torch.empty(channels, device=device))
        nn.init.normal_(self.ssf_scale, mean=1.0, std=0.02)
        nn.init.normal_(self.ssf_shift, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return y * self.ssf_scale.to(y.dtype).view(shape) + self.ssf_shift.to(y.dtype).view(shape)


def _channels(layer: nn.Module, width: int) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    if isinstance(layer, nn.LayerNorm):
        return int(layer.normalized_shape[-1])
    if isinstance(layer, nn.Identity):  # a ViT without a final norm (global average pooling): SSF on its tokens
        return width
    raise SlcaError(f"SSF: cannot scale the output of a {type(layer).__name__}; use a timm ViT backbone")


def _wrap(root: nn.Module, dotted: str, width: int) -> ScaleShift:
    parent_path, _, leaf = dotted.rpartition(".")
    try:
        parent = root.get_submodule(parent_path) if parent_path else root
        layer = getattr(parent, leaf)
    except AttributeError:
        raise SlcaError(f"SSF: the backbone has no {dotted}; use a timm ViT backbone") from None
    wrapped = ScaleShift(layer, _channels(layer, width))
    setattr(parent, leaf, wrapped)
    return wrapped


def inject_ssf(vit: nn.Module) -> List[ScaleShift]:
    """Put a ScaleShift after every SSF target of ``vit`` (in place); returns them."""
    if getattr(vit, "blocks", None) is None:
        raise SlcaError("SSF needs a ViT with transformer blocks; use --backbone vit-b16-in21k")
    width = int(vit.embed_dim)
    added = [_wrap(vit, target, width) for target in SSF_VIT_TARGETS]
    for block in vit.blocks:
        added += [_wrap(block, target, width) for target in SSF_BLOCK_TARGETS]
    return added


def ssf_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The scales and shifts only (what SSF trains)."""
    for layer in module.modules():
        if isinstance(layer, ScaleShift):
            yield layer.ssf_scale
            yield layer.ssf_shift
