"""The task loop: for each task fit -> statistics -> align -> evaluate -> save; resume after the last saved task."""
from __future__ import annotations

import csv
import io
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .backbones import get_backbone

from .alignment import align_classifier
from .checkpoint import atomic_write_json, atomic_write_text, complete_tasks, read_state, rng_state, save_task
from .checkpoint import set_rng_state
from .closed_form import shrink_class_covariances
from .data import DatasetSplits
from .data.loaders import PassLoaders, resolve_device_augment
from .drift import compensate, drift_features, drift_loaders, estimate_drift
from .distributed import check_batch_split, sum_across_processes
from .errors import SlcaError
from .finite import require_finite_task, require_finite_weights
from .learner import evaluate, feature_batches, fit_task
from .methods import get_method
from .methods.base import ClassifierInputs
from .metrics import summarize
from .midtask import EpochCheckpoints, refuse_leftover
from .model import ContinualModel
from .presets import RunConfig
from .records import RunIdentity, check_same_weights, previous_header, run_fingerprint, run_header
from .protocol import class_order, class_remap
from .restore import ResumePoint, build_model, find_resume_point, restore_model
from .signals import uninterruptible
from .stages import mark
from .statistics import ClassStatistics, cholesky_factors
from .tracking import RunTrackers

Log = Callable[[str], None]


