"""What a seed writes and records: its identity, config.json (with the library versions), each task folder, the
metrics (metrics.json, metrics.csv, tracker scalars, the line printed per task)."""
from __future__ import annotations

import csv
import io
import json
import platform
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from . import __version__
from .checkpoint import atomic_write_json, atomic_write_text, read_state, rng_state, save_task, sha256_file
from .errors import SlcaError
from .metrics import summarize
from .presets import RunConfig, identity

if TYPE_CHECKING:  # annotations only: mid-task checkpoints import this module
    from .model import ContinualModel
    from .restore import ResumePoint
    from .tracking import RunTrackers


@dataclass(frozen=True)
class RunIdentity:
    """What makes a seed folder one experiment: the seed, the class order, the data (file-list checksum) and the
    identity fields of its RunConfig. Task folders and mid-task checkpoints are continued only under it."""

    seed: int
    class_order: List[int]
    data_fingerprint: str
    config: RunConfig

    def record(self) -> Dict[str, Any]:
        """The JSON form a mid-task checkpoint stores and compares (``identity`` in in-progress/state.json)."""
        return {"seed": self.seed, "class_order": list(self.class_order), "data_fingerprint": self.data_fingerprint,
                "config": identity(self.config.to_dict())}

    def check_continues(self, state: Dict[str, Any], last_task: Path) -> None:
        """--resume continues only with the seed, class order and data files the finished tasks were trained on
        (the RunConfig's identity fields are compared first, by restore.find_resume_point)."""
        if state.get("seed") != self.seed or state["class_order"] != list(self.class_order):
            raise SlcaError(f"--resume: {last_task} was trained with another seed or class order; the seed folders "
                            f"of {last_task.parent.parent} were rearranged")
        if state["data_fingerprint"] != self.data_fingerprint:
            raise SlcaError(f"--resume: the data differs from the data {last_task} was trained on (file list "
                            f"checksum); point --data-root at the same files, or start a new run with another --out")


def run_header(run: RunIdentity, class_names: List[str]) -> Dict[str, Any]:
    """config.json: the identity, the whole RunConfig, the class names in order, the library versions and the
    sha256 of ``--weights`` (so a later run can tell whether the same file was used)."""
    cfg = run.config
    header = {"seed": run.seed, "config": cfg.to_dict(), "class_order": list(run.class_order),
              "class_names": [class_names[c] for c in run.class_order], "task_sizes": list(cfg.task_sizes),
              "data_fingerprint": run.data_fingerprint, "versions": library_versions()}
    if cfg.weights:
        header["weights_sha256"] = sha256_file(Path(cfg.weights))
    return header


def write_run_records(run_dir: Path, header: Dict[str, Any], data) -> None:
    """config.json (``run_header``) and the dataset's own records (e.g. ImageNet-R's split, images left out)."""
    atomic_write_json(run_dir / "config.json", header)
    for name, content in data.records.items():
        atomic_write_json(run_dir / name, content)


