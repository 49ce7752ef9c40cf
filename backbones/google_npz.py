"""Google's ViT checkpoints (.npz from the big_vision / vision_transformer releases) as a timm state dict, so
that they go through the same strict key check as every other format."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import torch

from slca_cli.errors import SlcaError

_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
# Per-block parameters: Google name -> timm name (the attention projections are handled apart).
_BLOCK_NAMES = {
    "LayerNorm_0/scale": "norm1.weight", "LayerNorm_0/bias": "norm1.bias",
    "LayerNorm_2/scale": "norm2.weight", "LayerNorm_2/bias": "norm2.bias",
    "MlpBlock_3/Dense_0/kernel": "mlp.fc1.weight", "MlpBlock_3/Dense_0/bias": "mlp.fc1.bias",
    "MlpBlock_3/Dense_1/kernel": "mlp.fc2.weight", "MlpBlock_3/Dense_1/bias": "mlp.fc2.bias",
    "MultiHeadDotProductAttention_1/out/bias": "attn.proj.bias",
}
_TOP_NAMES = {
    "cls": "cls_token", "Transformer/posembed_input/pos_embedding": "pos_embed",
    "embedding/bias": "patch_embed.proj.bias", "Transformer/encoder_norm/scale": "norm.weight",
    "Transformer/encoder_norm/bias": "norm.bias", "head/bias": "head.bias", "pre_logits/bias": "pre_logits.fc.bias",
}
_QKV = ("query", "key", "value")


def _linear(kernel: np.ndarray) -> np.ndarray:
    """Flax Dense kernels are (in, out); torch Linear weights are (out, in)."""
    return kernel.T


def read_google_npz(path: Path) -> Dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise SlcaError(f"--weights {path} does not exist")
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise SlcaError(f"--weights {path} is not a readable .npz ({exc.__class__.__name__}); re-download it") from None
    prefix = "opt/target/"  # checkpoints saved with their optimizer state
    if arrays and all(k.startswith(prefix) for k in arrays):
        arrays = {k[len(prefix):]: v for k, v in arrays.items()}
    return arrays


def google_vit_state(arrays: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    """timm ViT names and layouts for the arrays of a Google ViT checkpoint; keys this converter does not know
    keep their Google name, so the strict loader reports them as unexpected."""
    out: Dict[str, np.ndarray] = {}
    qkv: Dict[int, Dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        block = _BLOCK.match(name)
        if block:
            index, rest = int(block.group(1)), block.group(2)
            attention = re.match(r"MultiHeadDotProductAttention_1/(query|key|value)/(kernel|bias)$", rest)
            if attention:
                qkv.setdefault(index, {})[f"{attention.group(1)}/{attention.group(2)}"] = value
            elif rest == "MultiHeadDotProductAttention_1/out/kernel":  # (heads, head_dim, dim) -> (dim, heads*head_dim)
                out[f"blocks.{index}.attn.proj.weight"] = value.reshape(-1, value.shape[-1]).T
            elif rest in _BLOCK_NAMES:
                out[f"blocks.{index}.{_BLOCK_NAMES[rest]}"] = _linear(value) if rest.endswith("kernel") else value
            else:
                out[name] = value
        elif name == "embedding/kernel":  # (h, w, in, out) -> (out, in, h, w)
            out["patch_embed.proj.weight"] = value.transpose(3, 2, 0, 1)
        elif name in ("head/kernel", "pre_logits/kernel"):
            out[name.split("/")[0] + (".fc" if name.startswith("pre") else "") + ".weight"] = _linear(value)
        else:
            out[_TOP_NAMES.get(name, name)] = value
    for index, parts in qkv.items():
        kernels = [parts.get(f"{n}/kernel") for n in _QKV]
        biases = [parts.get(f"{n}/bias") for n in _QKV]
        if any(k is None for k in kernels) or any(b is None for b in biases):
            raise SlcaError(f"the .npz lacks part of the attention of encoder block {index} (query, key, value)")
        # kernels (dim, heads, head_dim) -> rows heads*head_dim; q, k, v stacked as timm's fused qkv
        out[f"blocks.{index}.attn.qkv.weight"] = np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels])
        out[f"blocks.{index}.attn.qkv.bias"] = np.concatenate([b.reshape(-1) for b in biases])
    return {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in out.items()}
