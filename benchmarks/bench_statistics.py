"""Class statistics and the alignment stage: ours against the straightforward / the authors' way, same run.

1. Statistics of C classes from 256 features each (D = 768), fed in batches of 128 as the feature pass does:
   our fused accumulator (float64 sums, one bmm per batch) against keeping every feature and calling
   torch.cov per class. Target: the same statistics (relative error < 1e-6 in float64).
2. The alignment stage (5 epochs, 256 samples per class, batches of 256, heads of C/10 classes): our
   vectorized sampler with Cholesky factors cached at statistics time and stacked heads, against the
   authors' approach, one torch.distributions.MultivariateNormal per class rebuilt every epoch, heads
   evaluated one by one, task norms in a loop. Target: >= 10x faster. Peak memory of both.

    python -m benchmarks.bench_statistics            # C = 100 and 200, on the GPU when there is one
    python -m benchmarks.bench_statistics --classes 20 --epochs 1 --out /tmp/x   # a quick look
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal

from benchmarks.common import (PeakMemory, add_threads_flag, apply_threads, clock_name, device_info, pick_device,
                               table, timed, write_result)
from slca_cli.alignment import AlignmentRecipe, align_classifier, class_tasks
from slca_cli.statistics import ClassStatistics, cholesky_factors

RIDGE = 1e-4


def make_features(num_classes: int, per_class: int, dim: int, device, seed: int = 0):
    """Shuffled float32 features with a different mean and spread per class (what the feature pass yields)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=gen) * 2
    spread = torch.rand(num_classes, 1, generator=gen) + 0.25
    mixing = torch.randn(dim, dim, generator=gen) / dim ** 0.5
    features = centres[labels] + (torch.randn(len(labels), dim, generator=gen) @ mixing) * spread[labels]
    perm = torch.randperm(len(labels), generator=gen)
    return features[perm].to(device), labels[perm].to(device)


def ours_statistics(features, labels, num_classes, batch):
    acc = ClassStatistics(num_classes, features.shape[1], device=features.device)
    for start in range(0, len(labels), batch):
        acc.update(features[start:start + batch], labels[start:start + batch])
    return acc.finalize(RIDGE)


