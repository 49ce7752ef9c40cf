"""`slca continue`: a finished run learns new classes from a new folder; the result is a normal run folder."""
import json
import shutil

import pytest

from conftest import assert_one_line_error, read_json
from procs import Running
from slca_cli.checkpoint import sha256_file


def tree_digest(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def continued(digit_run, digit_folders, tmp_path_factory):
    """digits 0-7 (2 tasks) continued with the 8-9 folder, straight through; the original's files before and
    after."""
    from conftest import Cli
    before = tree_digest(digit_run.parent)
    out = tmp_path_factory.mktemp("continued") / "more"
    code, stdout, stderr = Cli()("continue", digit_run, "--data-root", digit_folders[1], "--out", out,
                                 "--no-progress")
    assert code == 0, stderr
    return out / "seed-1993", stdout, before


def test_new_classes_become_the_next_task_and_the_original_is_untouched(continued, digit_run, digit_folders):
    seed, stdout, before = continued
    assert tree_digest(digit_run.parent) == before
    assert "task 3 learns 2 new classes" in stdout and "scored on their test images as before (32 images)" in stdout
    state = read_json(seed / "task-03" / "state.json")
    original = read_json(digit_run / "task-02" / "state.json")
    assert state["task_sizes"] == [4, 4, 2] and state["class_order"] == original["class_order"] + [8, 9]
    assert state["class_names"] == original["class_names"] + ["8", "9"]
    assert state["counts"][-1]["total"] == [16, 16, 8]  # old test images scored beside the new ones
    assert state["counts"][:2] == original["counts"]
    for name in ("model.safetensors", "stats.safetensors"):  # finished tasks copied byte for byte
        assert sha256_file(seed / "task-02" / name) == sha256_file(digit_run / "task-02" / name)
    copied = read_json(seed / "task-02" / "state.json")
    assert copied["copied_from"]["state_sha256"] == sha256_file(digit_run / "task-02" / "state.json")
    provenance = read_json(seed / "provenance.json")
    assert [t["task"] for t in provenance["tasks"]] == [1, 2, 3]
    assert provenance["tasks"][2]["from"] == str(digit_folders[1].resolve())
    assert len(provenance["tasks"][2]["content_sha256"]) == 64
    metrics = read_json(seed / "metrics.json")
    assert metrics["tasks_done"] == 3 and metrics["task_sizes"] == [4, 4, 2]


def test_the_continued_run_works_with_eval_predict_export_and_report(continued, digit_folders, tmp_path, cli):
    seed, _, _ = continued
    code, stdout, stderr = cli("eval", seed / "task-03", "--json", "--no-progress")
    assert code == 0, stderr
    assert json.loads(stdout)["matches_stored"] and json.loads(stdout)["total"] == [16, 16, 8]
    code, stdout, stderr = cli("predict", seed, digit_folders[1] / "test", digit_folders[0] / "test", "--format",
                               "json", "--no-progress")
    assert code == 0, stderr
    state = read_json(seed / "task-03" / "state.json")
    correct = [0, 0, 0]
    names = state["class_names"]
    for record in json.loads(stdout)["predictions"]:
        truth = record["path"].split("/")[-2]
        correct[min(names.index(truth) // 4, 2)] += record["top_k"][0]["class"] == truth
        assert {t["task"] for t in record["top_k"] if t["class"] in ("8", "9")} <= {3}
    assert correct == state["counts"][-1]["correct"]
    code, stdout, stderr = cli("export", seed, "--out", tmp_path / "export")
    assert code == 0, stderr
    assert read_json(tmp_path / "export" / "classes.json") == names
    code, stdout, stderr = cli("report", seed.parent, "--out", tmp_path / "report", "--no-figures")
    assert code == 0, stderr
    assert "vit-tiny-test" in stdout


def test_sigkill_mid_task_then_resume_equals_the_straight_continuation(continued, digit_run, digit_folders,
                                                                        tmp_path):
    straight, _, _ = continued
    out = tmp_path / "more"
    args = ["continue", digit_run, "--data-root", digit_folders[1], "--out", out, "--device", "cpu",
            "--progress", "off"]
    args += ["--checkpoint-every", 1]  # the resume starts from the epoch saved in in-progress/
    run = Running(args, env={"SLCA_STALL_AT": "fit task=3 epoch=2 batch=1"})
    run.wait_for("stalled at fit task=3 epoch=2 batch=1")
    run.proc.kill()
    run.finish()
    assert not (out / "seed-1993" / "task-03").exists() and (out / "seed-1993" / "task-02").is_dir()
    assert (out / "seed-1993" / "in-progress").is_dir()
    run = Running(args + ["--resume"])
    assert run.finish() == 0, run.errors
    assert "resuming task 3 after epoch 1" in run.stdout, run.stdout
    for name in ("model.safetensors", "stats.safetensors"):
        assert sha256_file(out / "seed-1993" / "task-03" / name) == sha256_file(straight / "task-03" / name)
    assert read_json(out / "seed-1993" / "metrics.json")["counts"] == read_json(straight / "metrics.json")["counts"]


def test_bad_continuations_are_one_line_errors(digit_run, digit_folders, tmp_path, cli):
    def attempt(*args):
        return cli("continue", *args, "--no-progress")
    code, _, stderr = attempt(tmp_path / "nope", "--data-root", digit_folders[1], "--out", tmp_path / "o")
    assert_one_line_error(code, stderr, "is not a folder")
    code, _, stderr = attempt(digit_run, "--data-root", digit_folders[0], "--out", tmp_path / "o")
    assert_one_line_error(code, stderr, "class '0'", "already learned", "remove train/0")
    (tmp_path / "empty").mkdir()
    code, _, stderr = attempt(digit_run, "--data-root", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(code, stderr, "has no train/ or test/ folder")
    code, _, stderr = attempt(digit_run, "--data-root", tmp_path / "missing", "--out", tmp_path / "o")
    assert_one_line_error(code, stderr, "does not exist")
    code, _, stderr = attempt(digit_run, "--data-root", digit_folders[1], "--out", digit_run.parent / "more")
    assert_one_line_error(code, stderr, "overlaps the run being continued")
    assert not (digit_run.parent / "more").exists()
    bad = tmp_path / "bad"
    shutil.copytree(digit_folders[1], bad)
    (bad / "train" / "8" / "0008.png").write_bytes(b"broken")
    code, _, stderr = attempt(digit_run, "--data-root", bad, "--out", tmp_path / "o")
    assert_one_line_error(code, stderr, "cannot read image", "0008.png", "nothing was written")
    assert not (tmp_path / "o").exists()


def test_old_classes_without_their_test_images_say_what_was_scored(digit_folders, tmp_path, cli):
    """The original data is gone: the old classes are kept by their statistics, only the new ones are scored."""
    old = tmp_path / "old"
    shutil.copytree(digit_folders[0], old)
    code, _, stderr = cli("train", "--dataset", "folder", "--data-root", old, "--backbone", "vit-tiny-test",
                          "--device", "cpu", "--no-progress", "--tasks", 2, "--epochs", 1, "--out", tmp_path / "run")
    assert code == 0, stderr
    shutil.rmtree(old)
    code, stdout, stderr = cli("continue", tmp_path / "run" / "seed-1993", "--data-root", digit_folders[1], "--out",
                               tmp_path / "more", "--no-progress")
    assert code == 0, stderr
    assert "their test images are not there" in stdout and "new classes only (8 images)" in stdout
    state = read_json(tmp_path / "more" / "seed-1993" / "task-03" / "state.json")
    assert state["counts"][-1]["total"] == [0, 0, 8]
    assert [s["scored"] for s in state["sources"]] == [False, True]
    metrics = read_json(tmp_path / "more" / "seed-1993" / "metrics.json")
    assert metrics["accuracy_matrix"][2][:2] == [None, None] and metrics["old_accuracy"][2] is None  # not 0 %
    assert "old" not in stdout.strip().splitlines()[-3]  # the task line says "new ..." only
    code, stdout, stderr = cli("eval", tmp_path / "more" / "seed-1993" / "task-03", "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["matches_stored"], stderr
    code, stdout, stderr = cli("eval", tmp_path / "more" / "seed-1993" / "task-03", "--no-progress")
    assert code == 0 and "per task: T1 -  T2 -  T3 " in stdout, (stdout, stderr)


def test_runs_that_cannot_grow_say_why(finished_run, digit_folders, tmp_path, cli):
    from slca_cli.grow import grown_config
    from slca_cli.errors import SlcaError
    from slca_cli.presets import RunConfig
    code, _, stderr = cli("continue", finished_run[0], "--data-root", digit_folders[1], "--out", tmp_path / "o",
                          "--no-progress")
    assert_one_line_error(code, stderr, "generated data")
    full = RunConfig("folder", "vit-tiny-test", "dualprompt", 8, (4, 4), prompt_pool=2)
    with pytest.raises(SlcaError, match="pool of 2 is full"):
        grown_config(full, 2, {})
    assert grown_config(full.replace(prompt_pool=3), 2, {}).task_sizes == (4, 4, 2)


def test_probe_refuses_a_continued_run(continued, cli):
    seed, _, _ = continued
    code, _, stderr = cli("probe", seed, "--no-progress")
    assert_one_line_error(code, stderr, "continued run", "probe the run it continued")


def test_drift_compensation_moves_the_old_gaussians_in_the_new_task(digit_folders, tmp_path, cli):
    code, _, stderr = cli("train", "--dataset", "folder", "--data-root", digit_folders[0], "--backbone",
                          "vit-tiny-test", "--device", "cpu", "--no-progress", "--tasks", 2, "--epochs", 1,
                          "--drift-compensation", "linear", "--drift-views", 1, "--out", tmp_path / "run")
    assert code == 0, stderr
    code, stdout, stderr = cli("continue", tmp_path / "run" / "seed-1993", "--data-root", digit_folders[1],
                               "--out", tmp_path / "more", "--no-progress")
    assert code == 0, stderr
    from safetensors.torch import load_file
    stats = load_file(tmp_path / "more" / "seed-1993" / "task-03" / "stats.safetensors")
    assert stats["drift"].shape[0] == stats["means"].shape[1] and stats["means"].shape[0] == 2
    code, stdout, stderr = cli("eval", tmp_path / "more" / "seed-1993" / "task-03", "--json", "--no-progress")
    assert code == 0 and json.loads(stdout)["matches_stored"], stderr
