"""Every ViT method of the catalog on CIFAR-100 classes 50-99 from the small pre-trained ViT, and the linear-probe
ceiling, in one table (issue 22): Last-Acc, Inc-Acc, forgetting and seconds per method.

The backbone is `vit-tiny-test` pre-trained on classes 0-49 by benchmarks/pretrain_small_vit.py (its cached
weights are the default `--weights`); the runs use the other 50 classes (`slca train --classes 50-99`), so every
method starts from a representation learned on related, not the same, classes. Each method runs through the real
CLI (`python -m slca_cli train`, a fresh run folder) and its numbers are read from the run's metrics.json.

Methods: every catalog method except seqft, sl, joint and linear (the paper's ablation baselines, not methods a
later paper compares against), so a method added to the catalog joins the table without a change here. Every
trained method gets the same `--epochs` (the papers' 5-50 epochs at these sizes would take many hours on a CPU):
the comparison is at an equal, small training budget, and the JSON and README say so. Everything else is each
method's own preset. The ceiling: a logistic-regression probe (`slca probe`) on the frozen pre-trained features of
all 50 classes' training images (a one-task SimpleCIL run, whose backbone is the pre-trained one untouched).

    python benchmarks/pretrain_small_vit.py                  # once: 17-25 min, cached
    python benchmarks/vit_methods_table.py                   # the table: about 45 min on 2 cores
    python benchmarks/vit_methods_table.py --methods ease    # add or redo one method; the others are kept

benchmarks/results/vit_methods_table-cpu.json is rewritten after every method (a crash keeps what finished); a
later call merges into it when every setting is the same (else the old file is kept beside it as *.previous.json).
Per method it records the git commit and the time it finished. `--smoke`: generated images, tiny sizes (the test
suite).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import CIFAR100_ARCHIVE, RESULTS, cpu_name  # noqa: E402
from slca_cli import checkpoint  # noqa: E402

# The SLCA paper's own baselines (lower bound, ablation, upper bound, heads only): not in the methods table.
NOT_IN_TABLE = ("seqft", "sl", "joint", "linear")
PROBE = "probe"


def table_methods() -> List[str]:
    """Every catalog method but NOT_IN_TABLE, in catalog order (new methods join automatically)."""
    from slca_cli.methods.catalog import method_names
    return [m for m in method_names() if m not in NOT_IN_TABLE]


def pretrained_weights() -> Path:
    """Where benchmarks/pretrain_small_vit.py caches the weights with its default settings."""
    from benchmarks.pretrain_small_vit import cache_paths, parse
    return cache_paths(parse([]))[0]


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"run only these (catalog names, or '{PROBE}'); default: every table method and the "
                             f"probe. Results of the others are kept when the settings are the same")
    parser.add_argument("--data-root", default=os.environ.get("SLCA_CIFAR100_PNG", str(CIFAR100_ARCHIVE)),
                        help="CIFAR-100 as train/<class>/*.png, test/<class>/*.png (folder or .tar.gz)")
    parser.add_argument("--weights", default=None,
                        help="the pre-trained vit-tiny-test backbone (default: pretrain_small_vit.py's cache)")
    parser.add_argument("--classes", default="50-99", help="CIFAR-100 class ids the runs learn (slca --classes)")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5,
                        help="epochs per task for every method that trains, overriding the methods' presets (5: "
                             "L2P's and DualPrompt's own CIFAR-100 schedule; SLCA and CODA-Prompt train 20)")
    parser.add_argument("--train-per-class", type=int, default=500, help="training images per class (500: all)")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class (all 100)")
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument("--threads", type=int, default=1,
                        help="slca --threads (1: steady times beside other jobs; the tiny ViT gains little from 2)")
    parser.add_argument("--workers", type=int, default=0,
                        help="slca train --workers (0: 32 px PNGs decode faster in the process than a worker starts)")
    parser.add_argument("--runs", default=None, help="run folders (default benchmarks/runs/vit_methods_table)")
    parser.add_argument("--out", default=None, help="the JSON (default benchmarks/results/vit_methods_table-cpu.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="generated images (synthetic classes 4-7 of 8), 2 tasks, 1 epoch, 4 images per class")
    args = parser.parse_args(argv)
    known = table_methods() + [PROBE]
    if args.methods is None:
        args.methods = known
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(known)}")
    if args.smoke:
        args.classes, args.tasks, args.epochs, args.train_per_class, args.test_per_class = "4-7", 2, 1, 4, 2
    folder = "vit_methods_table-smoke" if args.smoke else "vit_methods_table"
    args.runs = Path(args.runs or REPO / "benchmarks" / "runs" / folder)
    args.out = Path(args.out or (args.runs / "vit_methods_table-smoke.json" if args.smoke
                                 else RESULTS / "vit_methods_table-cpu.json"))
    if args.weights is None and not args.smoke:
        args.weights = str(pretrained_weights())
    return args


def settings_of(args: argparse.Namespace) -> Dict[str, Any]:
    """What must be equal for two calls' rows to share a table."""
    return {"dataset": "synthetic" if args.smoke else "cifar100", "classes": args.classes, "tasks": args.tasks,
            "epochs": args.epochs, "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
            "seed": args.seed, "backbone": "vit-tiny-test",
            "weights_sha256": checkpoint.sha256_file(Path(args.weights)) if args.weights else None}


