"""Issue 18: the run folder, the disk and the flags attacked. Each test names the defect it guards against; every
failure must be one line naming the problem and the fix, exit code 2, nothing finished lost, no wrong number
saved or reported as if it were right."""
import errno
import json
import os
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_one_line_error, read_json, run_subprocess
from procs import Running

SMALL = [*TINY, "--num-classes", 4, "--tasks", 2, "--epochs", 1, "--train-per-class", 4, "--test-per-class", 2,
         "--batch-size", 4, "--workers", 0, "--ca-epochs", 1, "--ca-samples", 4]


# ---- 5, 11, 12: flags are checked at the command line (validation.BOUNDS) ----

@pytest.mark.parametrize("flags, fragments", [
    (["--tau", "nan"], ["--tau must be a finite number >= 0.001", "got nan"]),
    (["--tau", "1e-30"], ["--tau must be a finite number >= 0.001"]),
    (["--lr-head", "inf"], ["--lr-head must be a finite number > 0"]),
    (["--weight-decay", "-1"], ["--weight-decay must be a finite number >= 0"]),
    (["--drift-ridge", "nan"], ["--drift-ridge must be a finite number > 0"]),
    (["--lr-drop-epoch", "0"], ["--lr-drop-epoch must be an epoch >= 1"]),
    (["--lr-drop-epoch", "-3"], ["--lr-drop-epoch must be an epoch >= 1"]),
    (["--workers", "-1"], ["--workers must be an integer >= 0", "got -1"]),
    (["--seed", "-1"], ["--seed must be an integer >= 0 and <= 4294967295", "got -1"]),
    (["--seed", "4294967296"], ["--seed must be an integer", "got 4294967296"]),
    (["--out", ""], ["--out is empty"]),
    (["--image-size", "48"], ["--image-size 48 does not fit backbone vit-tiny-test", "32 x 32", "pass 32"]),
])
def test_bad_flag_values_are_one_line_errors(cli, tmp_path, flags, fragments):
    out = [] if "--out" in flags else ["--out", tmp_path / "run"]
    code, _, err = cli("train", *SMALL, *out, *flags)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_bounds_cover_presets_too():
    """The one table checks resolved presets as well as flags: a preset out of range is refused the same way."""
    from slca_cli.errors import SlcaError
    from slca_cli.presets import RunConfig, _check
    from slca_cli.validation import BOUNDS

    cfg = RunConfig("synthetic", "vit-tiny-test", "slca", 4, (2, 2))
    _check(cfg)
    assert set(BOUNDS) <= {f for f in cfg.to_dict()}
    for field, bad in (("ca_lr", float("nan")), ("cov_ridge", 0.0), ("std", (0.5, 0.0, 0.5)), ("momentum", 2.0)):
        with pytest.raises(SlcaError, match=f"--{field.replace('_', '-')} must be"):
            _check(cfg.replace(**{field: bad}))


