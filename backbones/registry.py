"""A registry of backbone builders by name, fed by our modules and the entry-point group ``slca.backbones``."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

from slca_cli.errors import SlcaError

ENTRY_POINT_GROUP = "slca.backbones"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone. ``build(weights, pretrained)`` returns a module mapping images to features
    of size ``feature_dim`` (its ``num_features``). ``defaults`` are preset values this backbone changes (e.g. a
    CNN has no final LayerNorm to replace: ``fresh_norm=False``); flags still override them."""

    name: str
    build: Callable[..., nn.Module]
    description: str
    family: str
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    weights_source: str = "random init"
    weights_present: Callable[[], Optional[bool]] = field(default=lambda: None)
    aliases: Tuple[str, ...] = ()
    source: str = "slca"
    defaults: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: Dict[str, BackboneSpec] = {}
_ALIASES: Dict[str, str] = {}
_plugins_loaded = False


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone (and its aliases) to the registry; a later registration of a name replaces it."""
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _load_plugins() -> None:
    """Import third-party backbones: each entry point names a BackboneSpec, or a callable returning one or a list."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            specs = obj() if callable(obj) and not isinstance(obj, BackboneSpec) else obj
        except Exception as exc:
            raise SlcaError(f"backbone plugin '{ep.name}' ({ep.value}) failed to load: {exc}; "
                            f"fix or uninstall the package that provides it") from None
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            if not isinstance(spec, BackboneSpec):
                raise SlcaError(f"backbone plugin '{ep.name}' ({ep.value}) did not give a BackboneSpec")
            register_backbone(spec if spec.source != "slca" else _with_source(spec, ep.value))


def _with_source(spec: BackboneSpec, source: str) -> BackboneSpec:
    from dataclasses import replace
    return replace(spec, source=source)


def list_backbones() -> List[BackboneSpec]:
    _load_plugins()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_backbone(name: str) -> BackboneSpec:
    _load_plugins()
    name = _ALIASES.get(name, name)
    if name.startswith(TIMM_PREFIX) and name not in _REGISTRY:
        from .timm_any import timm_spec
        return register_backbone(timm_spec(name[len(TIMM_PREFIX):]))
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY) + sorted(_ALIASES))
        raise SlcaError(f"unknown backbone '{name}'; known: {known}, or timm:<model name> (see `slca backbones`)")
    return _REGISTRY[name]
