"""`slca predict`: new images through a finished task's model, from the command line."""
import csv
import io
import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, read_json


def per_task_correct(predictions, names_to_position, sizes):
    """Correct top-1 predictions per task, the class being the image's folder name."""
    bounds = [sum(sizes[: t + 1]) for t in range(len(sizes))]
    correct = [0] * len(sizes)
    for record in predictions:
        truth = Path(record["path"]).parent.name
        task = next(t for t, b in enumerate(bounds) if names_to_position[truth] < b)
        correct[task] += record["top_k"][0]["class"] == truth
    return correct


def test_predictions_on_the_runs_test_images_agree_with_eval(digit_run, digit_folders, cli):
    code, stdout, stderr = cli("predict", digit_run, digit_folders[0] / "test", "--format", "json", "--no-progress")
    assert code == 0, stderr
    result = json.loads(stdout)
    state = read_json(digit_run / "task-02" / "state.json")
    assert result["checkpoint"].endswith("task-02") and result["task"] == 2 and result["classes"] == 8
    names = state["class_names"]
    assert len(result["predictions"]) == 8 * 4 and all(len(r["top_k"]) == 5 for r in result["predictions"])
    correct = per_task_correct(result["predictions"], {n: i for i, n in enumerate(names)}, state["task_sizes"])
    assert correct == state["counts"][-1]["correct"]
    code, stdout, stderr = cli("eval", digit_run / "task-02", "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["correct"] == correct
    for record in result["predictions"]:  # probabilities sorted, tasks as the class order says
        probs = [t["probability"] for t in record["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        for entry in record["top_k"]:
            assert entry["task"] == 1 + (names.index(entry["class"]) >= state["task_sizes"][0])


def test_formats_top_k_out_file_and_a_list_of_paths(digit_run, digit_folders, tmp_path, cli):
    images = sorted((digit_folders[1] / "test" / "8").glob("*.png"))[:2]
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\n" + "\n".join(str(p) for p in images) + "\n\n")
    code, stdout, stderr = cli("predict", digit_run / "task-01", listing, "--top-k", 2, "--format", "csv",
                               "--out", tmp_path / "p.csv", "--no-progress")
    assert code == 0, stderr
    assert stdout == ""
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert [(r["path"], r["rank"]) for r in rows] == [(str(p), str(k)) for p in images for k in (1, 2)]
    assert all(r["task"] == "1" and float(r["probability"]) > 0 for r in rows)  # task 1's model knows 4 classes
    code, stdout, _ = cli("predict", digit_run, images[0], "--format", "jsonl", "--top-k", 100, "--no-progress")
    record = json.loads(stdout)
    assert code == 0 and record["path"] == str(images[0]) and len(record["top_k"]) == 8
    code, stdout, _ = cli("predict", digit_run, images[0], "--no-progress")
    assert code == 0 and stdout.splitlines()[0].split()[:4] == ["image", "class", "prob", "task"]


def test_unreadable_inputs_are_listed_and_the_rest_predicted(digit_run, digit_folders, tmp_path, cli):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = sorted((digit_folders[0] / "test" / "0").glob("*.png"))[0]
    code, stdout, stderr = cli("predict", digit_run, broken, good, tmp_path / "missing.jpg", "--format", "jsonl",
                               "--no-progress")
    assert code == 1
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [r["path"] for r in records] == [str(broken), str(good), str(tmp_path / "missing.jpg")]
    assert "not a readable image" in records[0]["error"] and "no such file" in records[2]["error"]
    assert len(records[1]["top_k"]) == 5
    assert "broken.png" in stderr and "missing.jpg" in stderr and "predicted 1 of 3" in stderr
    assert "Traceback" not in stderr


def test_bad_checkpoints_and_empty_inputs_are_one_line_errors(digit_run, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, _, stderr = cli("predict", tmp_path / "nope", tmp_path, "--no-progress")
    assert_one_line_error(code, stderr, "does not exist", "task-NN/")
    code, _, stderr = cli("predict", tmp_path / "empty", tmp_path, "--no-progress")
    assert_one_line_error(code, stderr, "holds no finished task")
    code, _, stderr = cli("predict", digit_run, tmp_path / "empty", "--no-progress")
    assert_one_line_error(code, stderr, "no images to predict")
    code, _, stderr = cli("predict", digit_run, tmp_path / "empty", "--format", "xml", "--no-progress")
    assert_one_line_error(code, stderr, "--format must be one of")


# One method per kind of model: fine-tuned heads (seqft, sl, joint and linear build the same model as slca), prompts
# chosen per image, LoRA, prototypes, a random projection in front of the heads, one ViT pass per adapter (ease).
@pytest.mark.parametrize("method", ["slca", "l2p", "dualprompt", "slca++", "simplecil", "ranpac", "ease"])
def test_every_method_predicts_what_eval_scores(method, digit_folders, tmp_path, cli):
    """Prompt methods, LoRA, training-free classifiers: predictions on the test images give eval's counts."""
    root = digit_folders[0]
    extra = ["--tasks", 2] + (["--ranpac-dim", 32] if method == "ranpac" else [])
    code, _, stderr = cli("train", "--dataset", "folder", "--data-root", root, "--backbone", "vit-tiny-test",
                          "--device", "cpu", "--no-progress", "--epochs", 1, "--ca-epochs", 1, "--method", method,
                          "--test-per-class", 2, "--train-per-class", 4, *extra, "--out", tmp_path / "run")
    assert code == 0, stderr
    seed = tmp_path / "run" / "seed-1993"
    last = sorted(seed.glob("task-*"))[-1]
    state = read_json(last / "state.json")
    code, stdout, stderr = cli("predict", seed, *[root / "test" / n / p.name for n in state["class_names"]
                                                  for p in sorted((root / "test" / n).glob("*.png"))[:2]],
                               "--format", "json", "--no-progress")
    assert code == 0, stderr
    names = {n: i for i, n in enumerate(state["class_names"])}
    assert per_task_correct(json.loads(stdout)["predictions"], names, state["task_sizes"]) == \
        state["counts"][-1]["correct"]
