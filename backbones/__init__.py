"""Backbone plugins: ``get_backbone(name).build(weights, pretrained)`` returns a feature extractor."""
from .registry import ENTRY_POINT_GROUP, BackboneSpec, get_backbone, list_backbones, register_backbone
from . import vit  # noqa: F401  (registers the built-in ViTs)

__all__ = ["ENTRY_POINT_GROUP", "BackboneSpec", "get_backbone", "list_backbones", "register_backbone"]
