"""Supervised ViT-B/16 backbones from timm (the paper's AugReg ImageNet-21k one and its ImageNet-1k fine-tune)
and a tiny ViT for tests."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .hub import HF_CACHE_DOC, create_timm, hub_cached, hub_reachable  # noqa: F401  (re-exported)
from .registry import BackboneSpec, register_backbone
from .weights import load_into, read_state_dict

# Built with dynamic_img_size: the position embeddings are resampled when --image-size is not 224 (identical at 224).
IN21K = "vit_base_patch16_224.augreg_in21k"
# The ImageNet-1k fine-tune of that same AugReg run, as Google released it (the B_16-i21k-300ep-...-imagenet2012
# .npz that the authors' code names for vit_base_patch16_224); augreg2 is a later re-tune by timm.
IN1K = "vit_base_patch16_224.augreg_in21k_ft_in1k"


def _hub_vit(model_name: str, name: str, description: str, aliases) -> None:
    repo = f"timm/{model_name}"
    register_backbone(BackboneSpec(
        name=name, build=lambda weights=None, pretrained=True: create_timm(model_name, weights, pretrained,
                                                                          dynamic_img_size=True),
        description=description, family=name.rsplit("-", 1)[-1], image_size=224, mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5), weights_source=f"hub {repo} ({HF_CACHE_DOC}) or --weights FILE",
        weights_present=lambda: hub_cached(repo), aliases=aliases))


def _tiny(weights: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                              num_classes=0)
    if weights:
        load_into(model, read_state_dict(Path(weights)), weights)
    return model


_hub_vit(IN21K, "vit-b16-in21k", f"ViT-B/16, supervised AugReg ImageNet-21k (timm {IN21K}), 768-d", ("in21k",))
_hub_vit(IN1K, "vit-b16-in1k", f"ViT-B/16, AugReg ImageNet-21k fine-tuned on ImageNet-1k (timm {IN1K}), 768-d",
         ("in1k",))
register_backbone(BackboneSpec(
    name="vit-tiny-test", build=_tiny, family="test", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    description="2-block ViT for 32 px images (patch 4, 64-d), random init: for tests and smoke runs",
    weights_source="random init (seeded) or --weights FILE", weights_present=lambda: True,
))
