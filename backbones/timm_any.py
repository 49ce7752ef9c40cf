"""``timm:<model name>``: any timm model as a backbone, described from timm's own configuration."""
from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from slca_cli.errors import SlcaError

from .hub import HF_CACHE_DOC, create_timm, hub_cached, hub_id
from .registry import TIMM_PREFIX, BackboneSpec


def _describe(model_name: str) -> nn.Module:
    """The model without allocating its weights (meta device) where timm allows it."""
    try:
        with torch.device("meta"):
            return timm.create_model(model_name, pretrained=False, num_classes=0)
    except Exception:
        return timm.create_model(model_name, pretrained=False, num_classes=0)


def timm_spec(model_name: str) -> BackboneSpec:
    """A spec for ``timm:<model_name>``: input size and normalization from its pretrained config, the authors'
    fresh-LayerNorm quirk on by default only where a final LayerNorm ``norm`` exists, BatchNorm statistics
    frozen by default where there is BatchNorm."""
    architecture = model_name.split(".", 1)[0]
    if not timm.is_model(architecture):
        raise SlcaError(f"timm has no model '{model_name}' (timm {timm.__version__}); list them with "
                        f"python -c \"import timm; print(timm.list_models('*vit*'))\"")
    try:
        model = _describe(model_name)
    except Exception as exc:
        raise SlcaError(f"timm cannot build '{model_name}': {str(exc).splitlines()[0][:160]}") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    repo = hub_id(model_name)
    has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
    has_final_ln = isinstance(getattr(model, "norm", None), nn.LayerNorm)
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    # ViTs resample their position embeddings for another --image-size (identical at the native size).
    extra = {"dynamic_img_size": True} if isinstance(model, VisionTransformer) else {}
    return BackboneSpec(
        name=TIMM_PREFIX + model_name,
        build=lambda weights=None, pretrained=True: create_timm(model_name, weights, pretrained, **extra),
        description=f"timm {model_name}, {model.num_features}-d{', BatchNorm' if has_bn else ''}",
        family="timm", image_size=size, mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        weights_source=(f"hub {repo} ({HF_CACHE_DOC}) or --weights FILE" if repo else "--weights FILE"),
        weights_present=lambda: hub_cached(repo), source="timm",
        defaults={"fresh_norm": has_final_ln, "freeze_bn": has_bn})
