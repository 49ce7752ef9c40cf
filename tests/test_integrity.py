"""Damaged, edited and hostile run folders: clear errors from `slca eval`, fall-back with a warning on --resume,
nothing outside the run folder read or written, no pickle ever executed. Training health: NaN and out-of-memory."""
import json
import os
import pickle
import shutil

import pytest
import torch

from conftest import TINY, assert_one_line_error, read_json

FINISHED = [*TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 9]  # the flags of conftest.finished_run


def copy_run(finished_run, tmp_path):
    run, _ = finished_run
    shutil.copytree(run, tmp_path / "seed-1993")
    return run, tmp_path / "seed-1993"


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "flip":
        for i in range(8, len(data), max(1, len(data) // 7)):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) * 2 // 3]))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


def rewrite_state(folder, **changes):
    """Edit state.json as a determined editor would: the state's own checksum recomputed, so that the checks
    behind it (field by field) are what is tested; an edit that keeps the old checksum is test_reliability's."""
    from slca_cli.checkpoint import state_digest
    state = read_json(folder / "state.json")
    for key, value in changes.items():
        if callable(value):
            value(state)
        else:
            state[key] = value
    if "state_sha256" in state:
        state["state_sha256"] = state_digest(state)
    (folder / "state.json").write_text(json.dumps(state))


def assert_resumed_like_the_original(original, copy):
    got, want = read_json(copy / "metrics.json"), read_json(original / "metrics.json")
    for key in ("accuracy_matrix", "counts", "last_acc", "inc_acc"):
        assert got[key] == want[key], key
    for t in (1, 2, 3):
        assert read_json(copy / f"task-{t:02d}" / "state.json")["sha256"] == \
            read_json(original / f"task-{t:02d}" / "state.json")["sha256"]


# -- every tensor file, every kind of damage: eval refuses naming the file -----------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "stats.safetensors"])
@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_eval_of_a_damaged_tensor_file_is_a_clear_error(finished_run, cli, tmp_path, name, how):
    _, copy = copy_run(finished_run, tmp_path)
    damage(copy / "task-03" / name, how)
    code, _, err = cli("eval", copy / "task-03", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, f"task-03/{name} is damaged", "sha256")


def test_resume_falls_back_to_the_task_before_a_damaged_one(finished_run, cli, tmp_path):
    """A damaged middle task: the later intact task can't be used either (it builds on it), so the run goes back
    to the last intact task before the damage and redoes the rest, ending exactly as the original."""
    original, copy = copy_run(finished_run, tmp_path)
    damage(copy / "task-02" / "model.safetensors", "flip")
    code, out, err = cli("train", *FINISHED, "--out", tmp_path, "--resume")
    assert code == 0, err
    assert f"warning: {copy / 'task-02'} is damaged (model.safetensors missing or damaged)" in out
    assert "after task-01" in out
    assert_resumed_like_the_original(original, copy)


def test_a_damaged_first_task_means_starting_again(finished_run, cli, tmp_path):
    from slca_cli.checkpoint import complete_tasks
    _, copy = copy_run(finished_run, tmp_path)
    damage(copy / "task-01" / "stats.safetensors", "truncate")
    assert complete_tasks(copy) == (0, [f"{copy / 'task-01'} is damaged (stats.safetensors missing or damaged); "
                                        f"starting again from task 1"])


@pytest.mark.parametrize("edit", ["not json", "task", "class_order", "config type", "config sizes", "counts",
                                  "rng", "sha256", "train_loss", "missing field"])
def test_a_damaged_or_edited_state_json_is_caught(finished_run, cli, tmp_path, edit):
    _, copy = copy_run(finished_run, tmp_path)
    folder = copy / "task-03"
    if edit == "not json":
        (folder / "state.json").write_text('{"task": 2, "sha256": {')
    elif edit == "task":
        rewrite_state(folder, task="../../etc/passwd")
    elif edit == "class_order":
        rewrite_state(folder, class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7])
    elif edit == "config type":
        rewrite_state(folder, config=lambda s: s["config"].update(image_size="32; rm -rf /"))
    elif edit == "config sizes":
        rewrite_state(folder, config=lambda s: s["config"].update(task_sizes=[3, 3, 30]))
    elif edit == "counts":
        rewrite_state(folder, counts=lambda s: s["counts"][0].update(correct=[10 ** 9]))
    elif edit == "rng":
        rewrite_state(folder, rng={"python": "x"})
    elif edit == "sha256":
        rewrite_state(folder, sha256={"model.safetensors": "../model.safetensors"})
    elif edit == "train_loss":
        rewrite_state(folder, train_loss=[[1.0], ["nan; rm -rf /"], [0.5]])
    else:
        rewrite_state(folder, config=lambda s: s["config"].pop("task_sizes"))
    code, _, err = cli("eval", folder, "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "task-03/state.json")
    from slca_cli.checkpoint import complete_tasks
    done, warnings = complete_tasks(copy)
    assert done == 2 and warnings[0].startswith(f"{folder} is damaged")


def test_resume_skips_a_task_whose_state_json_was_edited(finished_run, cli, tmp_path):
    original, copy = copy_run(finished_run, tmp_path)
    rewrite_state(copy / "task-03", rng={"python": "x"})
    code, out, err = cli("train", *FINISHED, "--out", tmp_path, "--resume")
    assert code == 0, err
    assert f"warning: {copy / 'task-03'} is damaged (" in out and "field 'rng'" in out and "after task-02" in out
    assert_resumed_like_the_original(original, copy)


def test_task_folders_swapped_by_hand_are_caught(finished_run, cli, tmp_path):
    _, copy = copy_run(finished_run, tmp_path)
    (copy / "task-02").rename(copy / "tmp")
    (copy / "task-03").rename(copy / "task-02")
    code, _, err = cli("eval", copy / "task-02", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "says it is task 3", "restore the folder names")


def test_resume_refuses_other_data_than_the_finished_tasks_saw(finished_run, cli, tmp_path):
    _, copy = copy_run(finished_run, tmp_path)
    rewrite_state(copy / "task-03", data_fingerprint="0" * 64)
    code, _, err = cli("train", *FINISHED, "--out", tmp_path, "--resume")
    assert_one_line_error(code, err, "the data differs", "task-03")


# -- nothing we load runs code ----------------------------------------------------------------------------

class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_pickle_in_place_of_a_checkpoint_never_runs(finished_run, cli, tmp_path):
    """Even with state.json edited to carry the pickle's sha256, the file is read as safetensors only."""
    from slca_cli.checkpoint import sha256_file
    _, copy = copy_run(finished_run, tmp_path)
    marker = tmp_path / "code-ran"
    target = copy / "task-03" / "model.safetensors"
    with open(target, "wb") as fh:
        pickle.dump({"backbone.x": Payload(marker)}, fh)
    rewrite_state(copy / "task-03", sha256=lambda s: s["sha256"].update({"model.safetensors": sha256_file(target)}))
    code, _, err = cli("eval", copy / "task-03", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "model.safetensors is not a readable safetensors file")
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".tar", ".pth", ".pth.tar"])
def test_a_torch_zip_checkpoint_with_code_is_refused(tmp_path, cli, suffix):
    """torch.save's zip format (what .pth / .tar checkpoints are) holding an object that runs code on load."""
    marker = tmp_path / "code-ran"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"pos_embed": torch.zeros(1)}, "hook": Payload(marker)}, path)
    code, _, err = cli("train", *TINY, "--weights", path, "--num-classes", 2, "--tasks", 1, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "refused", "convert it to .safetensors")
    assert not marker.exists()


