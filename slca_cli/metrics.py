"""From per-task correct/total counts to the accuracy matrix, Last-Acc, Inc-Acc, forgetting, old/new."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def _pct(correct: float, total: float) -> float:
    return 100.0 * correct / total if total else 0.0


def accuracy_row(correct: Sequence[int], total: Sequence[int]) -> List[float]:
    """Accuracy (percent) on each seen task's classes."""
    return [_pct(c, n) for c, n in zip(correct, total)]


def seen_accuracy(correct: Sequence[int], total: Sequence[int]) -> float:
    """Micro average over the test images of all seen classes."""
    return _pct(sum(correct), sum(total))


def forgetting(matrix: Sequence[Sequence[Optional[float]]]) -> float:
    """Mean over earlier tasks of (best accuracy before the last task - accuracy after it)."""
    last = len(matrix) - 1
    if last < 1:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    return sum(drops) / len(drops)


def summarize(counts: Sequence[Dict[str, List[int]]], num_tasks: int) -> Dict[str, object]:
    """``counts[i]`` = {'correct': [...], 'total': [...]} per task seen after task i -> all reported metrics."""
    matrix = [accuracy_row(c["correct"], c["total"]) + [None] * (num_tasks - len(c["total"])) for c in counts]
    task_accuracy = [seen_accuracy(c["correct"], c["total"]) for c in counts]
    old = [seen_accuracy(c["correct"][:-1], c["total"][:-1]) if len(c["total"]) > 1 else None for c in counts]
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
