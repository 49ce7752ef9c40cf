"""CPU threads under a busy neighbour: one small `slca train` (the demo's digits + EfficientNet-Lite0 at 64 px,
one method) per configuration, back to back under the same conditions, with a busy-looping neighbour process on
the CPU; wall time and CPU-seconds of each run (the slca process and its loader workers)."""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, cpu_name, table, write_result  # noqa: E402


def torch_default_threads() -> int:
    """What slca used before --threads: torch's own default in a fresh process."""
    return int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                              capture_output=True, text=True, check=True).stdout)


# label -> (extra slca flags, extra environment).
# "before" is what slca did until this change: torch's default thread count and libgomp's default waits (spin
# 300,000 times, then sleep: GOMP_SPINCOUNT's documented default, which also turns slca's PASSIVE default off).
CONFIGS = {
    "before: torch default threads, spinning waits": (lambda: ["--threads", str(torch_default_threads())],
                                                      {"GOMP_SPINCOUNT": "300000"}),
    "after: default (affinity cores, passive waits)": (lambda: [], {}),
    "after: --threads 1": (lambda: ["--threads", "1"], {}),
}


def neighbour() -> subprocess.Popen:
    """A process that keeps one core busy, as another user's job does."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def one_run(flags, env, args, out: Path):
    command = [sys.executable, "-m", "slca_cli", "train", "--dataset", "digits", "--backbone", args.backbone,
               "--image-size", "64", "--tasks", "5", "--epochs", str(args.epochs), "--train-per-class",
               str(args.train_per_class), "--test-per-class", "10", "--batch-size", "32", "--method", "slca",
               "--device", "cpu", "--progress", "off", "--out", str(out), *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO), **env),
                          cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(command)}\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="efficientnet-lite0-in1k")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1, help="Times each configuration runs (interleaved).")
    parser.add_argument("--neighbours", type=int, default=1, help="Busy-looping processes beside the runs.")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help="Which configurations (labels).")
    args = parser.parse_args(argv)
    busy = [neighbour() for _ in range(args.neighbours)]
    results = {label: [] for label in args.configs}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                for i, label in enumerate(args.configs):
                    flags, env = CONFIGS[label]
                    wall, cpu = one_run(flags(), env, args, Path(tmp) / f"r{round_}-{i}")
                    results[label].append({"wall_s": wall, "cpu_s": cpu})
                    print(f"{label}: {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    finally:
        for process in busy:
            process.kill()
    rows = []
    for label, runs in results.items():
        rows.append([label, sum(r["wall_s"] for r in runs) / len(runs), sum(r["cpu_s"] for r in runs) / len(runs)])
    print(table(["configuration", "wall s", "CPU-s"], rows))
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    payload = {"cpu": cpu_name(), "affinity_cores": len(os.sched_getaffinity(0)), "neighbours": args.neighbours,
               "load_average_at_end": load, "settings": vars(args), "results": results}
    print(f"wrote {write_result('bench_threads', payload)}")


if __name__ == "__main__":
    main()
