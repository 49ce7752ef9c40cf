"""From per-task correct/total counts to the accuracy matrix, Last-Acc, Inc-Acc, forgetting, old/new."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def _pct(correct: float, total: float) -> float:
    return 100.0 * correct / total if total else 0.0


def accuracy_row(correct: Sequence[int], total: Sequence[int]) -> List[Optional[float]]:
    """Accuracy (percent) on each seen task's classes; None for a task without test images (`slca continue`
    without the old data scores the new classes only), which is no score, not 0 %."""
    return [_pct(c, n) if n else None for c, n in zip(correct, total)]


def seen_accuracy(correct: Sequence[int], total: Sequence[int]) -> float:
    """Micro average over the test images of all seen classes."""
    return _pct(sum(correct), sum(total))


def forgetting(matrix: Sequence[Sequence[Optional[float]]]) -> Optional[float]:
    """Mean over earlier tasks of (best accuracy before the last task - accuracy after it), over the tasks scored
    both before and after (None if there are none)."""
    last = len(matrix) - 1
    if last < 1:
        return 0.0
    drops = []
    for j in range(last):
        before = [matrix[i][j] for i in range(j, last) if matrix[i][j] is not None]
        if before and matrix[last][j] is not None:
            drops.append(max(before) - matrix[last][j])
    return sum(drops) / len(drops) if drops else None


def summarize(counts: Sequence[Dict[str, List[int]]], num_tasks: int) -> Dict[str, object]:
    """``counts[i]`` = {'correct': [...], 'total': [...]} per task seen after task i -> all reported metrics."""
    matrix = [accuracy_row(c["correct"], c["total"]) + [None] * (num_tasks - len(c["total"])) for c in counts]
    task_accuracy = [seen_accuracy(c["correct"], c["total"]) for c in counts]
    old = [seen_accuracy(c["correct"][:-1], c["total"][:-1]) if sum(c["total"][:-1]) else None for c in counts]
    new = [_pct(c["correct"][-1], c["total"][-1]) for c in counts]
    return {
        "accuracy_matrix": matrix,
        "task_accuracy": task_accuracy,
        "old_accuracy": old,
        "new_accuracy": new,
        "last_acc": task_accuracy[-1] if task_accuracy else None,
        "inc_acc": sum(task_accuracy) / len(task_accuracy) if task_accuracy else None,
        "forgetting": forgetting([row[: i + 1] for i, row in enumerate(matrix)]) if counts else None,
    }
