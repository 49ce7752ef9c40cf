"""Methods that fine-tune (or freeze) the backbone itself: seqft, sl, slca, joint and linear; their settings are
catalog entries (catalog.py), their behaviour the defaults of base.Method."""
from __future__ import annotations

from typing import List

from .base import Method


class SeqFT(Method):
    """Sequential fine-tuning: the slow learner's loop at one learning rate (the catalog's preset)."""


class SlowLearner(Method):
    """The slow learner alone: no classifier alignment."""


class SLCA(Method):
    """Slow learner + classifier alignment: the default hooks."""


class Joint(Method):
    """All classes in one task with the slow learner's recipe: the upper bound of the comparison."""

    def task_sizes(self, sizes: List[int], num_classes: int) -> List[int]:
        return [num_classes]


class Linear(Method):
    """Frozen pre-trained backbone (lr 0, eval mode, its own final norm); only the per-task heads train."""