def run_seed(cfg: RunConfig, seed: int, run_dir: Path, accelerator, data: DatasetSplits, *, resume: bool,
             log: Log = print, show_progress: bool = True) -> Dict[str, Any]:
    """One seed of one experiment, task by task; returns the final metrics record. With ``cfg.checkpoint_every``
    N > 0 the task being trained is also saved every N epochs (midtask.py)."""
    method = get_method(cfg.method)
    order = data.class_order or class_order(data.num_classes, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    point = find_resume_point(run_dir, cfg, log) if resume else fresh_start(run_dir)
    if point.last is not None:  # a resumed model comes from its checkpoint, without the pre-trained weights
        model, _ = restore_model(point.last[0].task_dir, cfg=cfg, stage1_heads=cfg.restore_stage1_heads,
                                 opened=point.last)
        set_rng_state(point.last[0].rng)
    else:
        model = build_model(cfg, get_backbone(cfg.backbone), pretrained=True, seed=seed)
        require_finite_weights(model.backbone.state_dict(), f"--weights {cfg.weights}" if cfg.weights else
                               f"backbone {cfg.backbone}")
    device = accelerator.device
    model.to(device)
    check_batch_split(cfg.batch_size, accelerator.num_processes)
    cfg = cfg.replace(device_augment=resolve_device_augment(cfg.device_augment, data, device, cfg.image_size, log))
    previous = previous_header(run_dir) if resume else None
    run = RunIdentity(seed, order, run_fingerprint(data, point.last[0].raw if point.last else previous), cfg)
    header = run_header(run, data.class_names)
    if data.sources:  # a continued run (grow.py): where each task's classes came from
        header["sources"] = data.sources
    if previous is not None:
        check_same_weights(previous, header, run_dir)
    if point.last is not None:
        run.check_continues(point.last[0].raw, point.last[0].task_dir)
    epoch_checkpoints = EpochCheckpoints(run_dir, cfg.checkpoint_every, run, log, accelerator.is_main_process)
    if resume:
        epoch_checkpoints.adopt(point.start_task)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "config.json", header)
        for name, content in data.records.items():  # e.g. ImageNet-R's split, images left out
            atomic_write_json(run_dir / name, content)
    if data.skipped:
        log(f"--skip-bad-images: left out {len(data.skipped)} unreadable image(s), listed in "
            f"{run_dir / 'skipped-images.json'}")
    loaders = PassLoaders.for_run(data, order, cfg, accelerator)
    events = RunTrackers(run_dir, accelerator, cfg.to_dict(), seed)  # events/ and the --log-with trackers
    record = metrics_record(cfg, seed, point)
    for task in range(point.start_task, cfg.num_tasks):
        started = time.perf_counter()
        mark("task", task=task + 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seed_everything(task_seed(seed, task))
        offset = sum(cfg.task_sizes[:task])
        new_classes = list(range(offset, offset + cfg.task_sizes[task]))
        seen_sizes = list(cfg.task_sizes[: task + 1])
        model.add_head(cfg.task_sizes[task])
        method.start_task(model, task, cfg)

        def drift_pass():  # fresh loaders each time: the same images, views and order before and after
            return drift_features(model, drift_loaders(loaders, new_classes, cfg.drift_views, task_seed(seed, task)),
                                  accelerator)
        compensating = cfg.drift_compensation != "off" and task > 0 and method.trains(task, cfg)
        before = drift_pass() if compensating else None
        losses = fit_task(model, loaders.train(new_classes, task_seed(seed, task)), accelerator,
                          method.recipe(model, task, cfg), task=task, label_offset=offset,
                          show_progress=show_progress, epoch_checkpoints=epoch_checkpoints.for_task(task)) \
            if method.trains(task, cfg) else []

        drift = None
        if before is not None:  # the old classes' Gaussians follow the backbone's drift in this task
            drift = estimate_drift(before, drift_pass(), cfg.drift_ridge,
                                   lambda t: sum_across_processes(t, accelerator)).cpu()
            point.means, point.chols = compensate(drift, point.means, point.chols)
        mark("statistics", task=task + 1)
        task_means, task_chol = class_statistics(model, loaders.statistics(new_classes), offset, len(new_classes),
                                                 accelerator, cfg, show_progress, task)
        point.means.append(task_means.cpu())
        point.chols.append(task_chol.cpu())
        point.method_state = method.fit_classifier(model, task, cfg, ClassifierInputs(
            task_means, lambda: feature_batches(model, loaders.statistics(new_classes), accelerator,
                                                f"task {task + 1} classifier", show_progress),
            accelerator, offset, point.method_state, log))

        stage1_heads = model.head_state()
        align_losses: List[float] = []
        if cfg.align and task > 0 and cfg.ca_epochs > 0:
            bar = _progress(cfg.ca_epochs, f"task {task + 1} alignment", show_progress and accelerator.is_main_process)
            align_classifier(model.task_heads, torch.cat(point.means), torch.cat(point.chols), seen_sizes,
                             method.alignment(seen_sizes, cfg),
                             generator=torch.Generator(device=device).manual_seed(task_seed(seed, task)),
                             progress=alignment_progress(task, bar, align_losses))
            bar.close()
            model.task_heads.requires_grad_(False)
            method.after_alignment(model, seen_sizes, cfg)

        require_finite_task(task, finished_tensors(model, stage1_heads, task_means, task_chol, point.method_state,
                                                   drift))
        mark("evaluate", task=task + 1)
        correct, total = evaluate(model, loaders.test(list(range(offset + cfg.task_sizes[task]))), accelerator,
                                  seen_sizes, show_progress, f"task {task + 1} evaluate")
        point.counts.append({"correct": correct, "total": total})
        point.seconds.append(time.perf_counter() - started)
        point.memory.append(peak_memory_mb(device))
        point.train_loss.append([round(x, 6) for x in losses])
        record = metrics_record(cfg, seed, point)
        if accelerator.is_main_process:
            with uninterruptible():  # a stop signal waits until the task folder and metrics are written
                save_finished_task(run_dir, task, cfg, model, stage1_heads, task_means, task_chol, new_classes,
                                   header, record, point, drift)
                mark("metrics", task=task + 1)
                write_metrics(run_dir, record)
                log_task_scalars(events, cfg, task, record, losses, align_losses)
                epoch_checkpoints.discard()
        accelerator.wait_for_everyone()
        if cfg.restore_stage1_heads:
            model.load_head_state(stage1_heads)
        log(task_line(seed, task, cfg, record))
    if point.start_task == cfg.num_tasks and accelerator.is_main_process:
        write_metrics(run_dir, record)  # every task was already done: metrics.json may be a task behind
    events.close()
    return record


def fresh_start(run_dir: Path) -> ResumePoint:
    """Without --resume the folder must hold no finished task (nothing is ever overwritten)."""
    if complete_tasks(run_dir)[0] > 0 or (run_dir / "metrics.json").exists():
        raise SlcaError(f"{run_dir} already holds finished tasks; pass --resume to continue it or choose "
                        f"another --out")
    refuse_leftover(run_dir)
    return ResumePoint()


def class_statistics(model: ContinualModel, loader, offset: int, num_classes: int, accelerator, cfg: RunConfig,
                     show_progress: bool, task: int):
    """Means and Cholesky factors of the new classes' features: test transform, eval mode, computed once. Each
    process reads its own shard; the partial sums are all-reduced, so every process holds the same statistics.
    Covariances: + ``cov_ridge`` I (the paper), or OAS-shrunk and then + ``cov_ridge`` I (``--covariance
    shrinkage``)."""
    accumulator = ClassStatistics(num_classes, model.feature_dim, device=accelerator.device)
    for features, labels in feature_batches(model, loader, accelerator, f"task {task + 1} statistics",
                                            show_progress):
        accumulator.update(features, labels - offset)
    accumulator.all_reduce(lambda t: sum_across_processes(t, accelerator))
    means, covs = accumulator.finalize(cfg.cov_ridge if cfg.covariance == "ridge" else 0.0)
    if cfg.covariance == "shrinkage":
        covs = shrink_class_covariances(covs, accumulator.counts, cfg.cov_ridge)
    return means, cholesky_factors(covs)  # once per class; the sampler reuses the factors in every later task


def alignment_progress(task: int, bar, losses: List[float]) -> Callable[[int, float], None]:
    """The callback of one task's alignment: stage mark, loss record, progress bar with the epoch's loss."""
    def on_epoch(epoch: int, loss: float) -> None:
        mark("align", task=task + 1, epoch=epoch + 1)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    return on_epoch


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_seed(seed: int, task: int) -> int:
    """Every task reseeds from (run seed, task), so a resumed run draws exactly what a straight run draws."""
    return seed * 1000 + task


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _progress(total: int, desc: str, enabled: bool):
    from .progress import progress
    return progress(desc, total, "epoch", enabled=enabled)
