"""Self-supervised ViT-B/16 checkpoints (MoCo v3, iBOT, DINO) from their authors' files, remapped into timm's
VisionTransformer: the encoder is picked out of the training checkpoint, projection heads and other
pre-training-only tensors are dropped, and every other key must fit the model exactly."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .cache import cached_file, fetch
from .registry import BackboneSpec, register_backbone
from .weights import load_into, read_state_dict, select_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The architecture all four checkpoints share (qkv bias, LayerNorm eps 1e-6: timm's defaults). Tests swap in a
# smaller one to keep fake checkpoints small; the remapping code is the same.
VIT_B16 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)


@dataclass(frozen=True)
class Checkpoint:
    """Where a self-supervised checkpoint is published and how its encoder sits inside it."""

    url: str
    filename: str
    encoder_prefixes: Tuple[str, ...]  # tried in order; a file with none of them is a bare backbone
    companions: Tuple[str, ...]        # other modules the training checkpoint holds (dropped)
    pretraining_only: Tuple[str, ...]  # keys inside the encoder used only by the pre-training objective


# MoCo v3: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', 'module.predictor.*'}, ...};
# base_encoder.head is the projection MLP. Their convert_to_deit.py output ({'model': bare keys}) also loads.
MOCOV3 = Checkpoint(
    url="https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar", filename="vit-b-300ep.pth.tar",
    encoder_prefixes=("module.base_encoder.", "base_encoder."),
    companions=("module.momentum_encoder.", "module.predictor.", "momentum_encoder.", "predictor."),
    pretraining_only=("head.",))
# iBOT full checkpoints: {'teacher': {'backbone.*', 'head.*'}, 'student': {'module.backbone.*', ...}, 'args', ...};
# their backbone-only files hold the bare keys (possibly under 'state_dict'). The student has the MIM token.
_IBOT = dict(encoder_prefixes=("backbone.", "module.backbone."), companions=("head.", "module.head."),
             pretraining_only=("head.", "masked_embed"))
IBOT_IN21K = Checkpoint(
    url="https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16_pt22k/checkpoint.pth",
    filename="ibot_vitb16_in22k_checkpoint.pth", **_IBOT)
IBOT_IN1K = Checkpoint(
    url="https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth",
    filename="ibot_vitb16_in1k_checkpoint_teacher.pth", **_IBOT)
# DINO: the published backbone file holds the teacher's bare keys; full checkpoints are laid out like iBOT's.
DINO = Checkpoint(
    url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    filename="dino_vitbase16_pretrain.pth", encoder_prefixes=("backbone.", "module.backbone."),
    companions=("head.", "module.head."), pretraining_only=("head.",))


def encoder_state(raw: Dict[str, torch.Tensor], checkpoint: Checkpoint, source: str) -> Dict[str, torch.Tensor]:
    """The ViT encoder's tensors under timm's names, from the flat state dict of a training checkpoint."""
    state = select_encoder(raw, checkpoint.encoder_prefixes, checkpoint.companions, source)
    return {k: v for k, v in state.items() if not k.startswith(checkpoint.pretraining_only)}


def make_vit() -> VisionTransformer:
    """timm ViT without classifier: ``forward`` gives the CLS token after the final norm. Position embeddings
    are resampled for inputs other than the checkpoint's size (``--image-size``)."""
    return VisionTransformer(num_classes=0, dynamic_img_size=True, **VIT_B16)


def build_selfsup_vit(checkpoint: Checkpoint, backbone: str, weights: Optional[str], pretrained: bool) -> nn.Module:
    """The ViT with the checkpoint's weights: ``weights`` if given, else the cached (or downloaded) file;
    random with ``pretrained=False`` (used by ``slca eval``, which loads the run's own weights next)."""
    if weights is None and not pretrained:
        return make_vit()
    path = Path(weights) if weights else fetch(checkpoint.url, checkpoint.filename, backbone)
    state = encoder_state(read_state_dict(path), checkpoint, str(path))
    model = make_vit()
    load_into(model, state, str(path), head_prefixes=())
    return model


def _register(name: str, checkpoint: Checkpoint, family: str, description: str, aliases: Tuple[str, ...]) -> None:
    register_backbone(BackboneSpec(
        name=name, build=lambda weights=None, pretrained=True: build_selfsup_vit(checkpoint, name, weights, pretrained),
        description=description, family=family, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        weights_source=f"{checkpoint.filename} in the weights folder (downloaded from {checkpoint.url}) or "
                       f"--weights FILE",
        weights_present=lambda: cached_file(checkpoint.filename).is_file(), aliases=aliases))


_register("mocov3-vit-b16", MOCOV3, "mocov3",
          "ViT-B/16, MoCo v3 self-supervised ImageNet-1k, 300 epochs (official vit-b-300ep.pth.tar), 768-d",
          ("moco", "mocov3"))
_register("ibot-vit-b16-in21k", IBOT_IN21K, "ibot",
          "ViT-B/16, iBOT self-supervised ImageNet-22k (teacher of the official full checkpoint), 768-d",
          ("ibot", "ibot-in21k"))
_register("ibot-vit-b16-in1k", IBOT_IN1K, "ibot",
          "ViT-B/16, iBOT self-supervised ImageNet-1k (official teacher backbone), 768-d", ("ibot-in1k",))
_register("dino-vit-b16", DINO, "dino",
          "ViT-B/16, DINO self-supervised ImageNet-1k (official teacher backbone), 768-d", ("dino", "dino-in1k"))
