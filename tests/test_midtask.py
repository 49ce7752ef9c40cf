"""--checkpoint-every: saving changes nothing, a damaged or foreign in-progress/ is never used silently."""
import shutil

import pytest

from conftest import TINY, assert_one_line_error, interrupt_at_task, read_json

RUN = [*TINY, "--tasks", 2, "--epochs", 2, "--num-classes", 4, "--train-per-class", 6, "--test-per-class", 3,
       "--batch-size", 4, "--ca-epochs", 1]


def task_hashes(run_dir):
    return [read_json(run_dir / f"task-{t:02d}" / "state.json")["sha256"] for t in (1, 2)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from conftest import Cli
    out = tmp_path_factory.mktemp("straight")
    code, _, err = Cli()("train", *RUN, "--out", out)
    assert code == 0, err
    return out / "seed-1993"


def interrupted(cli, monkeypatch, out, task):
    """A run stopped (as by Ctrl-C) when task ``task`` (1-based) reaches evaluation: its epochs are all saved."""
    import slca_cli.runner as runner
    real = interrupt_at_task(monkeypatch, task)
    code, _, err = cli("train", *RUN, "--out", out, "--checkpoint-every", 1)
    monkeypatch.setattr(runner, "evaluate", real)
    assert code == 130 and "interrupted by SIGINT" in err, err
    return out / "seed-1993"


def test_checkpointing_every_epoch_changes_no_result(straight, cli, tmp_path):
    code, _, err = cli("train", *RUN, "--out", tmp_path, "--checkpoint-every", 1)
    assert code == 0, err
    assert task_hashes(tmp_path / "seed-1993") == task_hashes(straight)
    assert not (tmp_path / "seed-1993" / "in-progress").exists()


def test_resume_after_the_last_epoch_of_a_task(straight, cli, tmp_path, monkeypatch):
    run_dir = interrupted(cli, monkeypatch, tmp_path, task=2)
    assert read_json(run_dir / "in-progress" / "state.json")["epoch"] == 2
    code, out, err = cli("train", *RUN, "--out", tmp_path, "--resume")
    assert code == 0, err
    assert "resuming task 2 after epoch 2" in out
    assert task_hashes(run_dir) == task_hashes(straight)


def test_a_damaged_in_progress_folder_is_not_used(straight, cli, tmp_path, monkeypatch):
    run_dir = interrupted(cli, monkeypatch, tmp_path, task=2)
    weights = run_dir / "in-progress" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    code, out, err = cli("train", *RUN, "--out", tmp_path, "--resume")
    assert code == 0, err
    assert f"warning: {run_dir / 'in-progress'} is not used (optimizer.safetensors is missing or damaged" in out
    assert "task 2 starts from its first epoch" in out
    assert task_hashes(run_dir) == task_hashes(straight)


def test_an_in_progress_folder_of_another_experiment_is_refused(cli, tmp_path, monkeypatch):
    interrupted(cli, monkeypatch, tmp_path, task=1)  # no task folder yet, only in-progress/
    code, _, err = cli("train", *RUN, "--out", tmp_path)
    assert_one_line_error(code, err, "holds an interrupted task (in-progress/)", "--resume")
    code, _, err = cli("train", *RUN, "--out", tmp_path, "--resume", "--lr-head", 0.02)
    assert_one_line_error(code, err, "in-progress belongs to another experiment")
    shutil.rmtree(tmp_path / "seed-1993" / "in-progress")
    code, _, err = cli("train", *RUN, "--out", tmp_path, "--resume", "--lr-head", 0.02)
    assert code == 0, err


def test_a_negative_interval_is_refused(cli, tmp_path):
    code, _, err = cli("train", *RUN, "--out", tmp_path, "--checkpoint-every", -1)
    assert_one_line_error(code, err, "--checkpoint-every must be 0 (off) or a number of epochs")


@pytest.mark.parametrize("method,workers", [("slca", 1), ("dualprompt", 0)])
def test_mid_task_resume_equals_a_straight_run(cli, tmp_path, monkeypatch, method, workers):
    """Stopped after epoch 1 of 2 of task 2. With a loader worker drawing the random flips, epoch 2 after the
    resume must see the same shuffle and the same worker seeds as in a straight run; DualPrompt trains its
    prompts with Adam (step counts, two moment buffers) under a constant schedule."""
    from slca_cli.midtask import TaskEpochs
    args = [*RUN, "--method", method, "--workers", workers, "--checkpoint-every", 1]
    code, _, err = cli("train", *args, "--out", tmp_path / "straight")
    assert code == 0, err
    real = TaskEpochs.epoch_done

    def stop_after_saving(self, epoch, *rest):
        real(self, epoch, *rest)
        if self.task == 1 and epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(TaskEpochs, "epoch_done", stop_after_saving)
    code, _, err = cli("train", *args, "--out", tmp_path / "run")
    assert code == 130, err
    monkeypatch.setattr(TaskEpochs, "epoch_done", real)
    code, out, err = cli("train", *args, "--out", tmp_path / "run", "--resume")
    assert code == 0, err
    assert "resuming task 2 after epoch 1" in out
    assert task_hashes(tmp_path / "run" / "seed-1993") == task_hashes(tmp_path / "straight" / "seed-1993")
