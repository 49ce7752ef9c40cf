"""Split CIFAR-100 (10 tasks of 10 classes) on real images and real weights, five methods side by side.

The data is shared/data/cifar100-png.tar.gz (train/<class>/*.png, test/<class>/*.png; read by `--dataset cifar100`
straight from the archive), a per-class subset small enough to run on a CPU; the backbone is
EfficientNet-Lite0 with its ImageNet-1k weights. Methods: seqft, sl, slca, joint (upper bound) and linear (frozen
backbone); then a linear probe of sl's final representation. Writes, under benchmarks/results/real_cifar100/,
the report (results.md/.csv/.json, figures/*.png/.svg, with the published numbers beside ours) and
benchmark.json (settings, machine, wall time per method, the expected-shape check), and prints the table.

    python benchmarks/real_cifar100.py                                  # the committed numbers
    python benchmarks/real_cifar100.py --train-per-class 100 --epochs 10  # bigger
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import CIFAR100_ARCHIVE  # noqa: E402

METHODS = ("seqft", "sl", "slca", "joint", "linear")
# Beyond the paper (issue 13): training-free baselines and slca's alignment options. name -> (method, flags).
VARIANTS = {"simplecil": ("simplecil", {}), "ranpac": ("ranpac", {}),
            "slca-shrinkage": ("slca", dict(covariance="shrinkage")),
            "slca-closed-form": ("slca", dict(align_mode="closed-form")),
            "slca-closed-form-shrinkage": ("slca", dict(align_mode="closed-form", covariance="shrinkage")),
            "slca-drift": ("slca", dict(drift_compensation="linear"))}
ALL = METHODS + tuple(VARIANTS)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("SLCA_CIFAR100_PNG", str(CIFAR100_ARCHIVE)),
                        help="cifar100-png.tar.gz or its extracted folder")
    parser.add_argument("--backbone", default="efficientnet-lite0-in1k")
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", default=None,
                        help="only these class ids, as `slca train --classes` (e.g. 0-19: two tasks; the tests)")
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument("--methods", nargs="+", default=list(ALL), choices=ALL,
                        help="run only these; the others' numbers are kept from the committed benchmark.json")
    parser.add_argument("--runs", default=str(REPO / "benchmarks" / "runs" / "real_cifar100"),
                        help="run folders (not committed; a rerun continues them)")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "real_cifar100"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe of sl")
    return parser.parse_args()


def shape_check(last: dict) -> dict:
    """The paper's ordering of Last-Acc: seqft far below sl, slca above sl, joint on top."""
    checks = {}
    if {"seqft", "sl"} <= set(last):
        checks["seqft far below sl (by 10+ points)"] = last["sl"] - last["seqft"] >= 10
    if {"sl", "slca"} <= set(last):
        checks["slca above sl"] = last["slca"] > last["sl"]
    if "joint" in last:
        checks["joint on top"] = all(last["joint"] >= v for k, v in last.items() if k != "joint")
    return checks


def finished(run_dir: Path) -> bool:
    """A run folder whose every task is done (a partial run would show a misleading Last-Acc in the report)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    return metrics.get("tasks_done") == len(metrics.get("task_sizes", [None]))


def committed_results(path: Path, args) -> dict:
    """The committed benchmark.json's numbers, reused for the methods not run now if its settings are these."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = ("backbone", "train_per_class", "test_per_class", "epochs", "batch_size", "image_size", "classes", "seed")
    if any(old.get("settings", {}).get(k) != getattr(args, k) for k in same):
        return {}
    drop = set(args.methods)
    return {key: {k: v for k, v in old.get(key, {}).items() if k not in drop}
            for key in ("seconds", "last_acc", "first_task_train_loss")} | {"probe_sl": old.get("probe_sl")}


def main() -> None:
    args = parse_args()
    from slca_cli.probe import probe_seed
    from slca_cli.report import build_report
    from slca_cli.resolve import resolve_run
    from slca_cli.runner import run_seed
    from slca_cli.speed import make_accelerator

    runs, results = Path(args.runs), Path(args.results)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    flags = dict(data_root=args.data_root, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                 epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size)
    if args.classes is not None:
        flags["classes"] = args.classes
    seconds, last, first_task_loss = {}, {}, {}
    for method in args.methods:
        base, extra = VARIANTS.get(method, (method, {}))
        cfg, data = resolve_run("cifar100", args.backbone, base, dict(flags, **extra))
        accelerator = make_accelerator(args.device, cfg.precision)
        print(f"== {method}: {len(data.train)} train / {len(data.test)} test images, tasks {list(cfg.task_sizes)}, "
              f"{cfg.epochs} epochs at {cfg.image_size} px", flush=True)
        started = time.perf_counter()
        record = run_seed(cfg, args.seed, runs / method / f"seed-{args.seed}", accelerator, data, resume=True,
                          show_progress=False)
        # The sum of the run's own per-task times: the same whether it ran straight or was resumed.
        seconds[method] = sum(record["seconds"]) if record.get("seconds") else time.perf_counter() - started
        last[method] = record["last_acc"]
        first_task_loss[method] = record["train_loss"][0]
    probe = None
    if "sl" in args.methods and not args.no_probe:
        started = time.perf_counter()
        probe = probe_seed(runs / "sl" / f"seed-{args.seed}", device=args.device, show_progress=False)
        seconds["probe (sl)"] = time.perf_counter() - started
    kept = committed_results(results / "benchmark.json", args)
    report = build_report([runs / m for m in ALL if finished(runs / m / f"seed-{args.seed}")], results, paper=True)
    ran = dict(seconds)
    seconds = {**kept.get("seconds", {}), **seconds}
    last = {**kept.get("last_acc", {}), **last}
    first_task_loss = {**kept.get("first_task_train_loss", {}), **first_task_loss}
    checks = shape_check(last)
    record = {"benchmark": "real_cifar100", "settings": vars(args), "seconds": seconds, "ran_now": sorted(ran),
              "total_seconds": sum(seconds.values()), "last_acc": last, "shape_check": checks,
              # Mean training loss per epoch of task 1: a method stuck near ln(classes) never learned the task.
              "first_task_train_loss": first_task_loss,
              "probe_sl": kept.get("probe_sl") if probe is None else
              {k: probe[k] for k in ("own_accuracy", "probe_accuracy")},
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__,
                          "load_average_start": load_start,
                          "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None}}
    (results / "benchmark.json").write_text(json.dumps(record, indent=2) + "\n")
    print(report["markdown"].split("\n## Figures")[0])
    print(f"\n{'method':<28} {'Last-Acc':>8} {'seconds':>8}")
    for name, value in seconds.items():
        acc = f"{last[name]:.2f}" if name in last else "-"
        print(f"{name:<28} {acc:>8} {value:>8.0f}{'' if name in ran else '  (committed run)'}")
    print(f"{'total':<28} {'':>8} {record['total_seconds']:>8.0f}")
    if probe is not None:
        print(f"\nlinear probe of sl's final backbone: {probe['probe_accuracy']:.2f} vs its own classifier "
              f"{probe['own_accuracy']:.2f}")
    for check, ok in checks.items():
        print(f"{'yes' if ok else 'NO '}  {check}")
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
