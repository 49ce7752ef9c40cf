"""Process counts against each other: tiny CIFAR-shaped runs in one process (in this one) and under one 2-process
gloo launch that runs them all (tests/launched_runs.py), compared where the design promises equality.

With the same per-item augmentation and batches that split evenly (no padding), two processes train what one does
up to float rounding (gradients are averaged in another order), so the statistics are compared at 1e-4; class
order, task sizes, data checksums and test totals are exact.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, Cli, read_json, write_image_tree

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# 50 classes x 1 training image per task: 5 global batches of 10 (5 per process), no padded last batch.
CIFAR = ["--dataset", "cifar100", "--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress", "--tasks", 2,
         "--epochs", 1, "--batch-size", 10, "--train-per-class", 1, "--test-per-class", 1, "--ca-epochs", 1, "--ca-samples", 4, "--workers", 0]
DRIFT = ["--drift-compensation", "linear", "--drift-views", 2]
RUNS = {"host-drift": ["--augment-on-host", *DRIFT]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp("cifar") / "cifar", [f"c{i:02d}" for i in range(100)],
                            per_split=(2, 1), size=32)


def run_args(tree, name):
    return [str(a) for a in (*CIFAR, "--data-root", tree, *RUNS[name])]


@pytest.fixture(scope="module")
def launched(tree, tmp_path_factory):
    """Every run of RUNS under one 2-process launch: name -> seed folder."""
    base = tmp_path_factory.mktemp("two")
    plan = base / "plan.json"
    plan.write_text(json.dumps([[str(base / name), run_args(tree, name)] for name in RUNS]))
    proc = subprocess.run([*LAUNCH, str(REPO / "tests" / "launched_runs.py"), str(plan)], capture_output=True,
                          text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("x2 no") == len(RUNS)  # really two processes, for every run
    return {name: base / name / "seed-1993" for name in RUNS}


@pytest.fixture(scope="module")
def single(tree, tmp_path_factory):
    """name -> seed folder of the same run in one process, made on first use."""
    base, made = tmp_path_factory.mktemp("one"), {}

    def get(name):
        if name not in made:
            code, _, stderr = Cli()("train", *run_args(tree, name), "--out", base / name)
            assert code == 0, stderr
            made[name] = base / name / "seed-1993"
        return made[name]
    return get


def assert_same_run(one, two, atol=1e-4):
    """The facts of two runs that must agree: exact (order, sizes, data, totals) and statistics to ``atol``."""
    a, b = read_json(one / "config.json"), read_json(two / "config.json")
    for key in ("class_order", "task_sizes", "data_fingerprint"):
        assert a[key] == b[key], key
    counts_one, counts_two = read_json(one / "metrics.json")["counts"], read_json(two / "metrics.json")["counts"]
    assert [c["total"] for c in counts_one] == [c["total"] for c in counts_two]
    for task in sorted(p.name for p in one.glob("task-*")):
        x, y = load_file(str(one / task / "stats.safetensors")), load_file(str(two / task / "stats.safetensors"))
        assert x.keys() == y.keys(), task
        for key in x:
            torch.testing.assert_close(y[key], x[key], atol=atol, rtol=0, msg=f"{task} {key}")


def test_drift_compensation_on_the_host_path_with_two_processes_equals_one(launched, single):
    """Task 2 once failed on every rank with a TypeError (the drift views were sharded as plain indices)."""
    one, two = single("host-drift"), launched["host-drift"]
    assert_same_run(one, two)
    drift = load_file(str(two / "task-02" / "stats.safetensors"))["drift"]
    assert (drift - torch.eye(len(drift), dtype=drift.dtype)).abs().max() > 1e-3  # the backbone really moved
