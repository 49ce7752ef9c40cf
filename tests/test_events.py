"""TensorBoard scalars in events/, written by TensorBoard's own writer and read back with its EventAccumulator;
an interrupted run resumed appends the later tasks and logs no step twice."""
import pytest

from conftest import TINY, interrupt_at_task, read_json

accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

RUN = ["train", *TINY, "--method", "slca", "--tasks", 3, "--epochs", 2, "--num-classes", 6, "--ca-epochs", 2]


def read_scalars(folder):
    """{tag: [(step, value), ...]} over every event file in ``folder`` in order, each file read on its own (the
    accumulator of a folder drops steps that repeat, which would hide a duplicate)."""
    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = accumulator.EventAccumulator(str(path), size_guidance={accumulator.SCALARS: 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out


def test_an_interrupted_run_resumed_logs_every_task_and_epoch_once(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at_task(monkeypatch, 3)
    code, _, err = cli(*RUN, "--out", out)
    assert code == 130, err
    monkeypatch.undo()
    seed_dir = out / "seed-1993"
    assert [s for s, _ in read_scalars(seed_dir / "events")["accuracy/seen_classes"]] == [1, 2]
    code, _, err = cli(*RUN, "--out", out, "--resume")
    assert code == 0, err
    assert len(list((seed_dir / "events").glob("events.out.tfevents.*"))) == 2  # one file per process start
    metrics = read_json(seed_dir / "metrics.json")
    scalars = read_scalars(seed_dir / "events")
    assert [s for s, _ in scalars["accuracy/seen_classes"]] == [1, 2, 3]
    assert [v for _, v in scalars["accuracy/seen_classes"]] == pytest.approx(metrics["task_accuracy"], rel=1e-6)
    assert [s for s, _ in scalars["loss/train"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["loss/train"]] == pytest.approx([v for task in metrics["train_loss"] for v in task],
                                                                  rel=1e-5)
    assert [s for s, _ in scalars["loss/alignment"]] == [3, 4, 5, 6]  # tasks 2 and 3, two alignment epochs each
    assert [s for s, _ in scalars["accuracy/old"]] == [2, 3]
    assert [s for s, _ in scalars["task/seconds"]] == [1, 2, 3]

    # Resuming a finished run adds an (empty) file but no scalar.
    code, _, err = cli(*RUN, "--out", out, "--resume")
    assert code == 0, err
    assert read_scalars(seed_dir / "events") == scalars
