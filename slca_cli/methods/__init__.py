"""Method registry: ``--method NAME`` -> a policy object the task loop consults (see base.Method)."""
from __future__ import annotations

from typing import Dict

from ..errors import SlcaError
from .base import Method
from .finetune import SLCA, Joint, Linear, SeqFT, SlowLearner
from .prompts import L2P, DualPrompt
from .ranpac import RanPAC
from .simplecil import SimpleCIL
from .slcapp import SLCAPlusPlus

METHODS: Dict[str, Method] = {m.name: m for m in (SLCA(), SlowLearner(), SeqFT(), Joint(), Linear(), L2P(),
                                                   DualPrompt(), SLCAPlusPlus(), SimpleCIL(), RanPAC())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SlcaError(f"unknown method '{name}'; known: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