def test_accelerate_config_that_is_not_yaml_is_refused(cli, tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import os\nprint(os.getcwd())\n")
    done = run_subprocess("train", *SMALL, "--out", tmp_path / "run", "--accelerate-config", script)
    assert_one_line_error(done.returncode, done.stderr, f"--accelerate-config {script} is not an accelerate config")


# ---- 13: Ctrl-C at any moment ----

@pytest.mark.parametrize("point, where, sig, code", [
    ("start step=loading libraries", "starting: loading libraries", signal.SIGINT, 130),
    ("start step=reading the dataset", "starting: reading the dataset", signal.SIGTERM, 143),
])
def test_a_stop_while_starting_is_one_line_saying_where(tmp_path, point, where, sig, code):
    run = Running(["train", *SMALL, "--out", tmp_path / "run"], env={"SLCA_STALL_AT": point})
    run.wait_for(f"stalled at {point}")
    run.proc.send_signal(sig)
    assert run.finish() == code
    assert len(run.errors) == 1 and run.errors[0].startswith("error: interrupted by"), run.lines
    assert where in run.errors[0] and "Traceback" not in "\n".join(run.lines)


# ---- 4, 5: no non-finite number is saved as a finished task ----

def _poison_after_stage1(monkeypatch, task, where="backbone"):
    """fit_task as usual, then (in task ``task``) a NaN in the backbone: what the last step of a too-large learning
    rate does after the loss check."""
    import slca_cli.runner as runner
    real = runner.fit_task

    def fit(model, loader, accelerator, recipe, *, task: int, **kwargs):
        losses = real(model, loader, accelerator, recipe, task=task, **kwargs)
        if task + 1 == poisoned:
            with torch.no_grad():
                next(model.backbone.parameters()).view(-1)[0] = float("nan")
        return losses

    poisoned = task
    monkeypatch.setattr(runner, "fit_task", fit)


def test_a_nan_after_the_loss_check_is_never_saved_as_a_finished_task(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_after_stage1(monkeypatch, task=2)
    code, _, err = cli("train", *SMALL, "--method", "sl", "--out", out)
    assert_one_line_error(code, err, "task 2: the", "NaN or infinite", "not saved", "--precision fp32")
    run = out / "seed-1993"
    assert (run / "task-01" / "state.json").is_file() and not (run / "task-02").exists()
    stats = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(run / "task-01" / "stats.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in stats.values() if t.is_floating_point())
    monkeypatch.undo()  # the advice works: the resumed run redoes task 2 and finishes
    code, _, err = cli("train", *SMALL, "--method", "sl", "--out", out, "--resume")
    assert code == 0, err
    assert read_json(run / "metrics.json")["tasks_done"] == 2


def test_nan_heads_after_alignment_are_not_saved(cli, tmp_path, monkeypatch):
    import slca_cli.runner as runner
    real = runner.align_classifier

    def align(heads, *args, **kwargs):
        real(heads, *args, **kwargs)
        with torch.no_grad():
            heads[0].weight.fill_(float("inf"))

    monkeypatch.setattr(runner, "align_classifier", align)
    code, _, err = cli("train", *SMALL, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "task 2: the classifier heads hold NaN or infinite values")
    assert not (tmp_path / "run" / "seed-1993" / "task-02").exists()


def test_a_training_free_method_with_nan_weights_is_refused(cli, tmp_path):
    from safetensors.torch import save_file
    from slca_cli.backbones import get_backbone

    weights = {k: torch.full_like(v, float("nan")) for k, v in get_backbone("vit-tiny-test").build(None, False)
               .state_dict().items() if v.is_floating_point()}
    save_file(weights, str(tmp_path / "nan.safetensors"))
    code, _, err = cli("train", *SMALL, "--method", "simplecil", "--weights", tmp_path / "nan.safetensors",
                       "--out", tmp_path / "run")
    assert_one_line_error(code, err, "nan.safetensors hold NaN or infinite values")
    assert not (tmp_path / "run" / "seed-1993" / "task-01").exists()


def test_a_nan_mid_task_checkpoint_is_not_written(cli, tmp_path, monkeypatch):
    import slca_cli.learner as learner
    real = learner.TaskForward.forward

    def forward(self, images):  # the step after the loss check of epoch 1 leaves a NaN in the weights
        logits = real(self, images)
        with torch.no_grad():
            next(self.model.backbone.parameters()).view(-1)[0] = float("nan")
        return logits.nan_to_num()

    monkeypatch.setattr(learner.TaskForward, "forward", forward)
    monkeypatch.setattr(learner, "_check_finite", lambda *a: None)
    code, _, err = cli("train", *SMALL, "--epochs", 2, "--checkpoint-every", 1, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "task 1, epoch 1: the weights hold NaN", "not saved")
    assert not (tmp_path / "run" / "seed-1993" / "in-progress").exists()


# ---- 1, 2, 3: the disk fills up or turns read-only mid-run ----

def _fail_tensor_writes(monkeypatch, code, after=0):
    """safetensors' writer fails as it does on a full (28) or read-only (30) file system, after ``after`` files."""
    from safetensors import SafetensorError
    import slca_cli.checkpoint as checkpoint
    real, calls = checkpoint.save_file, []

    def save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > after:
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save)


@pytest.mark.parametrize("extra, after, where", [([], 2, ".task-02.partial/model.safetensors"),
                                                 (["--checkpoint-every", 1], 0, ".in-progress.partial/")])
def test_a_full_disk_while_writing_a_tensor_file_is_one_line(cli, tmp_path, monkeypatch, extra, after, where):
    _fail_tensor_writes(monkeypatch, errno.ENOSPC, after)
    code, _, err = cli("train", *SMALL, "--out", tmp_path / "run", *extra)
    assert_one_line_error(code, err, "No space left on device", where, "add --resume")
    run = tmp_path / "run" / "seed-1993"
    if after:  # the finished task is intact
        from slca_cli.checkpoint import verify_task
        assert verify_task(run / "task-01") is None
    assert not (run / ".slca.lock").exists()


def test_a_read_only_file_system_reports_the_first_failed_write_not_the_lock(cli, tmp_path, monkeypatch):
    _fail_tensor_writes(monkeypatch, errno.EROFS)
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == ".slca.lock":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    code, _, err = cli("train", *SMALL, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "Read-only file system", "model.safetensors")
    assert ".slca.lock" not in err


def test_a_failing_tensorboard_writer_thread_prints_no_traceback(cli, tmp_path, monkeypatch):
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    threads_failed = []
    monkeypatch.setattr("threading.excepthook", lambda args: threads_failed.append(args))  # what the user would see
    code, _, err = cli("train", *SMALL, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "No space left on device")
    assert not threads_failed


# ---- Also: one file mode for every file of a run; a lock naming pid -1 ----

def test_tensor_files_get_the_same_umask_mode_as_json_files(finished_run):
    run, _ = finished_run
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run / "task-01").iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert modes["model.safetensors"] == (run / "metrics.json").stat().st_mode & 0o777


@pytest.mark.parametrize("pid", [-1, 0, "7", True])
def test_a_lock_naming_no_real_process_is_taken_over(tmp_path, pid):
    from slca_cli.lock import LOCK_NAME, RunLock, machine_id

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "here", "machine": machine_id(),
                                                  "token": "x"}))
    warnings = []
    with RunLock(tmp_path, log=warnings.append):
        assert read_json(tmp_path / LOCK_NAME)["pid"] == os.getpid()
    assert warnings and "names no process" in warnings[0]


