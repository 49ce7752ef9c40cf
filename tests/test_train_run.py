"""Whole runs through the CLI on synthetic data and the tiny ViT."""
import csv
import hashlib
import shutil

import torch
from safetensors.torch import load_file

from conftest import TINY, read_json, run_subprocess


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_writes_every_output(finished_run):
    run, stdout = finished_run
    assert "task 3/3" in stdout and "Last-Acc" in stdout and "mean" in stdout
    config = read_json(run / "config.json")
    assert config["config"]["task_sizes"] == [3, 3, 3]
    assert sorted(config["class_order"]) == list(range(9))
    assert {"torch", "timm", "accelerate", "safetensors"} <= set(config["versions"])
    assert len(config["data_fingerprint"]) == 64

    metrics = read_json(run / "metrics.json")
    matrix = metrics["accuracy_matrix"]
    assert len(matrix) == 3 and matrix[0][1:] == [None, None] and None not in matrix[2]
    assert len(metrics["task_accuracy"]) == 3
    assert metrics["last_acc"] == metrics["task_accuracy"][-1]
    assert abs(metrics["inc_acc"] - sum(metrics["task_accuracy"]) / 3) < 1e-9
    assert metrics["forgetting"] is not None
    assert len(metrics["seconds"]) == 3 and len(metrics["peak_memory_mb"]) == 3
    assert all(0 <= a <= 100 for a in metrics["task_accuracy"])

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["task"]) for r in rows] == [1, 2, 3]
    assert abs(float(rows[-1]["accuracy"]) - metrics["last_acc"]) < 1e-3

    for t in (1, 2, 3):
        folder = run / f"task-{t:02d}"
        state = read_json(folder / "state.json")
        assert state["task"] == t - 1 and state["class_order"] == config["class_order"]
        assert set(state["rng"]) == {"python", "numpy", "torch"}
        for name in ("model.safetensors", "stats.safetensors"):
            assert state["sha256"][name] == sha(folder / name)
        model = load_file(str(folder / "model.safetensors"))
        assert any(k.startswith("backbone.") for k in model)
        assert sum(1 for k in model if k.startswith("task_heads.") and k.endswith(".weight")) == t
        assert sum(1 for k in model if k.startswith("stage1_heads.") and k.endswith(".weight")) == t
        stats = load_file(str(folder / "stats.safetensors"))
        assert stats["means"].shape == (3, 64) and stats["chol"].shape == (3, 64, 64)
        assert torch.equal(stats["chol"], stats["chol"].tril())  # the covariance's lower Cholesky factor
        assert stats["classes"].tolist() == list(range(3 * (t - 1), 3 * t))
    assert not list(run.glob(".*")), "no temporary files left behind"


def test_eval_reproduces_the_stored_accuracy(finished_run, cli):
    run, _ = finished_run
    stored = read_json(run / "metrics.json")
    code, stdout, stderr = cli("eval", run / "task-02", "--device", "cpu", "--no-progress", "--json",
                               "--batch-size", 5)
    assert code == 0, stderr
    import json
    result = json.loads(stdout)
    assert result["accuracy"] == stored["task_accuracy"][1]
    assert result["accuracy_row"] == stored["accuracy_matrix"][1][:2]
    assert result["matches_stored"] is True
    code, stdout, _ = cli("eval", run / "task-02", "--device", "cpu", "--no-progress")
    assert code == 0 and "matches the stored" in stdout and "T2" in stdout


def test_resume_after_losing_the_last_task_gives_the_same_metrics(finished_run, tmp_path, cli):
    run, _ = finished_run
    copy = tmp_path / "run" / "seed-1993"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "task-03")
    code, stdout, stderr = cli("train", *TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 9,
                               "--out", tmp_path / "run", "--resume")
    assert code == 0, stderr
    assert "resuming" in stdout and "task 3/3" in stdout and "task 1/3" not in stdout
    straight, resumed = read_json(run / "metrics.json"), read_json(copy / "metrics.json")
    for key in ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc", "forgetting", "counts"):
        assert resumed[key] == straight[key], key
    assert load_file(str(copy / "task-03" / "model.safetensors"))["task_heads.2.weight"].equal(
        load_file(str(run / "task-03" / "model.safetensors"))["task_heads.2.weight"])


