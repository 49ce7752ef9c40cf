"""Methods: ``--method NAME`` -> its catalog entry (torch-free) and the policy object the task loop consults."""
from __future__ import annotations

from functools import lru_cache

from .catalog import CATALOG, METHODS, MethodSpec, method_names, method_spec, register_method


@lru_cache(maxsize=None)
def get_method(name: str):
    """The ``base.Method`` instance of a catalog entry: its implementation (imported here, on first use), or the
    base class's hooks for a method whose presets say everything."""
    from .base import Method
    spec = method_spec(name)
    return (spec.implementation() if spec.implementation else Method)(spec)


__all__ = ["CATALOG", "METHODS", "MethodSpec", "get_method", "method_names", "method_spec", "register_method"]
