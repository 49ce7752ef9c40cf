"""TensorBoard scalars in events/: our hand-written event files, read back by TensorBoard's own loader."""
import struct

import pytest

from slca_cli.events import ScalarWriter, crc32c, encode_event, frame
from tests.conftest import TINY, read_json

loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")


def read_scalars(folder):
    """{tag: [(step, value), ...]} over every event file in ``folder``, via TensorBoard."""
    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in loader.LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_framing_and_encoding_round_trip_through_tensorboard(tmp_path):
    writer = ScalarWriter(tmp_path)
    writer.add(3, {"accuracy/seen_classes": 87.5, "accuracy/new": 12.25})
    writer.add_series("loss/train", [(1, 2.5), (2, 1.25), (2**40, -0.5)])
    events = list(loader.LegacyEventFileLoader(str(writer.path)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert read_scalars(tmp_path / "events") == {"accuracy/seen_classes": [(3, 87.5)], "accuracy/new": [(3, 12.25)],
                                                 "loss/train": [(1, 2.5), (2, 1.25), (2**40, -0.5)]}
    record = encode_event(1.0, 7, scalars={"x": 1.0})
    framed = frame(record)
    assert struct.unpack("<Q", framed[:8])[0] == len(record) and framed[12:-4] == record


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = ScalarWriter(tmp_path, enabled=False)
    writer.add(1, {"a": 1.0})
    assert not (tmp_path / "events").exists()


def test_a_run_logs_each_task_and_epoch_and_a_resume_adds_a_file(cli, tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--method", "slca", "--tasks", 3, "--epochs", 2, "--num-classes", 6, "--ca-epochs", 2,
            "--out", out]
    code, _, err = cli(*args)
    assert code == 0, err
    seed_dir = out / "seed-1993"
    metrics = read_json(seed_dir / "metrics.json")
    scalars = read_scalars(seed_dir / "events")
    assert [s for s, _ in scalars["accuracy/seen_classes"]] == [1, 2, 3]
    assert [v for _, v in scalars["accuracy/seen_classes"]] == pytest.approx(metrics["task_accuracy"], rel=1e-6)
    assert [s for s, _ in scalars["loss/train"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["loss/train"]] == pytest.approx([v for task in metrics["train_loss"] for v in task],
                                                                  rel=1e-5)
    assert [s for s, _ in scalars["loss/alignment"]] == [3, 4, 5, 6]  # tasks 2 and 3, two alignment epochs each
    assert [s for s, _ in scalars["accuracy/old"]] == [2, 3]

    # Resuming a finished run writes a new file but no scalar twice.
    code, _, err = cli(*args, "--resume")
    assert code == 0, err
    assert len(list((seed_dir / "events").glob("events.out.tfevents.*"))) == 2
    assert read_scalars(seed_dir / "events") == scalars
