"""Backbone plugins: ``get_backbone(name).build(weights, pretrained)`` returns a feature extractor."""
from .registry import ENTRY_POINT_GROUP, TIMM_PREFIX, BackboneSpec, get_backbone, list_backbones, register_backbone
from . import vit, selfsup, efficientnet  # noqa: F401,E401  (register the built-in backbones)

__all__ = ["ENTRY_POINT_GROUP", "TIMM_PREFIX", "BackboneSpec", "get_backbone", "list_backbones", "register_backbone"]
