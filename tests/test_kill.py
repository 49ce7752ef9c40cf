"""Crash safety with real processes: SIGKILL at chosen points (mid-epoch, mid-alignment, mid-checkpoint-write),
SIGINT and SIGTERM, then --resume; the final results must equal an uninterrupted run's exactly (CPU, same seed).

The points come from the run's own trace (SLCA_TRACE=1 prints one line per stage, epoch and batch); SLCA_STALL_AT
holds the process still at one of them so that the kill lands exactly there."""
import os
import shlex
import signal
import subprocess
import sys

import pytest

from conftest import REPO, TINY, read_json
from procs import Running

from slca_cli.checkpoint import verify_task

RUN = [*TINY, "--tasks", 2, "--epochs", 2, "--num-classes", 6, "--train-per-class", 8, "--test-per-class", 6,
       "--batch-size", 8, "--ca-epochs", 2]
RESULT_KEYS = ("accuracy_matrix", "task_accuracy", "old_accuracy", "new_accuracy", "last_acc", "inc_acc",
               "forgetting", "counts", "tasks_done", "task_sizes")


def kill_at(point, out, *extra, resume=False):
    """Run until the trace reaches ``point``, hold there, SIGKILL the process."""
    run = Running(["train", *RUN, "--out", out, *extra, *(["--resume"] if resume else [])],
                  env={"SLCA_STALL_AT": point})
    run.wait_for(f"stalled at {point}")
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    return run


def resume(out, *extra):
    run = Running(["train", *RUN, "--out", out, *extra, "--resume"])
    code = run.finish()
    assert code == 0, "\n".join(run.lines[-20:])
    return run


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("straight")
    run = Running(["train", *RUN, "--out", out])
    assert run.finish() == 0, "\n".join(run.lines[-20:])
    return out / "seed-1993"


def assert_same_results(run_dir, straight_dir):
    got, want = read_json(run_dir / "metrics.json"), read_json(straight_dir / "metrics.json")
    for key in RESULT_KEYS:
        assert got[key] == want[key], key
    for t in (1, 2):
        folder = f"task-{t:02d}"
        assert verify_task(run_dir / folder) is None
        # Bit-for-bit the same weights and class statistics as the straight run.
        assert read_json(run_dir / folder / "state.json")["sha256"] == \
            read_json(straight_dir / folder / "state.json")["sha256"], folder
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "temporary files or lock left"
    assert not (run_dir / "in-progress").exists()


def test_sigkill_at_four_points_then_resume_equals_a_straight_run(straight, tmp_path):
    out = tmp_path / "run"
    run_dir = out / "seed-1993"
    kill_at("fit task=2 epoch=2 batch=2", out)                       # mid-epoch
    assert sorted(p.name for p in run_dir.glob("task-*")) == ["task-01"]
    kill_at("align task=2 epoch=1", out, resume=True)                # mid-alignment
    kill_at("save folder=task-02 file=model.safetensors", out, resume=True)  # mid-checkpoint-write
    assert (run_dir / ".task-02.partial" / "model.safetensors").exists()
    assert not (run_dir / "task-02").exists()
    assert read_json(run_dir / "metrics.json")["tasks_done"] == 1
    kill_at("metrics task=2", out, resume=True)                      # task-02 in place, metrics.json not yet
    assert verify_task(run_dir / "task-02") is None
    assert read_json(run_dir / "metrics.json")["tasks_done"] == 1
    final = resume(out)
    assert "(2/2 tasks done)" in final.stdout and "Last-Acc" in final.stdout
    assert_same_results(run_dir, straight)