# -- paths from metadata never leave the run folder ----------------------------------------------------------

def test_tensor_files_and_task_folders_that_are_links_are_not_followed(finished_run, cli, tmp_path):
    original, copy = copy_run(finished_run, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(copy / "task-03", outside)
    # Identical bytes, so the sha256 matches: only the link itself can be what is refused.
    (copy / "task-03" / "model.safetensors").unlink()
    (copy / "task-03" / "model.safetensors").symlink_to(outside / "model.safetensors")
    code, _, err = cli("eval", copy / "task-03", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "model.safetensors is a link")
    shutil.rmtree(copy / "task-02")
    (copy / "task-02").symlink_to(tmp_path / "outside")
    code, out, err = cli("train", *FINISHED, "--out", tmp_path, "--resume")
    assert code == 0, err
    assert f"{copy / 'task-02'} is damaged (it is a link" in out and "after task-01" in out
    assert not (copy / "task-02").is_symlink() and (outside / "model.safetensors").exists()
    assert_resumed_like_the_original(original, copy)


def test_planted_links_in_a_run_folder_do_not_redirect_writes(finished_run, cli, tmp_path):
    """Links where slca writes (the partial folder of a task, metrics.json) are replaced, never written through
    or emptied."""
    original, copy = copy_run(finished_run, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (tmp_path / "victim.json").write_text("keep me too")
    shutil.rmtree(copy / "task-03")
    (copy / ".task-03.partial").symlink_to(victim)
    (copy / "metrics.json").unlink()
    (copy / "metrics.json").symlink_to(tmp_path / "victim.json")
    code, _, err = cli("train", *FINISHED, "--out", tmp_path, "--resume")
    assert code == 0, err
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "victim.json").read_text() == "keep me too"
    assert not (copy / "metrics.json").is_symlink() and not (copy / ".task-03.partial").exists()
    assert_resumed_like_the_original(original, copy)


def test_a_relative_data_root_in_state_json_is_refused_by_eval(finished_run, cli, tmp_path):
    _, copy = copy_run(finished_run, tmp_path)
    rewrite_state(copy / "task-02", config=lambda s: s["config"].update(data_root="../../../../etc"))
    code, _, err = cli("eval", copy / "task-02", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "'../../../../etc'", "not an absolute path", "--data-root")


def test_the_data_root_is_recorded_as_an_absolute_path(tmp_path, cli, monkeypatch):
    from conftest import write_image_tree
    write_image_tree(tmp_path / "data", ["a", "b"], per_split=(2, 1))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "--dataset", "folder", "--data-root", "data", "--backbone", "vit-tiny-test",
                       "--device", "cpu", "--tasks", 1, "--epochs", 1, "--workers", 0, "--out", "run", "--no-progress")
    assert code == 0, err
    assert read_json(tmp_path / "run" / "seed-1993" / "task-01" / "state.json")["config"]["data_root"] == \
        str((tmp_path / "data").resolve())


