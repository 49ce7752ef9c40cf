"""The task loop: for each task fit -> statistics -> align -> evaluate -> save; resume; checkpoint evaluation."""
from __future__ import annotations

import csv
import io
import os
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from backbones import BackboneSpec, get_backbone

from . import __version__
from .alignment import align_classifier
from .closed_form import align_closed_form, shrink_class_covariances
from .checkpoint import (MODEL_FILE, STATS_FILE, atomic_write_json, atomic_write_text, complete_tasks,
                         load_tensors, read_state, rng_state, save_task, set_rng_state, sha256_file, task_dir_name)
from .data import DatasetSplits, attach_transforms, load_dataset
from .data.loaders import PassLoaders, resolve_device_augment
from .distributed import check_batch_split, sum_across_processes
from .errors import SlcaError
from .events import ScalarWriter
from .learner import default_workers, evaluate, feature_batches, fit_task
from .methods import get_method
from .methods.base import ClassifierInputs
from .metrics import summarize
from .midtask import EpochCheckpoints, refuse_leftover
from .model import ContinualModel, replace_final_norm
from .presets import IDENTITY_FIELDS, RunConfig
from .protocol import class_order
from .signals import uninterruptible
from .speed import (accelerate_mixed_precision, compile_backbone, enable_fp16_on_cpu, enable_fused_attention,
                    resolve_precision)
from .stages import mark
from .statistics import ClassStatistics, cholesky_factors
from .validation import stored_data_root

Log = Callable[[str], None]


def library_versions() -> Dict[str, str]:
    import accelerate
    import safetensors
    import timm
    import torchvision
    return {"slca": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__, "platform": platform.platform()}


