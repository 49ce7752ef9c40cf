"""--log-with: trackers through accelerate (MLflow with a local file: store, W&B offline), one-line errors for an
unknown or missing tracker, and a resume that continues the same tracker run without repeating a step."""
import pytest

from slca_cli import tracking
from conftest import TINY, assert_one_line_error, interrupt_at_task, read_json

RUN = ["train", *TINY, "--tasks", 3, "--epochs", 2, "--num-classes", 6, "--ca-epochs", 1, "--train-per-class", 4,
       "--test-per-class", 2, "--workers", 0]


def test_an_unknown_tracker_is_one_line(cli, tmp_path):
    code, _, err = cli(*RUN, "--log-with", "neptune", "--out", tmp_path)
    assert_one_line_error(code, err, "--log-with must be one of tensorboard, wandb, mlflow", "got 'neptune'")


def test_a_missing_tracker_package_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "aim", ("no_such_tracker_module", "aim"))
    code, _, err = cli(*RUN, "--log-with", "aim", "--out", tmp_path / "aim")
    assert_one_line_error(code, err, "--log-with aim needs the no_such_tracker_module package",
                          "pip install 'slca[aim]'")
    # `all` stops at the first tracker whose package is missing (aim at least, here), with the same kind of line.
    code, _, err = cli(*RUN, "--log-with", "all", "--out", tmp_path / "all")
    assert_one_line_error(code, err, "needs the", "package, which is not installed: pip install 'slca[")


def test_all_expands_and_tensorboard_is_events():
    assert set(tracking.TRACKERS) == {"tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive"}
    assert tracking.accelerate_trackers(("tensorboard",)) is None
    assert tracking.accelerate_trackers(("tensorboard", "mlflow")) == ["mlflow"]
    assert tracking.hyperparameters({"task_sizes": (2, 2), "weights": None, "lr": 0.1}, 7) == \
        {"task_sizes": "[2, 2]", "weights": "None", "lr": 0.1, "seed": 7}


def test_mlflow_gets_config_and_scalars_and_a_resume_continues_the_run(cli, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    out = tmp_path / "exp"
    interrupt_at_task(monkeypatch, 3)
    code, _, err = cli(*RUN, "--log-with", "mlflow", "--out", out)
    assert code == 130, err
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    code, _, err = cli(*RUN, "--log-with", "mlflow", "--out", out, "--resume")
    assert code == 0, err

    seed_dir = out / "seed-1993"
    run_id = read_json(seed_dir / "trackers.json")["mlflow"]
    client = mlflow.tracking.MlflowClient()
    experiment = client.get_experiment_by_name("exp")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # one run
    run = client.get_run(run_id)
    assert run.info.run_name == "seed-1993"
    assert run.data.params["dataset"] == "synthetic" and run.data.params["seed"] == "1993"
    assert run.data.params["task_sizes"] == "[2, 2, 2]"
    metrics = read_json(seed_dir / "metrics.json")
    history = client.get_metric_history(run_id, "accuracy/seen_classes")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(metrics["task_accuracy"])
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss/train")) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(run_id, "accuracy/old")) == [2, 3]


def test_wandb_offline_writes_its_run_and_a_resume_keeps_the_run_id(cli, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "exp"
    interrupt_at_task(monkeypatch, 3)
    code, _, err = cli(*RUN, "--log-with", "wandb", "--out", out)
    assert code == 130, err
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, _, err = cli(*RUN, "--log-with", "wandb", "--out", out, "--resume")
    assert code == 0, err
    seed_dir = out / "seed-1993"
    run_id = read_json(seed_dir / "trackers.json")["wandb"]
    files = sorted((seed_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    listing = sorted(str(p.relative_to(seed_dir)) for p in (seed_dir / "wandb").rglob("*.wandb"))
    assert len(files) == 2, listing  # the interrupted process and the resumed one, the same W&B run id
    first, second = (f.read_bytes() for f in files)
    for content in (first, second):
        assert b"lr_backbone" in content  # the resolved config
    assert b"accuracy/seen_classes" in first and b"loss/train" in first and b"loss/alignment" in first
    assert b"accuracy/seen_classes" in second