def collected_statistics(features, labels, num_classes, batch):
    """Keep every batch of features, then the mean and torch.cov of each class (float64)."""
    kept_x, kept_y = [], []
    for start in range(0, len(labels), batch):
        kept_x.append(features[start:start + batch].clone())
        kept_y.append(labels[start:start + batch].clone())
    x, y = torch.cat(kept_x).double(), torch.cat(kept_y)
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    means, covs = [], []
    for c in range(num_classes):
        xc = x[y == c]
        means.append(xc.mean(0))
        covs.append(torch.cov(xc.T) + RIDGE * eye)
    return torch.stack(means), torch.stack(covs)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest over classes of ||ours - ref|| / ||ref|| (Frobenius)."""
    return ((ours - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()


def make_heads(task_sizes: Sequence[int], dim: int, device) -> nn.ModuleList:
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(dim, n) for n in task_sizes]).to(device)
    for h in heads:
        nn.init.trunc_normal_(h.weight, std=0.02)
        nn.init.zeros_(h.bias)
    return heads


def authors_alignment(heads: nn.ModuleList, means: torch.Tensor, covs: torch.Tensor, task_sizes: Sequence[int], *,
                      epochs: int, per_class: int, batch: int, lr: float = 0.01, tau: float = 0.1) -> List[float]:
    """The authors' approach, as their code runs it: every epoch one MultivariateNormal per class (its constructor
    factorizes the covariance), 256 float32 draws each, concatenated and shuffled; per batch the heads' logits
    one head at a time, the per-task norms in a loop over tasks; SGD with a cosine schedule."""
    device = heads[0].weight.device
    params = [p for h in heads for p in h.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    task_of = class_tasks(task_sizes, "authors")
    current = len(task_sizes) - 1
    num_classes = len(means)
    losses = []
    for _ in range(epochs):
        drawn, drawn_labels = [], []
        for c in range(num_classes):
            mean = means[c].to(device, torch.float64) * (0.9 + 0.1 * (int(task_of[c]) + 1) / (current + 1))
            dist = MultivariateNormal(mean.float(), covs[c].to(device).float())
            drawn.append(dist.sample(sample_shape=(per_class,)))
            drawn_labels.extend([c] * per_class)
        x = torch.cat(drawn).float()
        y = torch.tensor(drawn_labels, device=device)
        perm = torch.randperm(len(y), device=device)
        x, y = x[perm], y[perm]
        total = 0.0
        for i in range(num_classes):
            xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
            logits = torch.cat([h(xb) for h in heads], dim=1)
            norms, start = [], 0
            for size in task_sizes:
                norms.append(torch.norm(logits[:, start:start + size], p=2, dim=-1, keepdim=True) + 1e-7)
                start += size
            norm = torch.cat(norms, dim=-1).mean(dim=-1, keepdim=True)
            loss = F.cross_entropy(logits / norm / tau, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
        schedule.step()
        losses.append(total / len(y))
    return losses


def held_out_accuracy(heads, means, chol, per_class=64, seed=123) -> float:
    """Accuracy of the aligned heads on fresh samples of the (unscaled) class Gaussians: both sides must learn."""
    from slca_cli.alignment import sample_features
    gen = torch.Generator(device=means.device).manual_seed(seed)
    x, y = sample_features(means.float(), chol.float(), per_class, gen)
    with torch.no_grad():
        logits = torch.cat([h(x) for h in heads], dim=1)
    return (logits.argmax(1) == y).float().mean().item() * 100


def run_case(num_classes: int, dim: int, per_class: int, epochs: int, device: torch.device,
             baseline: bool) -> Dict:
    task_sizes = [num_classes // 10] * 10
    features, labels = make_features(num_classes, per_class, dim, device)
    times: Dict[str, float] = {"collect_and_cov": 0.0, "accumulator": 0.0, "cholesky": 0.0}
    peaks = {"collect_and_cov": 0.0, "accumulator": 0.0}
    means, covs, chols, errors_means, errors_covs = [], [], [], [], []
    # As the runner does it: one statistics pass per task over the new classes' features, batches of 128.
    for task, size in enumerate(task_sizes):
        first = task * size
        rows = (labels >= first) & (labels < first + size)
        x, y = features[rows], labels[rows] - first
        step: Dict[str, float] = {}
        with PeakMemory(device) as mem_collect, timed(device, step, "collect_and_cov"):
            ref_means, ref_covs = collected_statistics(x, y, size, 128)
        with PeakMemory(device) as mem_ours, timed(device, step, "accumulator"):
            task_means, task_covs = ours_statistics(x, y, size, 128)
        with timed(device, step, "cholesky"):
            chols.append(cholesky_factors(task_covs))
        for key in ("collect_and_cov", "accumulator", "cholesky"):
            times[key] += step[key]
        peaks["collect_and_cov"] = max(peaks["collect_and_cov"], mem_collect.mb)
        peaks["accumulator"] = max(peaks["accumulator"], mem_ours.mb)
        errors_means.append(relative_error(task_means, ref_means))
        errors_covs.append(relative_error(task_covs, ref_covs))
        means.append(task_means)
        covs.append(task_covs)
    means, covs, chol = torch.cat(means), torch.cat(covs), torch.cat(chols)
    del features, labels
    times["cholesky_once"] = times["cholesky"]

    losses: List[float] = []
    heads = make_heads(task_sizes, dim, device)
    with PeakMemory(device) as mem_align, timed(device, times, "align_ours"):
        align_classifier(heads, means, chol, task_sizes,
                         AlignmentRecipe(epochs=epochs, samples_per_class=per_class, batch_size=256,
                                         mean_scaling="authors"),
                         generator=torch.Generator(device=device).manual_seed(0), progress=lambda e, loss: losses.append(loss))
    ours_acc = held_out_accuracy(heads, means, chol)
    result = {"classes": num_classes, "dim": dim, "per_class": per_class, "epochs": epochs,
              "statistics": {"passes": f"10 tasks of {task_sizes[0]} new classes, batches of 128, as the runner",
                             "relative_error_means": max(errors_means), "relative_error_covs": max(errors_covs),
                             "seconds_accumulator": times["accumulator"],
                             "seconds_cholesky_once_per_class": times["cholesky"],
                             "seconds_collect_and_torch_cov": times["collect_and_cov"],
                             "peak_mb_accumulator": peaks["accumulator"],
                             "peak_mb_collect_and_torch_cov": peaks["collect_and_cov"]},
              "alignment": {"seconds_ours": times["align_ours"], "wall_seconds_ours": times["align_ours_wall"],
                            "seconds_cholesky_once_all_classes":
                            times["cholesky_once"], "peak_mb_ours": mem_align.mb, "final_loss_ours": losses[-1],
                            "held_out_accuracy_ours": ours_acc}}
    if baseline:
        heads = make_heads(task_sizes, dim, device)
        torch.manual_seed(0)
        with PeakMemory(device) as mem_base, timed(device, times, "align_authors"):
            base_losses = authors_alignment(heads, means, covs, task_sizes, epochs=epochs, per_class=per_class,
                                            batch=256)
        a = result["alignment"]
        a.update(seconds_authors=times["align_authors"], wall_seconds_authors=times["align_authors_wall"],
                 peak_mb_authors=mem_base.mb,
                 final_loss_authors=base_losses[-1], held_out_accuracy_authors=held_out_accuracy(heads, means, chol),
                 speedup=times["align_authors"] / times["align_ours"],
                 speedup_with_cholesky_of_all_classes=times["align_authors"] /
                 (times["align_ours"] + times["cholesky_once"]))
    return result


def warm_up(device: torch.device) -> None:
    """First calls pay for library initialization; pay it before anything is timed."""
    x, y = make_features(4, 16, 32, device)
    ours_statistics(x, y, 4, 8)
    means, covs = collected_statistics(x, y, 4, 8)
    heads = make_heads([2, 2], 32, device)
    align_classifier(heads, means, cholesky_factors(covs), [2, 2], AlignmentRecipe(epochs=1, samples_per_class=8))
    authors_alignment(heads, means, covs, [2, 2], epochs=1, per_class=8, batch=8)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-class", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-baseline", action="store_true", help="skip the (slow) authors' alignment")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    apply_threads(args.threads, device)
    warm_up(device)
    cases = [run_case(c, args.dim, args.per_class, args.epochs, device, not args.no_baseline)
             for c in args.classes]
    rows = []
    for r in cases:
        s, a = r["statistics"], r["alignment"]
        rows.append([r["classes"], s["relative_error_covs"], s["seconds_accumulator"],
                     s["seconds_collect_and_torch_cov"], s["peak_mb_accumulator"], s["peak_mb_collect_and_torch_cov"],
                     a["seconds_ours"], a.get("seconds_authors"), a.get("speedup"),
                     a.get("speedup_with_cholesky_of_all_classes"), a["peak_mb_ours"], a.get("peak_mb_authors")])
    print(f"{device_info(device).get('gpu') or 'CPU'}, {torch.get_num_threads()} thread(s); times in "
          f"{clock_name(device)}")
    print(table(["C", "cov rel.err", "acc s", "torch.cov s", "acc MB", "cov MB", "align ours s", "authors s",
                 "speedup", "incl. chol", "ours MB", "authors MB"], rows))
    payload = {"machine": device_info(device), "clock": clock_name(device), "targets": {"relative_error_covs": "< 1e-6",
                                                           "alignment_speedup": ">= 10"},
               "cases": cases}
    path = write_result("bench_statistics", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