# ---- 8: --resume with other weights ----

def test_resume_with_weights_of_other_content_is_refused(cli, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from slca_cli.backbones import get_backbone
    from conftest import interrupt_at_task

    state = get_backbone("vit-tiny-test").build(None, False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "a.safetensors"))
    save_file({k: (v + 1).contiguous() for k, v in state.items()}, str(tmp_path / "b.safetensors"))
    out = tmp_path / "run"
    interrupt_at_task(monkeypatch, 2)
    code, _, err = cli("train", *SMALL, "--weights", tmp_path / "a.safetensors", "--out", out)
    assert code == 130, err
    monkeypatch.undo()
    before = read_json(out / "seed-1993" / "config.json")
    code, _, err = cli("train", *SMALL, "--weights", tmp_path / "b.safetensors", "--out", out, "--resume")
    assert_one_line_error(code, err, "was started from the weights file", "a.safetensors", "other content")
    assert read_json(out / "seed-1993" / "config.json") == before
    code, _, err = cli("train", *SMALL, "--out", out, "--resume")
    assert_one_line_error(code, err, "no --weights was given")
    (tmp_path / "moved").mkdir()  # the same content elsewhere is the same run
    shutil.move(tmp_path / "a.safetensors", tmp_path / "moved" / "a.safetensors")
    code, _, err = cli("train", *SMALL, "--weights", tmp_path / "moved" / "a.safetensors", "--out", out, "--resume")
    assert code == 0, err