# -- training health ------------------------------------------------------------------------------------------

def test_nan_loss_stops_with_task_and_epoch_and_keeps_the_finished_tasks(tmp_path, cli):
    """A huge head learning rate: task 1 takes one step (finite loss), task 2's second batch overflows."""
    code, out, err = cli("train", *TINY, "--num-classes", 6, "--init-classes", 2, "--increment", 4,
                         "--train-per-class", 4, "--test-per-class", 2, "--batch-size", 8, "--epochs", 1,
                         "--lr-head", 1e38, "--out", tmp_path)
    assert_one_line_error(code, err, "the loss became nan in task 2, epoch 1", "finished tasks are kept")
    from slca_cli.checkpoint import complete_tasks
    assert complete_tasks(tmp_path / "seed-1993") == (1, [])
    assert read_json(tmp_path / "seed-1993" / "metrics.json")["tasks_done"] == 1
    assert not (tmp_path / "seed-1993" / ".slca.lock").exists()


@pytest.mark.parametrize("where", ["fit", "evaluate"])
def test_out_of_memory_names_the_flag_to_lower(tmp_path, cli, monkeypatch, where):
    """torch's OutOfMemoryError raised inside task 2's training step or its evaluation."""
    import slca_cli.runner as runner
    from slca_cli.model import ContinualModel

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    if where == "fit":
        real_forward = ContinualModel.forward
        monkeypatch.setattr(ContinualModel, "forward", lambda self, images, head=None: out_of_memory()
                            if head == 1 else real_forward(self, images, head))
    else:
        real_evaluate = runner.evaluate
        monkeypatch.setattr(runner, "evaluate", lambda model, loader, acc, sizes, *a: out_of_memory()
                            if len(sizes) == 2 else real_evaluate(model, loader, acc, sizes, *a))
    code, _, err = cli("train", *TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 4,
                       "--test-per-class", 2, "--batch-size", 4, "--out", tmp_path)
    stage = "stage-1 training (epoch 1)" if where == "fit" else "evaluation"
    assert_one_line_error(code, err, f"out of GPU memory during seed 1993, task 2, {stage}",
                          "lower --batch-size (now 4", "task-01 of", "is saved")
    assert not (tmp_path / "seed-1993" / ".slca.lock").exists()