def make_accelerator(device: str, precision: str):
    """The Accelerator owns devices, precision and gradient sync (see speed.resolve_precision for ``auto``).

    ``--batch-size`` stays the global batch under several processes (``split_batches``): each process trains on
    its slice, so the optimization matches a one-process run.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    if device not in ("auto", "cpu", "cuda"):
        raise SlcaError(f"--device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise SlcaError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    launched_on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    on_gpu = device != "cpu" and not launched_on_cpu and torch.cuda.is_available()
    precision = resolve_precision(precision, on_gpu)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=accelerate_mixed_precision(precision),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    enable_fp16_on_cpu(accelerator)
    return accelerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_seed(seed: int, task: int) -> int:
    """Every task reseeds from (run seed, task), so a resumed run draws exactly what a straight run draws."""
    return seed * 1000 + task


def build_model(cfg: RunConfig, spec: BackboneSpec, pretrained: bool, seed: int) -> ContinualModel:
    torch.manual_seed(seed)
    backbone = spec.build(cfg.weights, pretrained)
    if cfg.fresh_norm:
        try:
            replace_final_norm(backbone)
        except ValueError as exc:
            raise SlcaError(str(exc)) from None
    enable_fused_attention(backbone)
    backbone = get_method(cfg.method).wrap_backbone(backbone, cfg)
    if cfg.compile:
        compile_backbone(backbone)
    return ContinualModel(backbone, int(backbone.num_features))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def load_data_for(cfg: RunConfig, data_root: Optional[str]) -> DatasetSplits:
    data = load_dataset(cfg.dataset, data_root, cfg.num_classes if cfg.dataset == "synthetic" else None,
                        cfg.train_per_class, cfg.test_per_class, cfg.skip_bad_images)
    attach_transforms(data, cfg.image_size, cfg.mean, cfg.std)
    return data


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


@dataclass
class ResumePoint:
    start_task: int
    counts: List[Dict[str, List[int]]]
    seconds: List[float]
    memory: List[float]
    means: List[torch.Tensor]
    chols: List[torch.Tensor]
    train_loss: List[List[float]] = None  # per finished task, the mean training loss of each epoch
    method_state: Dict[str, torch.Tensor] = None  # what Method.fit_classifier returned after the last task


def check_same_experiment(stored: Dict[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    current = cfg.to_dict()
    diffs = [f"{k}={stored.get(k)!r} (now {current[k]!r})" for k in IDENTITY_FIELDS if stored.get(k) != current[k]]
    if diffs:
        raise SlcaError(f"--resume: {run_dir} is another experiment: {'; '.join(diffs[:4])}; pass the same flags "
                        f"as that run or choose another --out")


def find_resume_point(run_dir: Path, cfg: RunConfig, model: ContinualModel, log: Log) -> ResumePoint:
    """Load the last intact task folder (falling back past damaged ones) into ``model``."""
    done, warnings = complete_tasks(run_dir)
    for warning in warnings:
        log(f"warning: {warning}")
    empty = ResumePoint(0, [], [], [], [], [])
    if done == 0:
        return empty
    last = run_dir / task_dir_name(done - 1)
    state = read_state(last)
    check_same_experiment(state["config"], cfg, run_dir)
    tensors = load_tensors(last, MODEL_FILE, state)
    for t in range(done):
        model.add_head(cfg.task_sizes[t])
    prefix = "stage1_heads." if cfg.restore_stage1_heads else "task_heads."
    weights = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    weights.update({"task_heads." + k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    model.load_state_dict(weights)
    means, chols = [], []
    for t in range(done):
        folder = run_dir / task_dir_name(t)
        stats = load_tensors(folder, STATS_FILE, read_state(folder))
        means.append(stats["means"])
        chols.append(stats["chol"] if "chol" in stats else cholesky_factors(stats["covs"]))  # older runs: covs
    method_state = {k[len("method."):]: v for k, v in stats.items() if k.startswith("method.")}
    set_rng_state(state["rng"])
    log(f"resuming {run_dir} after {last.name} ({done}/{cfg.num_tasks} tasks done)")
    return ResumePoint(done, state["counts"], state["seconds"], state["peak_memory_mb"], means, chols,
                       state.get("train_loss", [[] for _ in range(done)]), method_state)


def run_seed(cfg: RunConfig, seed: int, run_dir: Path, accelerator, data: DatasetSplits, *, resume: bool,
             log: Log = print, show_progress: bool = True, checkpoint_every: int = 0) -> Dict[str, Any]:
    """One seed of one experiment, task by task; returns the final metrics record. ``checkpoint_every`` N > 0
    also saves the task being trained every N epochs (midtask.py)."""
    spec = get_backbone(cfg.backbone)
    method = get_method(cfg.method)
    order = class_order(data.num_classes, seed)
    remap = class_remap(order)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Pre-trained weights are needed only for a fresh start; a resumed model comes from its checkpoint.
    fresh_start = not resume or complete_tasks(run_dir)[0] == 0
    model = build_model(cfg, spec, pretrained=fresh_start, seed=seed)
    if resume:
        point = find_resume_point(run_dir, cfg, model, log)
    else:
        if complete_tasks(run_dir)[0] > 0 or (run_dir / "metrics.json").exists():
            raise SlcaError(f"{run_dir} already holds finished tasks; pass --resume to continue it or choose "
                            f"another --out")
        refuse_leftover(run_dir)
        point = ResumePoint(0, [], [], [], [], [])
    device = accelerator.device
    model.to(device)
    check_batch_split(cfg.batch_size, accelerator.num_processes)
    cfg = cfg.replace(device_augment=resolve_device_augment(cfg.device_augment, data, device))
    header = {"seed": seed, "config": cfg.to_dict(), "class_order": order,
              "class_names": [data.class_names[c] for c in order], "task_sizes": list(cfg.task_sizes),
              "data_fingerprint": data.fingerprint(), "versions": library_versions()}
    if cfg.weights:
        header["weights_sha256"] = sha256_file(Path(cfg.weights))
    if resume and point.start_task > 0:
        check_same_data(run_dir / task_dir_name(point.start_task - 1), header)
    epoch_checkpoints = EpochCheckpoints(run_dir, checkpoint_every, header, log, accelerator.is_main_process)
    if resume:
        epoch_checkpoints.adopt(point.start_task)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "config.json", header)
        for name, content in data.records.items():  # e.g. ImageNet-R's split, images left out
            atomic_write_json(run_dir / name, content)
    if data.skipped:
        log(f"--skip-bad-images: left out {len(data.skipped)} unreadable image(s), listed in "
            f"{run_dir / 'skipped-images.json'}")
    workers = default_workers(cfg.workers, data)
    loaders = PassLoaders(data, remap, batch_size=cfg.batch_size, image_size=cfg.image_size, mean=cfg.mean,
                          std=cfg.std, device=device, workers=workers, on_device=cfg.device_augment,
                          rank=accelerator.process_index, world=accelerator.num_processes)
    events = ScalarWriter(run_dir, enabled=accelerator.is_main_process)
    counts, seconds, memory = point.counts, point.seconds, point.memory
    train_loss = list(point.train_loss or [])
    means, chols = point.means, point.chols
    method_state = point.method_state or {}
    record: Dict[str, Any] = {}
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
        losses = fit_task(model, loaders.train(new_classes, task_seed(seed, task)), accelerator, task=task,
                 label_offset=offset, epochs=cfg.epochs, lr_backbone=cfg.lr_backbone, lr_head=cfg.lr_head,
                 momentum=cfg.momentum, weight_decay=cfg.weight_decay, lr_drop_epoch=cfg.lr_drop_epoch,
                 freeze_bn=cfg.freeze_bn, show_progress=show_progress,
                 epoch_checkpoints=epoch_checkpoints.for_task(task), recipe=method.recipe(model, task, cfg)) \
            if method.trains(task, cfg) else []
        mark("statistics", task=task + 1)

        # Class statistics of the new classes: test transform, eval mode, computed once. Each process reads its
        # own shard; the partial sums are all-reduced, so every process holds the same statistics.
        accumulator = ClassStatistics(len(new_classes), model.feature_dim, device=device)
        for features, labels in feature_batches(model, loaders.statistics(new_classes), accelerator, "statistics",
                                                show_progress):
            accumulator.update(features, labels - offset)
        accumulator.all_reduce(lambda t: sum_across_processes(t, accelerator))
        task_means, task_covs = accumulator.finalize(cfg.cov_ridge if cfg.covariance == "ridge" else 0.0)
        if cfg.covariance == "shrinkage":
            task_covs = shrink_class_covariances(task_covs, accumulator.counts, cfg.cov_ridge)
        task_chol = cholesky_factors(task_covs)  # once per class; the sampler reuses it in every later task
        means.append(task_means.cpu())
        chols.append(task_chol.cpu())
        batches = lambda: feature_batches(model, loaders.statistics(new_classes), accelerator, "classifier",  # noqa
                                          show_progress)
        method_state = method.fit_classifier(model, task, cfg, ClassifierInputs(task_means, batches, accelerator,
                                                                                offset, method_state, log))

        stage1_heads = model.head_state()
        align_losses: List[float] = []
        if cfg.align and task > 0 and cfg.ca_epochs > 0:
            generator = torch.Generator(device=device).manual_seed(task_seed(seed, task))
            bar = _progress(cfg.ca_epochs, f"task {task + 1} alignment", show_progress and accelerator.is_main_process)
            (align_classifier if cfg.align_mode == "sampled" else align_closed_form)(
                model.task_heads, torch.cat(means), None, seen_sizes, chol=torch.cat(chols),
                             epochs=cfg.ca_epochs, samples_per_class=cfg.ca_samples, batch_size=cfg.ca_batch_size,
                             lr=cfg.ca_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, tau=cfg.tau,
                             logit_norm=cfg.logit_norm, mean_scaling=cfg.mean_scaling, generator=generator,
                             progress=lambda epoch, loss: mark("align", task=task + 1, epoch=epoch + 1) or
                             align_losses.append(loss) or bar.update(1) or bar.set_postfix(loss=f"{loss:.3f}"),
                             sample_transform=method.sample_transform(seen_sizes, cfg))
            bar.close()
            model.task_heads.requires_grad_(False)
            method.after_alignment(model, seen_sizes, cfg)

        mark("evaluate", task=task + 1)
        correct, total = evaluate(model, loaders.test(list(range(offset + cfg.task_sizes[task]))), accelerator,
                                  seen_sizes, show_progress)
        counts.append({"correct": correct, "total": total})
        seconds.append(time.perf_counter() - started)
        memory.append(peak_memory_mb(device))
        train_loss.append([round(x, 6) for x in losses])
        record = metrics_record(cfg, seed, counts, seconds, memory, train_loss)
        if accelerator.is_main_process:
            model_tensors = {k: v for k, v in model.state_dict().items()}
            model_tensors.update({f"stage1_heads.{k}": v for k, v in stage1_heads.items()})
            # The covariance is chol @ chol.T; storing only the factor halves the file (D x D per class).
            stats_tensors = {"means": task_means, "chol": task_chol,
                             "classes": torch.tensor(new_classes, dtype=torch.long),
                             **{f"method.{k}": v for k, v in method_state.items()}}
            state = {"format": "slca-task", "version": 1, "task": task, "seed": seed, "config": cfg.to_dict(),
                     "class_order": order, "task_sizes": list(cfg.task_sizes), "counts": counts,
                     "metrics": {k: record[k] for k in ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc",
                                                       "forgetting")},
                     "seconds": seconds, "peak_memory_mb": memory, "train_loss": train_loss, "rng": rng_state(),
                     "data_fingerprint": header["data_fingerprint"]}
            with uninterruptible():  # a stop signal waits until the task folder and metrics are written
                save_task(run_dir, task, model_tensors, stats_tensors, state)
                mark("metrics", task=task + 1)
                write_metrics(run_dir, record)
                log_task_scalars(events, cfg, task, record, losses, align_losses)
                epoch_checkpoints.discard()
        accelerator.wait_for_everyone()
        if cfg.restore_stage1_heads:
            model.load_head_state(stage1_heads)
        old = record["old_accuracy"][task]
        split = f"old {old:.2f} / new {record['new_accuracy'][task]:.2f}" if old is not None else \
            f"new {record['new_accuracy'][task]:.2f}"
        log(f"seed {seed} task {task + 1}/{cfg.num_tasks}: {sum(seen_sizes)} classes, "
            f"accuracy {record['task_accuracy'][task]:.2f}% ({split}), {seconds[-1]:.1f} s")
    if not record:  # every task was already done: metrics.json may be a task behind if a kill hit in between
        record = metrics_record(cfg, seed, counts, seconds, memory, train_loss)
        if accelerator.is_main_process:
            write_metrics(run_dir, record)
    return record


def log_task_scalars(events: ScalarWriter, cfg: RunConfig, task: int, record: Dict[str, Any],
                     losses: List[float], align_losses: List[float]) -> None:
    """TensorBoard scalars of a finished task: losses by global epoch, accuracies, time and memory by task."""
    events.add_series("loss/train", ((task * cfg.epochs + e + 1, v) for e, v in enumerate(losses)))
    events.add_series("loss/alignment", ((task * cfg.ca_epochs + e + 1, v) for e, v in enumerate(align_losses)))
    scalars = {"accuracy/seen_classes": record["task_accuracy"][task], "accuracy/new": record["new_accuracy"][task],
               "task/seconds": record["seconds"][task], "task/peak_memory_mb": record["peak_memory_mb"][task]}
    if record["old_accuracy"][task] is not None:
        scalars["accuracy/old"] = record["old_accuracy"][task]
    events.add(task + 1, scalars)


def metrics_record(cfg: RunConfig, seed: int, counts: List[Dict[str, List[int]]], seconds: List[float],
                   memory: List[float], train_loss: Optional[List[List[float]]] = None) -> Dict[str, Any]:
    """metrics.json's content after ``len(counts)`` finished tasks (``train_loss``: each task's mean training
    loss per epoch, the first thing to look at when a method learns nothing)."""
    return {"dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method, "seed": seed,
            "task_sizes": list(cfg.task_sizes), "tasks_done": len(counts),
            **summarize(counts, cfg.num_tasks), "seconds": seconds, "peak_memory_mb": memory,
            "train_loss": train_loss or [], "counts": counts}


def check_same_data(last_task: Path, header: Dict[str, Any]) -> None:
    """--resume continues only with the seed, class order and data files the finished tasks were trained on."""
    state = read_state(last_task)
    if state.get("seed") != header["seed"] or state["class_order"] != header["class_order"]:
        raise SlcaError(f"--resume: {last_task} was trained with another seed or class order; the seed folders of "
                        f"{last_task.parent.parent} were rearranged")
    if state["data_fingerprint"] != header["data_fingerprint"]:
        raise SlcaError(f"--resume: the data differs from the data {last_task} was trained on (file list checksum); "
                        f"point --data-root at the same files, or start a new run with another --out")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="epoch", leave=False, disable=not enabled)


def class_remap(order: List[int]) -> List[int]:
    """``remap[c]``: the class-order position (the label the model uses) of dataset class ``c``."""
    remap = [0] * len(order)
    for position, original in enumerate(order):
        remap[original] = position
    return remap


def checkpoint_data(cfg: RunConfig, state: Dict[str, Any], task_dir: Path, data_root: Optional[str]) -> DatasetSplits:
    """The data of a finished task: --data-root, else the validated root recorded at training time; the file-list
    checksum must equal the one the task was trained on."""
    root = data_root if data_root is not None else stored_data_root(cfg, Path(task_dir) / "state.json")
    data = load_data_for(cfg, root)
    if data.fingerprint() != state.get("data_fingerprint"):
        raise SlcaError(f"the data under {data.root or cfg.dataset} differs from the data this checkpoint was "
                        f"trained on (file list checksum); point --data-root at the same files")
    return data


def evaluate_checkpoint(task_dir: Path, data_root: Optional[str], device: str = "auto",
                        batch_size: Optional[int] = None, show_progress: bool = True) -> Dict[str, Any]:
    """Rebuild the model of a ``task-NN/`` folder from the folder alone and score it on every seen class."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise SlcaError(f"{task_dir} is not a folder; give a task-NN/ folder of a run, e.g. runs/.../seed-1993/task-03")
    state = read_state(task_dir)
    cfg = RunConfig.from_dict(state["config"])
    tensors = load_tensors(task_dir, MODEL_FILE, state)
    load_tensors(task_dir, STATS_FILE, state)  # not needed to score, but a damaged folder is reported, not used
    task = int(state["task"])
    spec = get_backbone(cfg.backbone)
    model = build_model(cfg.replace(weights=None, compile=False), spec, pretrained=False, seed=0)
    for t in range(task + 1):
        model.add_head(cfg.task_sizes[t])
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("stage1_heads.")})
    data = checkpoint_data(cfg, state, task_dir, data_root)
    accelerator = make_accelerator(device, cfg.precision)
    model.to(accelerator.device)
    remap = class_remap(state["class_order"])
    seen_sizes = list(cfg.task_sizes[: task + 1])
    workers = default_workers(cfg.workers, data)
    # The pipeline the run used (host or device transforms), so the stored accuracy is reproduced.
    loaders = PassLoaders(data, remap, batch_size=batch_size or cfg.batch_size, image_size=cfg.image_size,
                          mean=cfg.mean, std=cfg.std, device=accelerator.device, workers=workers,
                          on_device=resolve_device_augment(cfg.device_augment, data, accelerator.device))
    correct, total = evaluate(model, loaders.test(list(range(sum(seen_sizes)))), accelerator, seen_sizes,
                              show_progress)
    result = summarize([{"correct": correct, "total": total}], len(seen_sizes))
    stored = state["metrics"]["task_accuracy"][task]
    return {"task": task + 1, "task_dir": str(task_dir), "accuracy_row": result["accuracy_matrix"][0],
            "accuracy": result["task_accuracy"][0], "correct": correct, "total": total,
            "stored_accuracy": stored, "matches_stored": abs(result["task_accuracy"][0] - stored) < 1e-9}


