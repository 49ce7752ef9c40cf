"""Methods that fine-tune (or freeze) the backbone itself: seqft, sl, slca, joint and linear."""
from __future__ import annotations

from typing import List

from .base import Method


class SeqFT(Method):
    name, label = "seqft", "Seq FT"
    description = "sequential fine-tuning, one learning rate (1e-2) for backbone and head: the lower baseline"


class SlowLearner(Method):
    name, label = "sl", "SL"
    description = "slow learner only: backbone lr 1e-4, head 1e-2, no alignment"


class SLCA(Method):
    name, label = "slca", "SLCA"
    description = "slow learner + classifier alignment (the paper's method)"


class Joint(Method):
    """All classes in one task with the slow learner's recipe: the upper bound of the comparison."""

    name, label = "joint", "Joint"
    description = "all classes in one task, the slow learner's recipe: the upper bound"

    def task_sizes(self, sizes: List[int], num_classes: int) -> List[int]:
        return [num_classes]


class Linear(Method):
    """Frozen pre-trained backbone (lr 0, eval mode, its own final norm); only the per-task heads train."""

    name, label = "linear", "Linear"
    description = "frozen pre-trained backbone, heads only (backbone lr 0)"
