"""Two data-parallel processes on CPU (gloo) against one: statistics, evaluation counts, checkpoints, resume.

What can be compared exactly: with the backbone frozen (``--lr-backbone 0``) the features depend only on the
seeded backbone, so the class statistics of every task must equal the one-process ones up to float64 summation
order; test-image totals must be equal whatever the shards; evaluating one checkpoint with one or two processes
must give identical correct counts. Training itself is only approximately the same (the last batch is padded
here, gradients are averaged in another order), so the trained heads are not compared; tests/test_parity.py
compares trained runs whose batches split evenly.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, read_json

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "slca_cli"]
# 3 classes x 7 training images per task (shards of 11 and 10), 9 and 18 test images (shards 5/4, 9/9),
# batches of 4 global = 2 per process.
FLAGS = [*TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 6, "--train-per-class", 7, "--test-per-class", 3,
         "--batch-size", 4, "--lr-backbone", 0, "--lr-head", 0.0003]


def launch(*args):
    proc = subprocess.run([*LAUNCH, *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import Cli
    base = tmp_path_factory.mktemp("dist")
    two_stdout = launch("train", *FLAGS, "--out", base / "two")
    code, _, stderr = Cli()("train", *FLAGS, "--out", base / "one")
    assert code == 0, stderr
    return base / "one" / "seed-1993", base / "two" / "seed-1993", two_stdout


def test_two_processes_give_the_statistics_and_test_counts_of_one(runs):
    one, two, stdout = runs
    assert "x2" in stdout.splitlines()[0]  # really two processes
    assert stdout.count("task 2/2") == 1 and stdout.count("Last-Acc") == 1  # logs from the main process only
    for task in ("task-01", "task-02"):
        a, b = load_file(str(one / task / "stats.safetensors")), load_file(str(two / task / "stats.safetensors"))
        assert a.keys() == b.keys() == {"means", "chol", "classes"}
        assert torch.equal(a["classes"], b["classes"])
        for key in ("means", "chol"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12)
    counts_one, counts_two = read_json(one / "metrics.json")["counts"], read_json(two / "metrics.json")["counts"]
    assert [c["total"] for c in counts_two] == [c["total"] for c in counts_one] == [[9], [9, 9]]


def test_only_the_main_process_writes_the_run_folder(runs):
    _, two, _ = runs
    assert sorted(p.name for p in two.iterdir()) == ["config.json", "events", "metrics.csv", "metrics.json",
                                                     "task-01", "task-02"]
    assert len(list((two / "events").iterdir())) == 1  # one TensorBoard file, not one per process
    for task in ("task-01", "task-02"):
        assert sorted(p.name for p in (two / task).iterdir()) == ["model.safetensors", "state.json",
                                                                  "stats.safetensors"]


def test_evaluating_a_checkpoint_with_two_processes_counts_each_test_image_once(runs):
    one, _, _ = runs
    stdout = launch("eval", one / "task-02", "--device", "cpu", "--no-progress", "--json")
    result = json.loads(stdout)  # printed once, by the main process
    stored = read_json(one / "metrics.json")["counts"][1]
    assert result["total"] == stored["total"] and result["correct"] == stored["correct"]
    assert 0 < sum(result["correct"]) < sum(result["total"])  # a non-trivial count to compare
    assert result["matches_stored"] is True


TWO_PROCESS_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: false
"""


def test_resume_with_two_processes_equals_a_straight_two_process_run(runs, tmp_path):
    """Resumed through `slca train --accelerate-config FILE`, which re-runs itself under accelerate launch."""
    _, two, _ = runs
    copy = tmp_path / "two" / "seed-1993"
    shutil.copytree(two, copy)
    shutil.rmtree(copy / "task-02")
    config = tmp_path / "two-processes.yaml"
    config.write_text(TWO_PROCESS_CONFIG)
    proc = subprocess.run([sys.executable, "-m", "slca_cli", "train", *map(str, FLAGS), "--out", tmp_path / "two",
                           "--resume", "--accelerate-config", config], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    stdout = proc.stdout
    assert "x2" in stdout.splitlines()[0] and "accelerate launch" in proc.stderr
    assert "resuming" in stdout and stdout.count("task 2/2") == 1 and "task 1/2" not in stdout
    straight, resumed = read_json(two / "metrics.json"), read_json(copy / "metrics.json")
    assert resumed["counts"] == straight["counts"]
    a, b = load_file(str(two / "task-02" / "model.safetensors")), load_file(str(copy / "task-02" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_accelerate_config_decides_whether_slca_train_relaunches(tmp_path, monkeypatch):
    from slca_cli.distributed import LAUNCHED_ENV, launcher_command
    from slca_cli.errors import SlcaError
    for key in LAUNCHED_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    argv = ["slca", "train", "--dataset", "synthetic"]
    assert launcher_command(argv) is None  # no config anywhere
    default = tmp_path / "accelerate" / "default_config.yaml"
    default.parent.mkdir()
    default.write_text("num_processes: 1\n")
    assert launcher_command(argv) is None  # one process: just run here
    default.write_text(TWO_PROCESS_CONFIG)
    command = launcher_command(argv)
    assert command.config_file == default
    assert command.argv[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(default)]
    assert command.argv[-3:] == argv[1:] and command.argv[-5:-3] == ["-m", "slca_cli"]
    assert launcher_command(argv + ["--accelerate-config", "none"]) is None
    assert launcher_command(["slca", "eval", "x"]) is None
    single = tmp_path / "one.yaml"
    single.write_text("num_processes: 1\nmixed_precision: bf16\n")
    assert launcher_command(argv + ["--accelerate-config", str(single)]) is not None  # explicit: always
    with pytest.raises(SlcaError, match="does not exist"):
        launcher_command(argv + ["--accelerate-config", str(tmp_path / "missing.yaml")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launcher_command(argv) is None  # already under a launcher


def test_loader_workers_share_the_cores_among_the_processes_of_a_node(monkeypatch):
    from slca_cli.distributed import workers_per_process
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers_per_process(tensor_data=False) == 8  # capped
    assert workers_per_process(tensor_data=True) == 0  # generated tensors need no workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert workers_per_process(tensor_data=False) == 3  # 16 cores / 4 processes, one left for each main loop
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert workers_per_process(tensor_data=False) == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert workers_per_process(tensor_data=False) == 0  # one worker beside the main loop on 2 cores is slower
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert workers_per_process(tensor_data=False) == 2