# ---- 9: zip members without file-type bits ----

def test_zip_members_without_type_bits_are_files_and_skipped_ones_are_named(tmp_path, capsys):
    from slca_cli.data.archives import extract_archive

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a/1.png", b"one")  # writestr: mode 0o600, no S_IFREG bits
        zf.writestr("train/a/2.png", b"two")
        link = zipfile.ZipInfo("train/a/evil.png")
        link.external_attr = (0o120777 << 16)  # a symbolic link
        zf.writestr(link, "/etc/passwd")
    assert zipfile.ZipFile(archive).getinfo("train/a/1.png").external_attr >> 16 == 0o600
    assert extract_archive(archive, tmp_path / "out") == 2
    assert (tmp_path / "out" / "train" / "a" / "2.png").read_bytes() == b"two"
    assert not (tmp_path / "out" / "train" / "a" / "evil.png").exists()
    err = capsys.readouterr().err
    assert "skipped 1 member(s)" in err and "train/a/evil.png" in err


# ---- 10: a macOS (NFD) copy of the data resumes the run ----

def _nfd_tree(root, form):
    from conftest import write_image_tree
    import unicodedata
    names = [unicodedata.normalize(form, n) for n in ("café", "crème", "ñu", "zz")]
    tree = write_image_tree(root, names, per_split=(3, 1))
    for folder in (tree / "train").iterdir():  # file names with accents too, whose NFC and NFD orders differ
        (folder / "img_0.png").rename(folder / unicodedata.normalize(form, "é0.png"))
    return tree


def test_an_nfd_copy_of_the_data_resumes_the_run(cli, tmp_path, monkeypatch):
    from conftest import interrupt_at_task
    nfc, nfd = _nfd_tree(tmp_path / "nfc", "NFC"), _nfd_tree(tmp_path / "nfd", "NFD")
    args = ["--dataset", "folder", "--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress", "--tasks", 2,
            "--epochs", 1, "--batch-size", 4, "--workers", 0, "--ca-epochs", 1, "--ca-samples", 4,
            "--out", tmp_path / "run"]
    interrupt_at_task(monkeypatch, 2)
    code, _, err = cli("train", *args, "--data-root", nfc)
    assert code == 130, err
    monkeypatch.undo()
    code, _, err = cli("train", *args, "--data-root", nfd, "--resume")
    assert code == 0, err
    code, out, err = cli("eval", tmp_path / "run" / "seed-1993" / "task-02", "--data-root", nfd, "--device", "cpu",
                         "--no-progress")
    assert code == 0 and "matches" in out, err


def test_a_run_recorded_with_the_legacy_fingerprint_still_resumes(cli, tmp_path, monkeypatch):
    from conftest import interrupt_at_task
    from slca_cli.data.base import DatasetSplits
    nfd = _nfd_tree(tmp_path / "nfd", "NFD")
    args = ["--dataset", "folder", "--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress", "--tasks", 2,
            "--epochs", 1, "--batch-size", 4, "--workers", 0, "--ca-epochs", 1, "--ca-samples", 4,
            "--out", tmp_path / "run", "--data-root", nfd]
    real = DatasetSplits.fingerprint
    monkeypatch.setattr(DatasetSplits, "fingerprint", lambda self, legacy=False: real(self, legacy=True))
    interrupt_at_task(monkeypatch, 2)
    code, _, err = cli("train", *args)  # as slca before the fix recorded it: raw (NFD) names
    assert code == 130, err
    legacy = read_json(tmp_path / "run" / "seed-1993" / "task-01" / "state.json")["data_fingerprint"]
    monkeypatch.undo()
    from slca_cli.data import load_dataset
    assert legacy != load_dataset("folder", str(nfd), None, None, None, False).fingerprint()  # the names matter
    code, _, err = cli("train", *args, "--resume")
    assert code == 0, err
    assert read_json(tmp_path / "run" / "seed-1993" / "task-02" / "state.json")["data_fingerprint"] == legacy