def data_flags(args: argparse.Namespace) -> List[str]:
    if args.smoke:
        return ["--dataset", "synthetic", "--num-classes", "8", "--classes", args.classes]
    return ["--dataset", "cifar100", "--data-root", str(args.data_root), "--classes", args.classes]


def git_commit() -> Dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def slca(args: argparse.Namespace, *cli_args: str) -> subprocess.CompletedProcess:
    """`python -m slca_cli ...` of this checkout (PYTHONPATH first), as a user runs it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    threads = ["--threads", str(args.threads)] if args.threads else []
    return subprocess.run([sys.executable, "-m", "slca_cli", *cli_args, *threads], capture_output=True, text=True,
                          env=env, cwd=REPO)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(args: argparse.Namespace, method: str, out: Path, tasks: int) -> subprocess.CompletedProcess:
    if out.exists():
        shutil.rmtree(out)  # a fresh run: its seconds are this call's
    weights = ["--weights", str(args.weights)] if args.weights else []
    return slca(args, "train", *data_flags(args), "--tasks", str(tasks), "--backbone", "vit-tiny-test", *weights,
                "--method", method, "--epochs", str(args.epochs), "--train-per-class", str(args.train_per_class),
                "--test-per-class", str(args.test_per_class), "--seed", str(args.seed), "--device", "cpu",
                "--workers", str(args.workers), "--no-progress", "--out", str(out))


def failure(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def run_method(args: argparse.Namespace, method: str) -> Dict[str, Any]:
    from slca_cli.methods.catalog import method_spec
    started, cpu = time.perf_counter(), children_cpu_seconds()
    out = args.runs / method
    proc = train(args, method, out, args.tasks)
    row: Dict[str, Any] = {"label": method_spec(method).label, "seconds": round(time.perf_counter() - started, 1),
                           "cpu_seconds": round(children_cpu_seconds() - cpu, 1)}
    if proc.returncode != 0:
        return dict(row, status="failed", error=failure(proc))
    metrics = json.loads((out / f"seed-{args.seed}" / "metrics.json").read_text())
    return dict(row, status="ok", last_acc=metrics["last_acc"], inc_acc=metrics["inc_acc"],
                forgetting=metrics.get("forgetting"), task_accuracy=metrics["task_accuracy"],
                task_seconds=[round(s, 1) for s in metrics["seconds"]], run=str(out))


def run_probe(args: argparse.Namespace) -> Dict[str, Any]:
    """The ceiling: a linear probe on the frozen pre-trained features of every class (a one-task SimpleCIL run)."""
    started, cpu = time.perf_counter(), children_cpu_seconds()
    out = args.runs / PROBE
    proc = train(args, "simplecil", out, 1)
    if proc.returncode == 0:
        proc = slca(args, "probe", str(out / f"seed-{args.seed}"), "--device", "cpu", "--json", "--no-progress")
    row: Dict[str, Any] = {"label": "linear probe (frozen pre-trained features, all classes)",
                           "seconds": round(time.perf_counter() - started, 1),
                           "cpu_seconds": round(children_cpu_seconds() - cpu, 1)}
    if proc.returncode != 0:
        return dict(row, status="failed", error=failure(proc))
    result = json.loads(proc.stdout)["results"][0]
    return dict(row, status="ok", last_acc=result["probe_accuracy"], inc_acc=None, forgetting=None,
                prototypes_acc=result["own_accuracy"], classifier=result["classifier"], run=str(out))


def load_previous(path: Path, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The rows of an earlier call with the same settings; a file with other settings is moved aside."""
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        previous = {}
    if previous.get("settings") == settings:
        return dict(previous.get("methods", {}))
    aside = path.with_suffix(".previous.json")
    os.replace(path, aside)
    print(f"note: {path} holds other settings; kept as {aside}, starting a new table", file=sys.stderr)
    return {}


