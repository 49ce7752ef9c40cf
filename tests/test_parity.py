"""Process counts against each other: tiny CIFAR-shaped runs in one process (in this one) and under one 2-process
gloo launch that runs them all (tests/launched_runs.py), compared where the design promises equality.

With the same per-item augmentation and batches that split evenly (no padding), two processes train what one does
up to float rounding (gradients are averaged in another order), so the statistics are compared at 1e-4 (frozen
backbones: 1e-9); class order, task sizes, data checksums and test totals are exact. The whole 2-process side is
one launch (tests/launched_runs.py) to keep the cost of process starts out of the suite.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, Cli, read_json, write_image_tree

from slca_cli.evaluation import near_tie_tolerance
from slca_cli.methods import method_names

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# 50 classes x 1 training image per task: 5 global batches of 10 (5 per process), no padded last batch.
CIFAR = ["--dataset", "cifar100", "--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress", "--tasks", 2,
         "--batch-size", 10, "--train-per-class", 1, "--test-per-class", 1, "--ca-epochs", 1, "--ca-samples", 4,
         "--workers", 0, "--ranpac-dim", 32]
DEVICE, DRIFT = ["--augment-on-device", "--epochs", 1], ["--drift-compensation", "linear", "--drift-views", 2]
MIDTASK = [*DEVICE[:-1], 2, "--checkpoint-every", 1]
STOP_AT = "fit task=2 epoch=2 batch=1"  # task 2's first epoch is saved in in-progress/
# name -> (train flags, where the launch interrupts it); every method of the catalog and the alignment options on
# the device path, drift compensation on the host path, and a mid-task stop + --resume on the device path.
RUNS = {**{f"device-{m}": ([*DEVICE, "--method", m], None) for m in method_names()},
        "device-drift": ([*DEVICE, *DRIFT], None),
        "device-closed-form": ([*DEVICE, "--align-mode", "closed-form"], None),
        "device-shrinkage": ([*DEVICE, "--covariance", "shrinkage"], None),
        "host-drift": (["--augment-on-host", "--epochs", 1, *DRIFT], None),
        "midtask-straight": (MIDTASK, None), "midtask": (MIDTASK, STOP_AT), "midtask-resumed": (MIDTASK, None)}
PLAN = [(name, name) for name in RUNS if name != "midtask-resumed"] + [("midtask-resumed", "midtask")]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp("cifar") / "cifar", [f"c{i:02d}" for i in range(100)],
                            per_split=(2, 1), size=32)


def run_args(tree, name):
    extra = ["--resume"] if name == "midtask-resumed" else []
    return [str(a) for a in (*CIFAR, "--data-root", tree, *RUNS[name][0], *extra)]


@pytest.fixture(scope="module")
def launched(tree, tmp_path_factory):
    """Every run of RUNS under one 2-process launch (the resumed run continues the stopped one's folder):
    name -> seed folder."""
    base = tmp_path_factory.mktemp("two")
    plan = base / "plan.json"
    plan.write_text(json.dumps([[str(base / folder), run_args(tree, name), RUNS[name][1]] for name, folder in PLAN]))
    proc = subprocess.run([*LAUNCH, str(REPO / "tests" / "launched_runs.py"), str(plan)], capture_output=True,
                          text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("x2 no") == len(PLAN)  # really two processes, for every run
    assert "resuming task 2 after epoch 1" in proc.stdout  # the stopped run continues mid-task
    return {name: base / folder / "seed-1993" for name, folder in PLAN}


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


def assert_same_layout(one, two):
    """What any two process counts agree on exactly: class order, task sizes, data checksum, test totals, the
    task folders and the names and shapes of every stored tensor."""
    a, b = read_json(one / "config.json"), read_json(two / "config.json")
    for key in ("class_order", "task_sizes", "data_fingerprint"):
        assert a[key] == b[key], key
    counts_one, counts_two = read_json(one / "metrics.json")["counts"], read_json(two / "metrics.json")["counts"]
    assert [c["total"] for c in counts_one] == [c["total"] for c in counts_two]
    tasks = sorted(p.name for p in one.glob("task-*"))
    assert tasks == sorted(p.name for p in two.glob("task-*")) and tasks
    for task in tasks:
        x, y = load_file(str(one / task / "stats.safetensors")), load_file(str(two / task / "stats.safetensors"))
        assert {k: v.shape for k, v in x.items()} == {k: v.shape for k, v in y.items()}, task


def assert_same_run(one, two, rtol=1e-4, atol=1e-5):
    """What two process counts must agree on: the layout exactly; the recorded training loss and every stored
    statistic (means, factors, drift maps, method state) to the tolerance; the correct counts within the near-tie
    tolerance `slca eval` states for runs whose arithmetic differs."""
    assert_same_layout(one, two)
    metrics_one, metrics_two = read_json(one / "metrics.json"), read_json(two / "metrics.json")
    # The recorded loss is the mean over all processes' images, not the main process's shard.
    for x, y in zip(metrics_one["train_loss"], metrics_two["train_loss"]):
        assert y == pytest.approx(x, rel=rtol, abs=atol)
    for x, y in zip(metrics_one["counts"], metrics_two["counts"]):
        differing = sum(abs(i - j) for i, j in zip(x["correct"], y["correct"]))
        assert differing <= near_tie_tolerance(sum(x["total"]), exact=False), (x, y)
    for task in sorted(p.name for p in one.glob("task-*")):
        x, y = load_file(str(one / task / "stats.safetensors")), load_file(str(two / task / "stats.safetensors"))
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=rtol, atol=atol, msg=f"{task} {key}")


# Methods whose backbone does not train by default: their features, hence class statistics, are the same in any
# process layout up to float64 summation order.
FROZEN = ("linear", "simplecil", "ranpac")
# Methods whose adapters train with dropout: each process draws the masks of its own rows from its own generator,
# so two processes train with other masks than one (README, "What holds for several processes"): layout only.
DROPOUT = ("ease", "mos")


@pytest.mark.parametrize("name", [n for n in RUNS if n.startswith("device-")])
def test_every_method_on_the_device_path_with_two_processes_equals_one(launched, single, name):
    """The same global batches, each image augmented alike under any process count: two processes train what one
    does up to float rounding (gradients averaged in another order)."""
    one, two = single(name), launched[name]
    if name.replace("device-", "") in DROPOUT:
        assert_same_layout(one, two)
        return
    if name.replace("device-", "") in FROZEN:
        for task in ("task-01", "task-02"):
            x, y = (load_file(str(r / task / "stats.safetensors")) for r in (one, two))
            for key in ("means", "chol"):
                torch.testing.assert_close(y[key], x[key], rtol=1e-9, atol=1e-12)
    assert_same_run(one, two)
    assert read_json(two / "config.json")["config"]["device_augment"] is True


def test_mid_task_resume_with_two_processes_on_the_device_path_is_bit_identical(launched):
    """Stopped in task 2's second epoch, resumed from the epoch-1 checkpoint: every rank continues with the
    generator state it had (one state, shared by the ranks), so the weights equal the straight run's bit for bit."""
    straight, resumed = launched["midtask-straight"], launched["midtask-resumed"]
    assert read_json(resumed / "metrics.json")["counts"] == read_json(straight / "metrics.json")["counts"]
    a, b = (load_file(str(r / "task-02" / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_drift_compensation_on_the_host_path_with_two_processes_equals_one(launched, single):
    """Task 2 once failed on every rank with a TypeError (the drift views were sharded as plain indices)."""
    one, two = single("host-drift"), launched["host-drift"]
    assert_same_run(one, two)
    drift = load_file(str(two / "task-02" / "stats.safetensors"))["drift"]
    assert (drift - torch.eye(len(drift), dtype=drift.dtype)).abs().max() > 1e-3  # the backbone really moved