def resolve_run(dataset: str, backbone: str, method: str, flags: Dict[str, Any]):
    """Flags -> (RunConfig, dataset with transforms): load the data, split the tasks, fill in the presets."""
    from .presets import resolve_config, task_split_request
    from .protocol import resolve_task_sizes
    spec = get_backbone(backbone)
    flags = dict(flags)
    num_classes = flags.pop("num_classes", None)
    split = task_split_request(dataset, flags.pop("tasks", None), flags.pop("init_classes", None),
                               flags.pop("increment", None))
    data = load_dataset(dataset, flags.get("data_root"), num_classes, flags.get("train_per_class"),
                        flags.get("test_per_class"), bool(flags.get("skip_bad_images")))
    policy = get_method(method)
    sizes = policy.task_sizes(resolve_task_sizes(data.num_classes, *split), data.num_classes)
    cfg = resolve_config(dataset, spec.name, method, backbone_family=spec.family,
                         backbone_image_size=spec.image_size, backbone_mean=spec.mean, backbone_std=spec.std,
                         num_classes=data.num_classes, task_sizes=sizes, overrides=flags,
                         backbone_defaults=dict(spec.defaults))
    cfg = policy.finalize_config(cfg)
    policy.check_backbone(spec.name, lambda: _probe_backbone(spec))
    if dataset == "synthetic":
        cfg = cfg.replace(train_per_class=len(data.train) // data.num_classes,
                          test_per_class=len(data.test) // data.num_classes)
    if cfg.weights:
        cfg = cfg.replace(weights=str(Path(cfg.weights).expanduser().resolve()))
    if cfg.data_root:  # absolute, so that `slca eval` finds the data from any folder
        cfg = cfg.replace(data_root=str(Path(cfg.data_root).expanduser().resolve()))
    attach_transforms(data, cfg.image_size, cfg.mean, cfg.std)
    return cfg, data


def _probe_backbone(spec: BackboneSpec):
    """The backbone's modules without weights (meta device: no memory, no download), for method checks."""
    try:
        with torch.device("meta"):
            return spec.build(None, False)
    except Exception:  # a builder that cannot run on the meta device: the check happens when the model is built
        return None
