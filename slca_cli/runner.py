"""The task loop: for each task fit -> statistics -> classifier -> align -> evaluate -> save; resume after the last
saved task."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .alignment import align_classifier
from .data import DatasetSplits
from .data.loaders import PassLoaders, resolve_device_augment
from .drift import around_stage1, drift_features, drift_loaders
from .distributed import check_batch_split, sum_across_processes
from .finite import require_finite_task
from .learner import class_statistics, evaluate, feature_batches, fit_task
from .methods import get_method
from .methods.base import ClassifierInputs, Method, Stage1Inputs
from .midtask import EpochCheckpoints
from .model import ContinualModel
from .presets import RunConfig
from .progress import alignment_progress, progress
from .protocol import class_order
from .records import (RunIdentity, check_same_weights, finished_tensors, log_task_scalars, metrics_record,
                      peak_memory_mb, previous_header, run_fingerprint, run_header, save_finished_task, task_line,
                      write_metrics, write_run_records)
from .restore import ResumePoint, find_resume_point, fresh_start, starting_model
from .signals import uninterruptible
from .stages import mark
from .tracking import RunTrackers

Log = Callable[[str], None]


@dataclass
class Seed:
    """What every task of one seed shares: the settings, the model and its method, the loaders, the state handed
    from task to task (``point``) and where the results go."""

    cfg: RunConfig
    run: RunIdentity
    run_dir: Path
    accelerator: Any
    method: Method
    model: ContinualModel
    loaders: PassLoaders
    point: ResumePoint
    header: Dict[str, Any]  # config.json: the identity, the settings, the class names in order, the versions
    epoch_checkpoints: EpochCheckpoints
    events: RunTrackers
    log: Log
    show_progress: bool


@dataclass
class Task:
    """One task of the protocol: its index, its RNG seed (drawn once from the run's), its classes."""

    index: int
    seed: int
    offset: int
    classes: List[int]  # the new classes (class-order positions)
    seen_sizes: List[int]  # classes per task up to and including this one


def run_seed(cfg: RunConfig, seed: int, run_dir: Path, accelerator, data: DatasetSplits, *, resume: bool,
             log: Log = print, show_progress: bool = True) -> Dict[str, Any]:
    """One seed of one experiment, task by task; returns the final metrics record. With ``cfg.checkpoint_every``
    N > 0 the task being trained is also saved every N epochs (midtask.py)."""
    s = start_seed(cfg, seed, run_dir, accelerator, data, resume, log, show_progress)
    cfg, point = s.cfg, s.point
    record = metrics_record(cfg, seed, point)
    for index in range(point.start_task, cfg.num_tasks):
        started = time.perf_counter()
        task = begin_task(s, index)
        losses, drift = fit(s, task)
        means, chol = statistics(s, task)
        fit_classifier(s, task, means)
        stage1_heads, align_losses = align(s, task)
        require_finite_task(index, finished_tensors(s.model, stage1_heads, means, chol, point.method_state, drift))
        evaluate_task(s, task)
        point.seconds.append(time.perf_counter() - started)
        point.memory.append(peak_memory_mb(s.accelerator.device))
        point.train_loss.append([round(x, 6) for x in losses])
        record = metrics_record(cfg, seed, point)
        save(s, task, record, stage1_heads, means, chol, drift, losses, align_losses)
        if cfg.restore_stage1_heads:
            s.model.load_head_state(stage1_heads)
        log(task_line(seed, index, cfg, record))
    if point.start_task == cfg.num_tasks and accelerator.is_main_process:
        write_metrics(run_dir, record)  # every task was already done: metrics.json may be a task behind
    s.events.close()
    return record


def start_seed(cfg: RunConfig, seed: int, run_dir: Path, accelerator, data: DatasetSplits, resume: bool, log: Log,
               show_progress: bool) -> Seed:
    """The model (pre-trained, or the last finished task's on --resume), config.json, the loaders, the trackers."""
    # A continued run (grow.py) keeps the order its classes were learned in. class_order seeds NumPy's global RNG:
    # before the checkpoint's RNG state is restored.
    order = data.class_order or class_order(data.num_classes, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    point = find_resume_point(run_dir, cfg, log) if resume else fresh_start(run_dir)
    model = starting_model(cfg, seed, point).to(accelerator.device)
    check_batch_split(cfg.batch_size, accelerator.num_processes)
    cfg = cfg.replace(device_augment=resolve_device_augment(cfg.device_augment, data, accelerator.device,
                                                            cfg.image_size, log))
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
        write_run_records(run_dir, header, data)
    if data.skipped:
        log(f"--skip-bad-images: left out {len(data.skipped)} unreadable image(s), listed in "
            f"{run_dir / 'skipped-images.json'}")
    return Seed(cfg, run, run_dir, accelerator, get_method(cfg.method), model,
                PassLoaders.for_run(data, run.class_order, cfg, accelerator), point, header, epoch_checkpoints,
                RunTrackers(run_dir, accelerator, cfg.to_dict(), seed),  # events/ and the --log-with trackers
                log, show_progress)


def begin_task(s: Seed, index: int) -> Task:
    """Reseed every RNG from (seed, task), add the task's head, let the method prepare."""
    cfg = s.cfg
    mark("task", task=index + 1)
    if s.accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.accelerator.device)
    task = Task(index, task_seed(s.run.seed, index), sum(cfg.task_sizes[:index]),
                list(range(sum(cfg.task_sizes[:index]), sum(cfg.task_sizes[:index + 1]))),
                list(cfg.task_sizes[: index + 1]))
    seed_everything(task.seed)
    s.model.add_head(cfg.task_sizes[index])
    s.method.start_task(s.model, index, cfg)
    return task


def fit(s: Seed, task: Task) -> Tuple[List[float], Optional[torch.Tensor]]:
    """Stage 1 (methods whose classifier is computed skip it) and the method's step after it: its epoch losses and,
    with --drift-compensation, the backbone's drift over both, which moves the earlier tasks' Gaussians."""
    cfg, model, accelerator = s.cfg, s.model, s.accelerator
    if not s.method.trains(task.index, cfg):
        return [], None

    def inputs() -> Stage1Inputs:
        return Stage1Inputs(lambda: s.loaders.train_views(task.classes, task.seed), accelerator, task.offset,
                            s.point.method_state, s.log, s.show_progress)

    def train() -> List[float]:
        s.method.before_stage1(model, task.index, cfg, inputs())
        losses = fit_task(model, s.loaders.train(task.classes, task.seed), accelerator,
                          s.method.recipe(model, task.index, cfg), task=task.index, label_offset=task.offset,
                          show_progress=s.show_progress, epoch_checkpoints=s.epoch_checkpoints.for_task(task.index))
        s.point.method_state = s.method.after_stage1(model, task.index, cfg, inputs())
        return losses
    if cfg.drift_compensation == "off" or task.index == 0:
        return train(), None

    def features() -> List[torch.Tensor]:  # fresh loaders each time: the same images, views and order
        return drift_features(model, drift_loaders(s.loaders, task.classes, cfg.drift_views, task.seed), accelerator)
    losses, drift = around_stage1(train, features, cfg.drift_ridge, lambda t: sum_across_processes(t, accelerator))
    s.point.apply_drift(drift)
    return losses, drift


def statistics(s: Seed, task: Task) -> Tuple[torch.Tensor, torch.Tensor]:
    """The new classes' Gaussians, kept (on the CPU) with the earlier tasks' for alignment."""
    mark("statistics", task=task.index + 1)
    means, chol = class_statistics(s.model, s.loaders.statistics(task.classes), task.offset, len(task.classes),
                                   s.accelerator, s.cfg, s.show_progress, task.index,
                                   s.method.class_covariances(s.cfg))
    s.point.means.append(means.cpu())
    s.point.chols.append(chol.cpu())
    return means, chol


def fit_classifier(s: Seed, task: Task, task_means: torch.Tensor) -> None:
    """Methods whose classifier is computed set the heads here; what they return is kept for the next task."""
    model, accelerator = s.model, s.accelerator
    batches = lambda: feature_batches(model, s.loaders.statistics(task.classes), accelerator,  # noqa: E731
                                      f"task {task.index + 1} classifier", s.show_progress)
    s.point.method_state = s.method.fit_classifier(model, task.index, s.cfg, ClassifierInputs(
        task_means, batches, accelerator, task.offset, s.point.method_state, s.log))


def align(s: Seed, task: Task) -> Tuple[Dict[str, torch.Tensor], List[float]]:
    """Classifier alignment from the stored Gaussians of every seen class; the heads stage 1 left (to save and,
    by default, to restore after evaluation) and the loss of each alignment epoch."""
    cfg, model = s.cfg, s.model
    stage1_heads = model.head_state()
    losses: List[float] = []
    if cfg.align and task.index > 0 and cfg.ca_epochs > 0:
        bar = progress(f"task {task.index + 1} alignment", cfg.ca_epochs, "epoch",
                       enabled=s.show_progress and s.accelerator.is_main_process)
        align_classifier(model.task_heads, torch.cat(s.point.means), torch.cat(s.point.chols), task.seen_sizes,
                         s.method.alignment(task.seen_sizes, cfg),
                         generator=torch.Generator(device=s.accelerator.device).manual_seed(task.seed),
                         progress=alignment_progress(task.index, bar, losses))
        bar.close()
        model.task_heads.requires_grad_(False)
        s.method.after_alignment(model, task.seen_sizes, cfg)
    return stage1_heads, losses


def evaluate_task(s: Seed, task: Task) -> None:
    """Test accuracy on every class seen so far, counted per task (integers, so no batch size changes it)."""
    mark("evaluate", task=task.index + 1)
    correct, total = evaluate(s.model, s.loaders.test(list(range(sum(task.seen_sizes)))), s.accelerator,
                              task.seen_sizes, s.show_progress, f"task {task.index + 1} evaluate")
    s.point.counts.append({"correct": correct, "total": total})


def save(s: Seed, task: Task, record: Dict[str, Any], stage1_heads, means, chol, drift, losses: List[float],
         align_losses: List[float]) -> None:
    """The task folder, metrics and tracker scalars, written by the main process while stop signals wait."""
    if s.accelerator.is_main_process:
        with uninterruptible():  # a stop signal waits until the task folder and metrics are written
            save_finished_task(s.run_dir, task.index, s.cfg, s.model, stage1_heads, means, chol, task.classes,
                               s.header, record, s.point, drift)
            mark("metrics", task=task.index + 1)
            write_metrics(s.run_dir, record)
            log_task_scalars(s.events, s.cfg, task.index, record, losses, align_losses)
            s.epoch_checkpoints.discard()
    s.accelerator.wait_for_everyone()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_seed(seed: int, task: int) -> int:
    """Every task reseeds from (run seed, task), so a resumed run draws exactly what a straight run draws."""
    return seed * 1000 + task