def test_several_seeds_end_with_a_table(tmp_path, cli):
    code, stdout, stderr = cli("train", *TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4,
                               "--train-per-class", 8, "--test-per-class", 4, "--seed", 1, "--seed", 2,
                               "--out", tmp_path)
    assert code == 0, stderr
    assert (tmp_path / "seed-1" / "metrics.json").exists() and (tmp_path / "seed-2" / "metrics.json").exists()
    table = stdout[stdout.index("Last-Acc"):]
    assert "\n       1 " in table and "\n       2 " in table and "+-" in table.splitlines()[-1]
    a, b = read_json(tmp_path / "seed-1" / "config.json"), read_json(tmp_path / "seed-2" / "config.json")
    assert a["class_order"] != b["class_order"] or a["class_order"] == [0, 1, 2, 3]


def test_alignment_beats_the_slow_learner_alone_under_task_recency_bias(tmp_path, cli):
    """Per-task heads trained only on their own classes are uncalibrated against each other; alignment
    on sampled features of all seen classes must fix it. Fails if alignment is a no-op."""
    results = {}
    for method in ("sl", "slca"):
        code, _, stderr = cli("train", *TINY, "--method", method, "--tasks", 4, "--epochs", 2, "--num-classes", 20,
                              "--train-per-class", 16, "--test-per-class", 10, "--out", tmp_path / method)
        assert code == 0, stderr
        results[method] = read_json(tmp_path / method / "seed-1993" / "metrics.json")
    assert results["slca"]["last_acc"] > results["sl"]["last_acc"] + 20  # measured: 85.5 vs 18.5
    assert results["slca"]["task_accuracy"][0] == results["sl"]["task_accuracy"][0]  # task 1 has no alignment
    sl_heads = load_file(str(tmp_path / "sl" / "seed-1993" / "task-04" / "model.safetensors"))
    ca_heads = load_file(str(tmp_path / "slca" / "seed-1993" / "task-04" / "model.safetensors"))
    assert not ca_heads["task_heads.0.weight"].equal(ca_heads["stage1_heads.0.weight"])
    assert sl_heads["task_heads.0.weight"].equal(sl_heads["stage1_heads.0.weight"])


def test_seqft_uses_one_learning_rate(tmp_path, cli):
    code, _, stderr = cli("train", *TINY, "--method", "seqft", "--tasks", 2, "--epochs", 1, "--num-classes", 4,
                          "--train-per-class", 8, "--test-per-class", 4, "--out", tmp_path)
    assert code == 0, stderr
    cfg = read_json(tmp_path / "seed-1993" / "config.json")["config"]
    assert cfg["lr_backbone"] == cfg["lr_head"] == 0.01 and cfg["align"] is False


def test_console_entry_point_runs_in_a_fresh_process(tmp_path):
    proc = run_subprocess("train", *TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 6,
                          "--test-per-class", 3, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seed-1993" / "task-02" / "state.json").exists()


def test_resume_does_not_need_the_pretrained_weights_again(tmp_path, cli, monkeypatch):
    """Offline resume: the model comes from the checkpoint, so the hub / --weights file is not read again."""
    import slca_cli.backbones as backbones
    from slca_cli.backbones.registry import _REGISTRY
    tiny = backbones.get_backbone("vit-tiny-test")
    calls = []

    def build(weights=None, pretrained=True):
        calls.append(pretrained)
        if pretrained and len(calls) > 1:
            raise AssertionError("pre-trained weights requested on resume")
        return tiny.build(weights, pretrained)

    monkeypatch.setitem(_REGISTRY, "hub-only-test", backbones.BackboneSpec(
        name="hub-only-test", build=build, description="test", family="test", image_size=32,
        mean=tiny.mean, std=tiny.std))
    args = ["train", "--dataset", "synthetic", "--backbone", "hub-only-test", "--device", "cpu", "--no-progress",
            "--num-classes", 4, "--tasks", 2, "--epochs", 1, "--train-per-class", 6, "--test-per-class", 3,
            "--out", tmp_path]
    assert cli(*args)[0] == 0
    shutil.rmtree(tmp_path / "seed-1993" / "task-02")
    code, _, err = cli(*args, "--resume")
    assert code == 0, err
    assert calls == [True, False]
