"""No non-finite number is saved as a finished result: the tensors of a task (statistics, classifier heads,
backbone) and of a mid-task checkpoint are checked before they are written, and the weights a run starts from
before the first task. A NaN that appears after the loss check (the last step of a task, alignment, a
training-free classifier) stops the run naming the task instead of poisoning every later resume."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .errors import SlcaError

Tensors = Mapping[str, torch.Tensor]

ADVICE = ("under fp16/bf16 use --precision fp32 and --resume; else lower --lr-backbone / --lr-head, or raise --tau "
          "(another experiment: use another --out)")


def first_non_finite(tensors: Tensors) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def require_finite_task(task: int, parts: Dict[str, Tensors]) -> None:
    """Before ``task-NN/`` is written: every part (e.g. "class statistics", "classifier heads", "backbone") finite,
    else a one-line SlcaError naming the task, the part and the first bad tensor; nothing of the task is saved."""
    for what, tensors in parts.items():
        name = first_non_finite(tensors)
        if name is not None:
            raise SlcaError(f"task {task + 1}: the {what} hold NaN or infinite values ({name}), so the task is not "
                            f"saved; finished tasks are kept. Fix: {ADVICE}")


def require_finite_weights(tensors: Tensors, source: str) -> None:
    """The weights a run starts from (pre-trained, or ``--weights FILE``)."""
    name = first_non_finite(tensors)
    if name is not None:
        raise SlcaError(f"the backbone weights from {source} hold NaN or infinite values ({name}); use an intact "
                        f"weights file (--weights) or the hub's")
