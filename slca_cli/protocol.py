"""Class order and task split of the class-incremental protocol (pure, seeded)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import SlcaError


def class_order(num_classes: int, seed: int) -> List[int]:
    """The authors' order: ``numpy.random.seed(seed); numpy.random.permutation(n)``."""
    np.random.seed(seed)
    return [int(c) for c in np.random.permutation(num_classes)]


def class_remap(order: List[int]) -> List[int]:
    """``remap[c]``: the class-order position (the label the model uses) of dataset class ``c``."""
    remap = [0] * len(order)
    for position, original in enumerate(order):
        remap[original] = position
    return remap


def resolve_task_sizes(num_classes: int, tasks: Optional[int] = None,
                       init_classes: Optional[int] = None,
                       increment: Optional[int] = None) -> List[int]:
    """Sizes of the tasks: ``init`` first, then ``increment`` while classes remain, the last takes the rest.
    With ``tasks`` alone the increment is ceil(classes / tasks) (Cars-196 in 10 tasks: 20 x 9 + 16), or the most
    even split where that would give fewer tasks.

    Any of ``tasks``, ``init_classes`` and ``increment`` may be left out and is derived from the others.
    """
    if num_classes < 1:
        raise SlcaError("the dataset has no classes; check --data-root")
    if tasks is not None and tasks < 1:
        raise SlcaError(f"--tasks must be at least 1, got {tasks}")
    if tasks is not None and tasks > num_classes:
        raise SlcaError(f"--tasks {tasks} is more than the {num_classes} classes of the dataset; "
                        f"use --tasks {num_classes} or fewer")
    for flag, value in (("--init-classes", init_classes), ("--increment", increment)):
        if value is not None and value < 1:
            raise SlcaError(f"{flag} must be at least 1, got {value}")
    if init_classes is not None and init_classes > num_classes:
        raise SlcaError(f"--init-classes {init_classes} is more than the {num_classes} classes of the dataset")
    given_split = init_classes is not None or increment is not None
    if tasks == 1:
        init_classes, increment = num_classes, increment or num_classes
    if init_classes is None and increment is None:
        increment = math.ceil(num_classes / (tasks or 1))
        init_classes = increment
    elif init_classes is None:
        init_classes = increment if tasks is None else max(1, num_classes - increment * (tasks - 1))
    elif increment is None:
        rest = num_classes - init_classes
        increment = rest if tasks is None or tasks == 1 else math.ceil(rest / (tasks - 1))
        increment = max(increment, 1)
    sizes = [min(init_classes, num_classes)]
    while sum(sizes) < num_classes:
        sizes.append(min(increment, num_classes - sum(sizes)))
    if tasks is not None and len(sizes) < tasks and not given_split:
        # ceil(n / tasks) per task runs out of classes early (4 classes in 3 tasks: [2, 2]); split as evenly as
        # possible instead, earlier tasks one larger ([2, 1, 1]).
        base, extra = divmod(num_classes, tasks)
        sizes = [base + 1] * extra + [base] * (tasks - extra)
    if tasks is not None and len(sizes) != tasks:
        raise SlcaError(f"{num_classes} classes with --init-classes {init_classes} and --increment {increment} "
                        f"give {len(sizes)} tasks, not --tasks {tasks}; change one of the three flags")
    return sizes


def task_classes(task_sizes: Sequence[int]) -> List[List[int]]:
    """Positions in the class order (the remapped labels) that belong to each task."""
    out, start = [], 0
    for size in task_sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def task_of_class(task_sizes: Sequence[int]) -> torch.Tensor:
    """For each remapped label (class-order position), the index of the task that introduces it (int64)."""
    return torch.repeat_interleave(torch.arange(len(task_sizes)), torch.tensor(list(task_sizes), dtype=torch.long))