# ---- 6: the JSON state has the integrity of the tensor files ----

def _edit_json(path, change):
    data = read_json(path)
    change(data)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def test_an_edited_task_state_is_detected_and_the_task_re_run(finished_run, cli, tmp_path):
    run, _ = finished_run
    copy = tmp_path / "run" / "seed-1993"
    shutil.copytree(run, copy)
    truth = read_json(run / "metrics.json")

    def more_correct(state):
        state["counts"][-1]["correct"][0] = state["counts"][-1]["total"][0]  # a valid but false count
    _edit_json(copy / "task-02" / "state.json", more_correct)
    code, out, err = cli("train", *TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 9, "--out", tmp_path / "run",
                         "--resume")
    assert code == 0, err
    assert "task-02" in out and "no longer matches its recorded state_sha256" in out
    assert read_json(copy / "metrics.json")["task_accuracy"] == truth["task_accuracy"]
    code, _, err = cli("eval", copy / "task-02", "--device", "cpu", "--no-progress")
    assert code == 0, err


def test_eval_refuses_an_edited_state(finished_run, cli, tmp_path):
    run, _ = finished_run
    shutil.copytree(run / "task-01", tmp_path / "task-01")
    _edit_json(tmp_path / "task-01" / "state.json", lambda s: s["metrics"].update(last_acc=99.0))
    code, _, err = cli("eval", tmp_path / "task-01", "--device", "cpu", "--no-progress")
    assert_one_line_error(code, err, "state.json was edited or damaged", "state_sha256")


def test_a_task_folder_from_another_run_breaks_the_chain(finished_run, tmp_path):
    from slca_cli.checkpoint import complete_tasks
    run, _ = finished_run
    shutil.copytree(run, tmp_path / "a")
    shutil.copytree(run, tmp_path / "b")
    _edit_json(tmp_path / "b" / "task-01" / "state.json", lambda s: None)  # same content, resealed below
    from slca_cli.checkpoint import state_digest
    def reseal(state):
        state["seconds"][0] += 1.0
        state["state_sha256"] = state_digest(state)
    _edit_json(tmp_path / "a" / "task-01" / "state.json", reseal)  # edited, and its checksum recomputed
    count, warnings = complete_tasks(tmp_path / "a")
    assert count == 1 and "task-02" in warnings[0] and "previous_state_sha256" in warnings[0]
    assert complete_tasks(tmp_path / "b") == (3, [])


def test_an_edited_mid_task_state_is_not_used(cli, tmp_path, monkeypatch):
    from conftest import interrupt_at_task
    out = tmp_path / "run"
    args = [*SMALL, "--epochs", 2, "--checkpoint-every", 1, "--out", out]
    import slca_cli.learner as learner
    real = learner.TaskForward.forward
    calls = []

    def stop_in_epoch_2(self, images):  # Ctrl-C in the second epoch of task 1: in-progress/ holds epoch 1
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(learner.TaskForward, "forward", stop_in_epoch_2)
    code, _, err = cli("train", *args)
    assert code == 130 and (out / "seed-1993" / "in-progress" / "state.json").is_file(), err
    monkeypatch.undo()
    _edit_json(out / "seed-1993" / "in-progress" / "state.json", lambda s: s.update(losses=[0.0]))
    code, stdout, err = cli("train", *args, "--resume")
    assert code == 0, err
    assert "in-progress is not used" in stdout and "state_sha256" in stdout


def test_report_checks_metrics_json_against_the_task_folders(finished_run, cli, tmp_path):
    run, _ = finished_run
    shutil.copytree(run, tmp_path / "runs" / "x" / "seed-1993")
    metrics = tmp_path / "runs" / "x" / "seed-1993" / "metrics.json"
    truth = read_json(metrics)["last_acc"]
    _edit_json(metrics, lambda m: m.update(last_acc=99.5))
    code, out, err = cli("report", tmp_path / "runs", "--out", tmp_path / "report", "--no-figures", "--json")
    assert code == 0, err
    assert "disagrees with task-03/state.json on last_acc" in err
    assert json.loads(out)["groups"][0]["last_acc"]["mean"] == pytest.approx(truth)
    for task in ("task-01", "task-02", "task-03"):
        shutil.rmtree(tmp_path / "runs" / "x" / "seed-1993" / task)
    code, out, err = cli("report", tmp_path / "runs", "--out", tmp_path / "report", "--no-figures", "--json")
    assert code == 0 and "cannot check" in err