def write(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(record: Dict[str, Any]) -> str:
    """Methods in table order, then the probe; failed ones say so."""
    order = table_methods() + [PROBE]
    names = sorted(record["methods"], key=lambda m: order.index(m) if m in order else len(order))
    lines = ["| method | Last-Acc | Inc-Acc | forgetting | seconds | CPU seconds |", "|---|---|---|---|---|---|"]
    for name in names:
        row = record["methods"][name]
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | failed: {row['error'][:80]} | | | {row['seconds']:.0f} | |")
            continue
        lines.append(f"| {row['label']} | {fmt(row['last_acc'])} | {fmt(row['inc_acc'])} | "
                     f"{fmt(row['forgetting'])} | {row['seconds']:.0f} | {row.get('cpu_seconds', 0):.0f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if args.weights and not Path(args.weights).is_file():
        print(f"error: no pre-trained weights at {args.weights}; run `python benchmarks/pretrain_small_vit.py` "
              f"first (17-25 min) or pass --weights FILE", file=sys.stderr)
        return 2
    if not args.smoke and not Path(args.data_root).exists():
        print(f"error: {args.data_root} does not exist; pass --data-root (CIFAR-100 PNGs, folder or .tar.gz)",
              file=sys.stderr)
        return 2
    settings = settings_of(args)
    record = {"benchmark": "vit_methods_table", "settings": settings,
              "note": f"every method trains {args.epochs} epoch(s) per task (the methods' own presets, 5-50 epochs, "
                      f"are overridden uniformly to fit a CPU hour); every other setting is the method's preset",
              "not_in_table": list(NOT_IN_TABLE), "weights": args.weights,
              "machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0))
                          if hasattr(os, "sched_getaffinity") else os.cpu_count(), "threads": args.threads,
                          "workers": args.workers},
              "seconds": "wall seconds of the whole slca process (start-up, data loading, every task); cpu_seconds: "
                         "its CPU time (user + system), which other jobs on the machine inflate much less",
              "methods": load_previous(args.out, settings)}
    failed = 0
    for method in args.methods:
        print(f"{method}: running ...", flush=True)
        code = git_commit()  # the code the method runs with
        row = run_probe(args) if method == PROBE else run_method(args, method)
        row.update(code, finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        record["methods"][method] = row
        write(args.out, record)  # after every method: a crash keeps what finished
        failed += row["status"] != "ok"
        print(f"{method}: " + (f"Last-Acc {fmt(row['last_acc'])}" if row["status"] == "ok" else
                               f"failed: {row['error']}") + f" ({row['seconds']:.0f} s)", flush=True)
    print(f"\n{settings['dataset']} classes {args.classes}, {args.tasks} tasks, {args.epochs} epoch(s) per task, "
          f"{args.train_per_class} train / {args.test_per_class} test images per class, seed {args.seed}; "
          f"{args.out}\n")
    print(markdown(record))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
