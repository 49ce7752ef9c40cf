"""Where a run is: stage markers that name the place in messages (interrupts, out-of-memory) and, for tests,
print a trace line at each mark (``SLCA_TRACE=1``) or hold the process still at one (``SLCA_STALL_AT``).

A mark is a stage name plus ``key=value`` pairs, e.g. ``fit task=2 epoch=1 batch=3``. ``SLCA_STALL_AT`` names one
such point exactly; on reaching it the process prints ``slca-trace: stalled at <point>`` and sleeps
``SLCA_STALL_SECONDS`` (default an hour) so that a test can kill it at a known place."""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, Optional

TRACE = os.environ.get("SLCA_TRACE", "") not in ("", "0")
STALL_AT = os.environ.get("SLCA_STALL_AT") or None
STALL_SECONDS = float(os.environ.get("SLCA_STALL_SECONDS", "3600"))

_current: Dict[str, object] = {}

STAGE_NAMES = {"start": "starting", "command": "running the command", "task": "setting up",
               "fit": "stage-1 training", "fisher": "the Fisher pass (cofima)",
               "subspace": "the input-subspace pass (inflora)", "statistics": "class statistics",
               "align": "classifier alignment", "evaluate": "evaluation", "save": "writing the checkpoint",
               "save-epoch": "writing the mid-task checkpoint",
               "metrics": "writing the metrics"}


def point_text(stage: str, where: Dict[str, object]) -> str:
    return " ".join([stage] + [f"{k}={v}" for k, v in where.items()])


def mark(stage: str, **where: object) -> None:
    """Record that the run has reached ``stage`` (cheap when tracing is off: one dict update)."""
    _current.clear()
    _current["stage"] = stage
    _current.update(where)
    if TRACE or STALL_AT:
        _trace(point_text(stage, where))


def _trace(point: str) -> None:
    if TRACE:
        print(f"slca-trace: {point}", file=sys.stderr, flush=True)
    if STALL_AT == point:
        print(f"slca-trace: stalled at {point}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + STALL_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.05)


def current() -> Dict[str, object]:
    """The last mark, e.g. ``{"stage": "fit", "task": 2, "epoch": 1, "batch": 3}`` (empty before the first)."""
    return dict(_current)


def describe(where: Optional[Dict[str, object]] = None) -> str:
    """The last mark in words: ``task 2, stage-1 training (epoch 1)``."""
    where = current() if where is None else where
    if not where:
        return "before the first task"
    stage = str(where.get("stage"))
    text = f"task {where['task']}, " if "task" in where else ""
    text += STAGE_NAMES.get(stage, stage)
    if "step" in where:
        text += f": {where['step']}"
    if "folder" in where:
        text += f" {where['folder']}/"
    if "epoch" in where:
        text += f" (epoch {where['epoch']})"
    return text


def reset() -> None:
    _current.clear()