def test_mid_task_checkpoints_resume_at_the_saved_epoch(straight, tmp_path):
    out = tmp_path / "run"
    run_dir = out / "seed-1993"
    kill_at("fit task=2 epoch=2 batch=1", out, "--checkpoint-every", 1)
    state = read_json(run_dir / "in-progress" / "state.json")
    assert (state["task"], state["epoch"]) == (1, 1)
    # Killed while writing the next mid-task checkpoint: the previous one stays usable.
    run = kill_at("save folder=in-progress file=optimizer.safetensors", out, "--checkpoint-every", 1, resume=True)
    assert "resuming task 2 after epoch 1" in run.stdout
    assert (run_dir / ".in-progress.partial").exists()
    assert read_json(run_dir / "in-progress" / "state.json")["epoch"] == 1
    # Killed between the two renames that replace in-progress/: only the hidden copies exist ...
    kill_at("save folder=in-progress file=swap", out, "--checkpoint-every", 1, resume=True)
    assert not (run_dir / "in-progress").exists()
    assert read_json(run_dir / ".in-progress.partial" / "state.json")["epoch"] == 2
    final = resume(out, "--checkpoint-every", 1)
    # ... and the complete new one is put in place: task 2 continues after its last epoch.
    assert f"recovered {run_dir / 'in-progress'}" in final.stdout
    assert "resuming task 2 after epoch 2" in final.stdout
    assert "task 1/2" not in final.stdout and "task 2/2" in final.stdout
    assert_same_results(run_dir, straight)


def test_sigterm_during_a_checkpoint_write_finishes_it_then_exits_143(straight, tmp_path):
    out = tmp_path / "run"
    run_dir = out / "seed-1993"
    run = Running(["train", *RUN, "--out", out], env={"SLCA_STALL_AT": "save folder=task-01 file=model.safetensors",
                                                     "SLCA_STALL_SECONDS": "2"})
    run.wait_for("stalled at save folder=task-01")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143
    message = run.errors
    assert len(message) == 1 and "interrupted by SIGTERM" in message[0], run.lines
    assert "task-01 of" in message[0] and "is saved" in message[0]
    # The write that was under way was finished, not cut: task-01 is complete and counted.
    assert verify_task(run_dir / "task-01") is None
    assert read_json(run_dir / "metrics.json")["tasks_done"] == 1
    assert not (run_dir / "task-02").exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    # The printed command is exactly what continues the run.
    command = shlex.split(message[0].split("Resume with: ", 1)[1])
    assert command[0] == "slca" and command[-1] == "--resume"
    proc = subprocess.run([sys.executable, "-m", "slca_cli", *command[1:]], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "after task-01" in proc.stdout
    assert_same_results(run_dir, straight)


def test_sigint_mid_epoch_exits_130_with_the_resume_command(tmp_path):
    out = tmp_path / "run"
    run = Running(["train", *RUN, "--out", out], env={"SLCA_STALL_AT": "fit task=2 epoch=1 batch=2"})
    run.wait_for("stalled at fit task=2 epoch=1 batch=2")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130
    message = run.errors
    assert len(message) == 1, run.lines
    assert "interrupted by SIGINT during seed 1993, task 2, stage-1 training (epoch 1)" in message[0]
    assert "task-01 of" in message[0] and message[0].endswith("--resume")
    assert "Traceback" not in "\n".join(run.lines)
    assert not (out / "seed-1993" / ".slca.lock").exists()


def test_sigterm_to_the_whole_job_with_loader_workers(tmp_path):
    """Schedulers signal every process of a job, data-loader workers included: still one line and 143."""
    out = tmp_path / "run"
    run = Running(["train", *RUN, "--out", out, "--workers", 2], env={"SLCA_STALL_AT": "fit task=2 epoch=1 batch=2"},
                  own_group=True)
    run.wait_for("stalled at fit task=2 epoch=1 batch=2")
    os.killpg(run.proc.pid, signal.SIGTERM)
    assert run.finish() == 143
    assert len(run.errors) == 1 and "interrupted by SIGTERM during seed 1993, task 2" in run.errors[0], run.lines
    assert not (out / "seed-1993" / ".slca.lock").exists()
