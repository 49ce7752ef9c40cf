"""The seed paper's representation check: a fresh linear classifier on all seen classes over the frozen,
continually learned backbone, compared with the model's own classifier (and with joint training)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_json, complete_tasks, task_dir_name
from .data import RemappedSubset
from .errors import SlcaError

CLASSIFIERS = ("logistic", "ridge")


def standardize(train: torch.Tensor, test: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training features' per-dimension mean and std."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    return (train - mean) / std, (test - mean) / std


def fit_ridge(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
              ridge: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least squares onto one-hot targets with an L2 penalty (bias unpenalized, via centring):
    W = (Xc^T Xc + ridge I)^-1 Xc^T Yc. Returns (weight (C, D), bias (C,))."""
    x = features.double()
    y = F.one_hot(labels, num_classes).double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, xc.T @ yc).T
    bias = y_mean - weight @ x_mean
    return weight.float(), bias.float()


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                 max_iter: int = 300) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (softmax cross-entropy + ``weight_decay/2 ||W||^2``), full batch, L-BFGS
    from zero: deterministic, no learning rate to tune. Returns (weight (C, D), bias (C,))."""
    x = features.float()
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe_accuracy(train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                   num_classes: int, classifier: str = "logistic") -> float:
    """Top-1 accuracy (%) on ``test`` of a linear classifier fitted on ``train`` (standardized features)."""
    x_train, x_test = standardize(train[0].float(), test[0].float())
    if classifier == "ridge":
        weight, bias = fit_ridge(x_train, train[1], num_classes)
    elif classifier == "logistic":
        weight, bias = fit_logistic(x_train, train[1], num_classes)
    else:
        raise SlcaError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got '{classifier}'")
    predictions = (x_test @ weight.T + bias).argmax(1)
    return 100.0 * float((predictions == test[1]).double().mean())


def seed_folders(path: Path) -> List[Path]:
    """A seed-*/ folder itself, or the seed-*/ folders of a run folder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return [path]
    seeds = sorted(p for p in path.glob("seed-*") if (p / "config.json").is_file())
    if not seeds:
        raise SlcaError(f"{path} is neither a run folder (with seed-*/ inside) nor a seed folder; give e.g. "
                        f"runs/cifar100-vit-b16-in21k-slca or its seed-1993/")
    return seeds


def last_task_dir(seed_dir: Path, task: Optional[int]) -> Path:
    done, _ = complete_tasks(seed_dir)
    if done == 0:
        raise SlcaError(f"{seed_dir} has no finished task folder; train it first")
    if task is None:
        return seed_dir / task_dir_name(done - 1)
    if not 1 <= task <= done:
        raise SlcaError(f"--task {task} is not a finished task of {seed_dir} (1..{done})")
    return seed_dir / task_dir_name(task - 1)


def collect_features(model, split, remap, classes, transform, accelerator, batch_size, workers,
                     show_progress) -> Tuple[torch.Tensor, torch.Tensor]:
    from .data.loaders import host_loader
    from .learner import feature_batches
    subset = RemappedSubset(split, remap, classes, transform=transform)
    loader = host_loader(subset, batch_size, False, 0, workers, accelerator.device.type == "cuda")
    xs, ys = [], []
    for features, labels in feature_batches(model, loader, accelerator, "probe features", show_progress):
        xs.append(features.cpu())
        ys.append(labels.cpu())
    return torch.cat(xs), torch.cat(ys).long()


def probe_seed(seed_dir: Path, *, data_root: Optional[str] = None, device: str = "auto", task: Optional[int] = None,
               classifier: str = "logistic", batch_size: Optional[int] = None,
               show_progress: bool = True) -> Dict[str, Any]:
    """Probe one seed's checkpoint after its last (or ``task``-th) task; also writes probe.json next to it."""
    from .data.loaders import default_workers
    from .protocol import class_remap
    from .restore import open_checkpoint
    task_dir = last_task_dir(seed_dir, task)
    checkpoint = open_checkpoint(task_dir, data_root, device)
    model, state, data, accelerator = checkpoint.model, checkpoint.state, checkpoint.data, checkpoint.accelerator
    if "sources" in state.raw:
        raise SlcaError(f"{seed_dir} is a continued run (slca continue): it keeps the old classes' statistics, not "
                        f"their training images, which a probe fits on; probe the run it continued")
    cfg = state.config
    order = state.class_order
    remap = class_remap(order)
    seen = sum(state.seen_sizes)
    classes = list(range(seen))
    workers = default_workers(cfg.workers, data)
    size = batch_size or cfg.batch_size
    # Training images under the test transform: the representation is probed, not augmented.
    train = collect_features(model, data.train, remap, classes, data.test.transform, accelerator, size, workers,
                             show_progress)
    test = collect_features(model, data.test, remap, classes, None, accelerator, size, workers, show_progress)
    accuracy = probe_accuracy(train, test, seen, classifier)
    own = state.metrics["task_accuracy"][state.task]
    result = {"seed": state.seed, "task": state.task + 1, "task_dir": str(task_dir),
              "method": cfg.method, "dataset": cfg.dataset, "backbone": cfg.backbone, "classes": seen,
              "classifier": classifier, "train_images": len(train[1]), "test_images": len(test[1]),
              "own_accuracy": own, "probe_accuracy": accuracy, "gap": accuracy - own}
    if accelerator.is_main_process:
        atomic_write_json(Path(seed_dir) / "probe.json", result)
    return result


def joint_reference(path: Path) -> Dict[int, float]:
    """Last-Acc per seed of a joint run (run folder or seed folder)."""
    values = {}
    for folder in seed_folders(path):
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            raise SlcaError(f"{folder} has no metrics.json; --joint needs a finished `--method joint` run")
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("method") != "joint":
            raise SlcaError(f"--joint {path} is a '{metrics.get('method')}' run; give a `--method joint` run")
        values[int(metrics["seed"])] = float(metrics["last_acc"])
    return values


def probe_table(results: List[Dict[str, Any]], joint: Optional[Dict[int, float]]) -> str:
    """Per seed: the model's own Last-Acc, the linear probe, and joint training; then the mean."""
    header = f"{'seed':>8} {'own classifier':>15} {'linear probe':>13}" + (f" {'joint':>8}" if joint else "")
    lines = [header]

    def joint_of(seed):
        if not joint:
            return None
        return joint.get(seed, statistics.mean(joint.values()))

    for r in results:
        line = f"{r['seed']:>8} {r['own_accuracy']:>15.2f} {r['probe_accuracy']:>13.2f}"
        lines.append(line + (f" {joint_of(r['seed']):>8.2f}" if joint else ""))
    if len(results) > 1:
        mean = lambda key: statistics.mean(r[key] for r in results)  # noqa: E731
        line = f"{'mean':>8} {mean('own_accuracy'):>15.2f} {mean('probe_accuracy'):>13.2f}"
        lines.append(line + (f" {statistics.mean(joint_of(r['seed']) for r in results):>8.2f}" if joint else ""))
    return "\n".join(lines)


def run_probe(path: Path, joint: Optional[Path] = None, log: Callable[[str], None] = print,
              **options) -> Dict[str, Any]:
    results = [probe_seed(folder, **options) for folder in seed_folders(path)]
    reference = joint_reference(joint) if joint is not None else None
    return {"results": results, "joint_last_acc": reference, "table": probe_table(results, reference)}
