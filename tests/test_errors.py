"""Bad input: one line on stderr, exit code 2, no traceback."""
import shutil

import pytest

from conftest import TINY, assert_one_line_error, run_subprocess, write_image_tree


def test_unknown_dataset_lists_the_known_ones(cli):
    code, _, err = cli("train", "--dataset", "imagenet-x", "--backbone", "vit-tiny-test")
    assert_one_line_error(code, err, "unknown dataset 'imagenet-x'", "synthetic", "cifar100", "folder")


def test_unknown_backbone_lists_the_known_ones(cli):
    code, _, err = cli("train", "--dataset", "synthetic", "--backbone", "resnet-9000")
    assert_one_line_error(code, err, "unknown backbone 'resnet-9000'", "vit-tiny-test", "vit-b16-in21k")


def test_missing_data_root(cli, tmp_path):
    code, _, err = cli("train", "--dataset", "folder", "--backbone", "vit-tiny-test", "--data-root",
                       tmp_path / "nowhere")
    assert_one_line_error(code, err, "--data-root", "does not exist", "train/<class>")
    code, _, err = cli("train", "--dataset", "folder", "--backbone", "vit-tiny-test")
    assert_one_line_error(code, err, "needs --data-root")


def test_data_root_without_the_layout(cli, tmp_path):
    (tmp_path / "train").mkdir()
    code, _, err = cli("train", "--dataset", "folder", "--backbone", "vit-tiny-test", "--data-root", tmp_path)
    assert_one_line_error(code, err, "test", "train/<class>/* and test/<class>/*")


def test_more_tasks_than_classes(cli):
    code, _, err = cli("train", *TINY, "--num-classes", 4, "--tasks", 5)
    assert_one_line_error(code, err, "--tasks 5", "4 classes")


def test_resume_from_another_experiment_is_refused(finished_run, cli, tmp_path):
    run, _ = finished_run
    shutil.copytree(run, tmp_path / "seed-1993")
    code, _, err = cli("train", *TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 12, "--out", tmp_path,
                       "--resume")
    assert_one_line_error(code, err, "another experiment", "num_classes")
    code, _, err = cli("train", *TINY, "--method", "sl", "--tasks", 3, "--epochs", 1, "--num-classes", 9,
                       "--out", tmp_path, "--resume")
    assert_one_line_error(code, err, "another experiment", "method")


def test_resume_from_another_dataset_or_backbone_is_refused(finished_run, cli, tmp_path):
    run, _ = finished_run
    shutil.copytree(run, tmp_path / "seed-1993")
    tree = write_image_tree(tmp_path / "data", [f"c{i}" for i in range(9)], per_split=(2, 1))
    code, _, err = cli("train", "--dataset", "folder", "--data-root", tree, "--backbone", "vit-tiny-test",
                       "--device", "cpu", "--tasks", 3, "--epochs", 1, "--out", tmp_path, "--resume", "--no-progress")
    assert_one_line_error(code, err, "another experiment", "dataset='synthetic'")


def test_rerun_into_a_finished_folder_without_resume_is_refused(finished_run, cli, tmp_path):
    run, _ = finished_run
    shutil.copytree(run, tmp_path / "seed-1993")
    code, _, err = cli("train", *TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 9, "--out", tmp_path)
    assert_one_line_error(code, err, "already holds finished tasks", "--resume")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_safetensors_is_a_clear_error(finished_run, cli, tmp_path, damage):
    run, _ = finished_run
    copy = tmp_path / "seed-1993"
    shutil.copytree(run, copy)
    target = copy / "task-02" / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    code, _, err = cli("eval", copy / "task-02", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "model.safetensors is damaged")


def test_resume_falls_back_past_a_damaged_task(finished_run, cli, tmp_path):
    run, _ = finished_run
    copy = tmp_path / "seed-1993"
    shutil.copytree(run, copy)
    stats = copy / "task-03" / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:100])
    code, out, err = cli("train", *TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 9, "--out", tmp_path,
                         "--resume")
    assert code == 0, err
    assert "task-03 is damaged" in out and "after task-02" in out
    from conftest import read_json
    assert read_json(copy / "metrics.json")["counts"] == read_json(run / "metrics.json")["counts"]


def test_eval_on_a_folder_that_is_not_a_task(cli, tmp_path):
    code, _, err = cli("eval", tmp_path)
    assert_one_line_error(code, err, "not a finished task folder")
    code, _, err = cli("eval", tmp_path / "missing")
    assert_one_line_error(code, err, "not a folder")


def test_bad_flag_values(cli):
    code, _, err = cli("train", *TINY, "--mean-scaling", "sideways")
    assert_one_line_error(code, err, "--mean-scaling")
    code, _, err = cli("train", *TINY, "--method", "magic")
    assert_one_line_error(code, err, "unknown method 'magic'", "slca")
    code, _, err = cli("train", *TINY, "--num-classes", 0)
    assert_one_line_error(code, err, "--num-classes")


def test_errors_in_a_fresh_process_have_exit_code_2(tmp_path):
    proc = run_subprocess("train", "--dataset", "nope", "--backbone", "vit-tiny-test")
    assert_one_line_error(proc.returncode, proc.stderr, "unknown dataset")
