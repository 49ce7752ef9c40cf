"""`slca train --classes`: a run on some of a dataset's classes, renumbered 0..N-1; eval and predict after it."""
import json
from pathlib import Path

import pytest

from conftest import TINY, assert_one_line_error, read_json
from test_predict import per_task_correct

from slca_cli.data import load_dataset
from slca_cli.data.subset import format_classes, parse_classes


def test_parse_and_format_round_trip():
    assert parse_classes("50-99") == list(range(50, 100))
    assert parse_classes(" 9, 0-2 ,2,5-5") == [0, 1, 2, 5, 9]
    assert format_classes([9, 0, 1, 2, 5]) == "0-2,5,9"
    assert format_classes(parse_classes("3,4,5,7")) == "3-5,7"


def test_a_folder_subset_trains_evaluates_and_predicts_with_its_own_class_names(digit_folders, tmp_path, cli):
    root, out = digit_folders[0], tmp_path / "run"
    code, stdout, stderr = cli("train", "--dataset", "folder", "--data-root", root, "--backbone", "vit-tiny-test",
                               "--device", "cpu", "--no-progress", "--classes", "6,3-5", "--tasks", 2, "--epochs", 1,
                               "--method", "slca", "--out", out)
    assert code == 0, stderr
    seed_dir = out / "seed-1993"
    header = read_json(seed_dir / "config.json")
    assert header["config"]["classes"] == "3-6" and header["config"]["num_classes"] == 4
    assert "classes" in header["config"]["overridden"]
    # The run's class k is dataset class 3 + k (folders "3".."6"); the order permutes those four.
    assert sorted(header["class_order"]) == [0, 1, 2, 3]
    assert header["class_names"] == [str(3 + k) for k in header["class_order"]]
    state = read_json(seed_dir / "task-02" / "state.json")
    assert sum(state["counts"][-1]["total"]) == 4 * 4  # the test images of the four classes only
    code, stdout, stderr = cli("eval", seed_dir / "task-02", "--json", "--no-progress")
    assert code == 0, stderr
    assert json.loads(stdout)["correct"] == state["counts"][-1]["correct"]
    code, stdout, stderr = cli("predict", seed_dir, root / "test", "--format", "json", "--top-k", 10,
                               "--no-progress")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["classes"] == 4
    assert {e["class"] for r in result["predictions"] for e in r["top_k"]} == {"3", "4", "5", "6"}
    ours = [r for r in result["predictions"] if Path(r["path"]).parent.name in {"3", "4", "5", "6"}]
    names = state["class_names"]
    assert per_task_correct(ours, {n: i for i, n in enumerate(names)}, state["task_sizes"]) == \
        state["counts"][-1]["correct"]
    # `slca continue` reads the same four classes back (checked against their file-list checksum) and adds 8, 9.
    code, _, stderr = cli("continue", seed_dir, "--data-root", digit_folders[1], "--out", tmp_path / "more",
                          "--device", "cpu", "--no-progress")
    assert code == 0, stderr
    grown = read_json(tmp_path / "more" / "seed-1993" / "task-03" / "state.json")
    assert grown["class_names"][:4] == state["class_names"] and sorted(grown["class_names"][4:]) == ["8", "9"]
    code, stdout, stderr = cli("eval", tmp_path / "more" / "seed-1993" / "task-03", "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["correct"] == grown["counts"][-1]["correct"], stderr
    # Another spelling of the same classes is the same experiment: --resume accepts it (nothing left to do).
    code, _, stderr = cli("train", "--dataset", "folder", "--data-root", root, "--backbone", "vit-tiny-test",
                          "--device", "cpu", "--no-progress", "--classes", "3,4,5,6", "--tasks", 2, "--epochs", 1,
                          "--method", "slca", "--out", out, "--resume")
    assert code == 0, stderr


def test_generated_classes_are_the_same_images_whatever_the_count():
    some = load_dataset("synthetic", None, None, 3, 2, classes="5,7")
    many = load_dataset("synthetic", None, 30, 3, 2, classes="5,7")
    assert some.class_names == many.class_names == ["class_005", "class_007"]
    assert some.fingerprint() == many.fingerprint()
    assert some.train.labels == [0, 0, 0, 1, 1, 1]
    full = load_dataset("synthetic", None, 8, 3, 2)
    assert bool((some.train.load(3) == full.train.load(7 * 3)).all())


@pytest.mark.parametrize("value, fragments", [
    ("99-50", ["range 99-50 is reversed", "50-99"]),
    ("5-x", ["'5-x' is not a class id or range", "50-99"]),
    ("", ["--classes is empty"]),
    ("10-25", ["--classes 20-25", "20 classes (ids 0-19)"]),
])
def test_bad_class_selections_are_one_line_errors(value, fragments, cli):
    code, _, stderr = cli("train", *TINY, "--num-classes", 20, "--classes", value, "--epochs", 1)
    assert_one_line_error(code, stderr, *fragments)