# -- crashes at the file-system level -------------------------------------------------------------------------

def test_a_kill_between_the_renames_of_a_task_folder_is_repaired(finished_run, cli, tmp_path):
    """What a kill leaves when it lands while task-03/ is being replaced: no task-03/, the old copy in
    .task-03.stale/ and the new complete one in .task-03.partial/."""
    _, copy = copy_run(finished_run, tmp_path)
    shutil.copytree(copy / "task-03", copy / ".task-03.partial")
    (copy / "task-03").rename(copy / ".task-03.stale")
    (copy / ".metrics.json.x1y2.tmp").write_text("half")
    code, out, err = cli("train", *FINISHED, "--out", tmp_path, "--resume")
    assert code == 0, err
    assert f"recovered {copy / 'task-03'}" in out and "(3/3 tasks done)" in out
    assert not [p.name for p in copy.iterdir() if p.name.startswith(".")]


def test_a_full_disk_is_one_line_and_resumable(tmp_path, cli, monkeypatch):
    import errno
    import slca_cli.checkpoint as checkpoint
    real_save = checkpoint.save_file
    calls = []

    def disk_full_on_task_two(tensors, path, metadata=None):
        calls.append(path)
        if "task-02" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_on_task_two)
    args = [*TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 4, "--test-per-class", 2,
            "--out", tmp_path]
    code, _, err = cli("train", *args)
    assert_one_line_error(code, err, "No space left on device", ".task-02.partial/model.safetensors",
                          "seed 1993, writing the checkpoint task-02/", "task-01 of", "--resume")
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    code, out, err = cli("train", *args, "--resume")
    assert code == 0, err
    assert "after task-01" in out and not (tmp_path / "seed-1993" / ".task-02.partial").exists()


def test_host_memory_running_out_while_forking_workers_names_the_flags(tmp_path, cli, monkeypatch):
    import errno
    from slca_cli.model import ContinualModel
    real_forward = ContinualModel.forward

    def forward(self, images, head=None):
        if head == 1:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real_forward(self, images, head)

    monkeypatch.setattr(ContinualModel, "forward", forward)
    code, _, err = cli("train", *TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 4,
                       "--test-per-class", 2, "--batch-size", 4, "--out", tmp_path)
    assert_one_line_error(code, err, "out of host memory during seed 1993, task 2", "--batch-size",
                          "fewer --workers also help")


def test_resume_reads_stats_files_that_hold_covariances_instead_of_factors(finished_run, cli, tmp_path):
    """Runs written before stats.safetensors kept only the Cholesky factor stored the covariance: resuming one
    factorizes it again and trains the next task to the same result."""
    from safetensors.torch import load_file, save_file
    from slca_cli.checkpoint import sha256_file
    original, copy = copy_run(finished_run, tmp_path)
    shutil.rmtree(copy / "task-03")
    for folder in (copy / "task-01", copy / "task-02"):
        stats = load_file(str(folder / "stats.safetensors"))
        assert set(stats) == {"means", "chol", "classes"}
        chol = stats.pop("chol")
        stats["covs"] = chol @ chol.transpose(1, 2)
        save_file(stats, str(folder / "stats.safetensors"), metadata={"format": "slca-stats"})
        rewrite_state(folder, sha256=lambda s: s["sha256"].update(
            {"stats.safetensors": sha256_file(folder / "stats.safetensors")}))
    code, _, err = cli("train", *FINISHED, "--out", tmp_path, "--resume")
    assert code == 0, err
    got, want = read_json(copy / "metrics.json"), read_json(original / "metrics.json")
    assert got["counts"] == want["counts"] and got["last_acc"] == want["last_acc"]
