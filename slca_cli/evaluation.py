"""`slca eval`: a finished task's checkpoint scored again on the test images of every class it has seen."""
from __future__ import annotations

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
    return {"task": state.task + 1, "task_dir": str(task_dir), "accuracy_row": result["accuracy_matrix"][0],
            "accuracy": result["task_accuracy"][0], "correct": correct, "total": total,
            "stored_accuracy": stored, "matches_stored": abs(result["task_accuracy"][0] - stored) < 1e-9}