def previous_header(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The config.json a resumed run wrote when it started (None when absent or unreadable)."""
    path = run_dir / "config.json"
    try:
        header = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def run_fingerprint(data, recorded_by: Optional[Dict[str, Any]]) -> str:
    """The data checksum this run records: today's (names in NFC form), or, for a run folder written before names
    were normalized, the legacy one it recorded (``recorded_by``: the last task's state or config.json), as long
    as it is this data's, so the folder stays resumable."""
    recorded = (recorded_by or {}).get("data_fingerprint")
    if isinstance(recorded, str) and recorded != data.fingerprint() and data.matches(recorded):
        return recorded
    return data.fingerprint()


def check_same_weights(previous: Dict[str, Any], header: Dict[str, Any], run_dir: Path) -> None:
    """--resume continues from the weights file the run started with: same content (sha256), wherever it is now."""
    before, now = previous.get("weights_sha256"), header.get("weights_sha256")
    if before == now:
        return
    if before is None:
        raise SlcaError(f"--resume: {run_dir} was started without --weights (the backbone's published weights); "
                        f"drop --weights, or start a new run with another --out")
    where = (previous.get("config") or {}).get("weights") if isinstance(previous.get("config"), dict) else None
    given = f"--weights {header['config']['weights']} has other content" if now else "no --weights was given"
    raise SlcaError(f"--resume: {run_dir} was started from the weights file {where} (sha256 {str(before)[:12]}...), "
                    f"but {given}; pass a file with that content (it may have moved), or start a new run with "
                    f"another --out")


def library_versions() -> Dict[str, str]:
    import accelerate
    import numpy as np
    import safetensors
    import timm
    import torchvision
    return {"slca": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__, "platform": platform.platform()}


def save_finished_task(run_dir: Path, task: int, cfg: RunConfig, model: ContinualModel, stage1_heads, means,
                       chol, new_classes: List[int], header: Dict[str, Any], record: Dict[str, Any],
                       point: ResumePoint, drift: Optional[torch.Tensor] = None) -> None:
    """``task-NN/``: weights (aligned and stage-1 heads), the new classes' statistics (as measured; ``drift``, the
    map this task applied to the earlier ones, is stored beside them) and the state to resume."""
    model_tensors = dict(model.state_dict())
    model_tensors.update({f"stage1_heads.{k}": v for k, v in stage1_heads.items()})
    # The covariance is chol @ chol.T; storing only the factor halves the file (D x D per class).
    stats_tensors = {"means": means, "chol": chol, "classes": torch.tensor(new_classes, dtype=torch.long),
                     **{f"method.{k}": v for k, v in point.method_state.items()}}
    if drift is not None:
        stats_tensors["drift"] = drift
    state = {"format": "slca-task", "version": 1, "task": task, "seed": header["seed"], "config": cfg.to_dict(),
             "class_order": header["class_order"], "class_names": header["class_names"],
             **({"sources": header["sources"]} if "sources" in header else {}),
             "task_sizes": list(cfg.task_sizes), "counts": point.counts,
             "metrics": {k: record[k] for k in ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc",
                                               "forgetting")},
             "seconds": point.seconds, "peak_memory_mb": point.memory, "train_loss": point.train_loss,
             "rng": rng_state(), "data_fingerprint": header["data_fingerprint"],
             "previous_state_sha256": point.state_sha256}
    final = save_task(run_dir, task, model_tensors, stats_tensors, state)
    point.state_sha256 = read_state(final).raw["state_sha256"]


def finished_tensors(model: ContinualModel, stage1_heads, means, chol, method_state, drift
                     ) -> Dict[str, Dict[str, torch.Tensor]]:
    """What ``save_finished_task`` writes, by part, for the non-finite check before it."""
    weights = model.state_dict()
    stats = {"means": means, "chol": chol, **{f"method.{k}": v for k, v in method_state.items()}}
    if drift is not None:
        stats["drift"] = drift
    return {"class statistics": stats,
            "classifier heads": {**{k: v for k, v in weights.items() if k.startswith("task_heads.")},
                                 **{f"stage1_heads.{k}": v for k, v in stage1_heads.items()}},
            "backbone": {k: v for k, v in weights.items() if not k.startswith("task_heads.")}}


def task_line(seed: int, task: int, cfg: RunConfig, record: Dict[str, Any]) -> str:
    old = record["old_accuracy"][task]
    new = record["new_accuracy"][task]
    split = f"old {old:.2f} / new {new:.2f}" if old is not None else f"new {new:.2f}"
    return (f"seed {seed} task {task + 1}/{cfg.num_tasks}: {sum(cfg.task_sizes[:task + 1])} classes, "
            f"accuracy {record['task_accuracy'][task]:.2f}% ({split}), {record['seconds'][task]:.1f} s")


def log_task_scalars(events: RunTrackers, cfg: RunConfig, task: int, record: Dict[str, Any],
                     losses: List[float], align_losses: List[float]) -> None:
    """TensorBoard scalars of a finished task: losses by global epoch, accuracies, time and memory by task."""
    events.add_series("loss/train", ((task * cfg.epochs + e + 1, v) for e, v in enumerate(losses)))
    events.add_series("loss/alignment", ((task * cfg.ca_epochs + e + 1, v) for e, v in enumerate(align_losses)))
    scalars = {"accuracy/seen_classes": record["task_accuracy"][task], "accuracy/new": record["new_accuracy"][task],
               "task/seconds": record["seconds"][task], "task/peak_memory_mb": record["peak_memory_mb"][task]}
    if record["old_accuracy"][task] is not None:
        scalars["accuracy/old"] = record["old_accuracy"][task]
    events.add(task + 1, scalars)


def metrics_record(cfg: RunConfig, seed: int, point: ResumePoint) -> Dict[str, Any]:
    """metrics.json's content after the finished tasks (``train_loss``: each task's mean training loss per
    epoch, the first thing to look at when a method learns nothing)."""
    return {"dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "seed": seed,
            "task_sizes": list(cfg.task_sizes), "tasks_done": len(point.counts),
            **summarize(point.counts, cfg.num_tasks), "seconds": point.seconds, "peak_memory_mb": point.memory,
            "train_loss": point.train_loss, "counts": point.counts}


def write_metrics(run_dir: Path, record: Dict[str, Any]) -> None:
    """metrics.json (everything) and metrics.csv (one row per finished task), both atomic."""
    atomic_write_json(run_dir / "metrics.json", record)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["task", "classes_seen", "accuracy", "old_accuracy", "new_accuracy", "seconds",
                     "peak_memory_mb"])
    seen = 0
    for t, acc in enumerate(record["task_accuracy"]):
        seen += record["task_sizes"][t]
        old = record["old_accuracy"][t]
        writer.writerow([t + 1, seen, f"{acc:.4f}", "" if old is None else f"{old:.4f}",
                         f"{record['new_accuracy'][t]:.4f}", f"{record['seconds'][t]:.2f}",
                         f"{record['peak_memory_mb'][t]:.1f}"])
    atomic_write_text(run_dir / "metrics.csv", out.getvalue())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