def test_an_old_run_folder_without_state_checksums_still_resumes_and_evaluates(finished_run, cli, tmp_path):
    run, _ = finished_run
    copy = tmp_path / "run" / "seed-1993"
    shutil.copytree(run, copy)
    for task in ("task-01", "task-02", "task-03"):
        _edit_json(copy / task / "state.json", lambda s: [s.pop("state_sha256"), s.pop("previous_state_sha256")])
    shutil.rmtree(copy / "task-03")
    code, out, err = cli("train", *TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 9, "--out", tmp_path / "run",
                         "--resume")
    assert code == 0 and "warning" not in out, err
    assert read_json(copy / "metrics.json")["task_accuracy"] == read_json(run / "metrics.json")["task_accuracy"]
    code, _, err = cli("eval", copy / "task-02", "--device", "cpu", "--no-progress")
    assert code == 0, err


# ---- 7: slca report on damaged runs ----

@pytest.mark.parametrize("file, change", [
    ("metrics.json", lambda d: d.update(task_accuracy="90")),
    ("config.json", lambda d: d.update(config=["a", "b"])),
    ("config.json", lambda d: d.update(seed="1993")),
    ("config.json", lambda d: d["config"].update(task_sizes=3)),
    ("metrics.json", lambda d: d.update(accuracy_matrix=[[1.0]])),
    ("metrics.json", lambda d: d.update(last_acc="high")),
])
def test_report_skips_a_damaged_run_naming_it(finished_run, cli, tmp_path, file, change):
    run, _ = finished_run
    for name in ("good", "bad"):
        shutil.copytree(run, tmp_path / "runs" / name / "seed-1993")
    _edit_json(tmp_path / "runs" / "bad" / "seed-1993" / file, change)
    code, out, err = cli("report", tmp_path / "runs", "--out", tmp_path / "report", "--no-figures")
    assert code == 0, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "bad/seed-1993 is damaged" in lines[0] and "left out of the report" in lines[0], err
    assert "good" not in err and "Traceback" not in err


def test_report_with_out_naming_a_file(finished_run, cli, tmp_path):
    run, _ = finished_run
    (tmp_path / "file").write_text("x")
    code, _, err = cli("report", run, "--out", tmp_path / "file", "--no-figures")
    assert_one_line_error(code, err, "--out", "is a file")


def test_a_really_full_disk(cli, tmp_path):
    """The same on a real 600 KiB tmpfs (where mounting is allowed, e.g. as root): task-01 fits, task-02 does not."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, _, err = cli("train", *SMALL, "--out", disk / "run")
        assert_one_line_error(code, err, "No space left on device", "task-02", "add --resume")
        from slca_cli.checkpoint import verify_task
        assert verify_task(disk / "run" / "seed-1993" / "task-01") is None
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_the_startup_message_says_where_and_what_is_kept(monkeypatch):
    from slca_cli import stages
    from slca_cli.signals import RunInterrupted, startup_interrupt_message
    monkeypatch.setattr("sys.argv", ["slca", "demo"])
    stages.reset()
    assert "(starting: loading libraries); no task was being trained" in startup_interrupt_message(KeyboardInterrupt())
    stages.mark("fit", task=2, epoch=1)
    message = startup_interrupt_message(RunInterrupted(signal.SIGTERM))
    assert message.startswith("interrupted by SIGTERM during `slca demo` (task 2, stage-1 training (epoch 1))")
    assert "what had finished is kept" in message
    stages.reset()
