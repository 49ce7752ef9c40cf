"""Methods: ``--method NAME`` -> its catalog entry (torch-free) and the policy object the task loop consults."""
from __future__ import annotations

import importlib
from functools import lru_cache

from .catalog import CATALOG, METHODS, MethodSpec, method_names, method_spec


@lru_cache(maxsize=None)
def get_method(name: str):
    """The ``base.Method`` instance of a catalog entry; its module is imported here, on first use."""
    spec = method_spec(name)
    module, cls = spec.implementation.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(spec)


__all__ = ["CATALOG", "METHODS", "MethodSpec", "get_method", "method_names", "method_spec"]
