"""`slca eval`: a finished task's checkpoint scored again on the test images of every class it has seen."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

from .data.loaders import PassLoaders, resolve_device_augment
from .errors import SlcaError
from .learner import evaluate
from .metrics import summarize
from .restore import open_checkpoint


def evaluate_checkpoint(task_dir: Path, data_root: Optional[str], device: str = "auto",
                        batch_size: Optional[int] = None, show_progress: bool = True) -> Dict[str, Any]:
    """Rebuild the model of a ``task-NN/`` folder from the folder alone and score it on every seen class."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise SlcaError(f"{task_dir} is not a folder; give a task-NN/ folder of a run, e.g. runs/.../seed-1993/task-03")
    checkpoint = open_checkpoint(task_dir, data_root, device)
    model, state, data, accelerator = checkpoint.model, checkpoint.state, checkpoint.data, checkpoint.accelerator
    seen_sizes = state.seen_sizes
    # The pipeline the run used (host or device transforms), so the stored accuracy is reproduced.
    cfg = state.config.replace(device_augment=resolve_device_augment(state.config.device_augment, data,
                                                                     accelerator.device, state.config.image_size))
    loaders = PassLoaders.for_run(data, state.class_order, cfg, accelerator, batch_size)
    correct, total = evaluate(model, loaders.test(list(range(sum(seen_sizes)))), accelerator, seen_sizes,
                              show_progress)
    result = summarize([{"correct": correct, "total": total}], len(seen_sizes))
    stored = state.metrics["task_accuracy"][state.task]
    differing = sum(abs(a - b) for a, b in zip(correct, state.counts[state.task]["correct"]))
    tolerance = near_tie_tolerance(sum(total), same_numerics(state.config, accelerator, batch_size))
    return {"task": state.task + 1, "task_dir": str(task_dir), "accuracy_row": result["accuracy_matrix"][0],
            "accuracy": result["task_accuracy"][0], "correct": correct, "total": total,
            "stored_accuracy": stored, "differing_images": differing, "tolerance_images": tolerance,
            "matches_stored": differing <= tolerance}


# Share of the test images whose prediction another kernel may flip (near-ties between two classes' logits).
NEAR_TIE_SHARE = 0.005


def same_numerics(cfg, accelerator, batch_size: Optional[int]) -> bool:
    """Whether this evaluation repeats the run's arithmetic bit for bit: eager fp32 on a CPU at the run's batch
    size. A compiled, bf16/fp16 or GPU run (kernels chosen per shape; several processes shard the batches) can
    differ in the last bits of a logit, which flips the prediction of a near-tie."""
    return (accelerator.device.type == "cpu" and accelerator.mixed_precision == "no" and not cfg.compile
            and batch_size in (None, cfg.batch_size))


def near_tie_tolerance(total: int, exact: bool) -> int:
    """How many test images may be counted differently from the stored counts and still match: none when the
    numerics are the run's, else ``NEAR_TIE_SHARE`` of them (at least one)."""
    return 0 if exact else max(1, math.ceil(NEAR_TIE_SHARE * total))
