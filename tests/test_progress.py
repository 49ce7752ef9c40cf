"""--progress: plain lines when stderr is not a terminal (no carriage returns), bars on request, nothing when off."""
import re

import pytest

from slca_cli import progress
from tests.conftest import assert_one_line_error, run_subprocess

RUN = ["train", "--dataset", "synthetic", "--backbone", "vit-tiny-test", "--device", "cpu", "--num-classes", 4,
       "--tasks", 2, "--epochs", 2, "--train-per-class", 8, "--test-per-class", 2, "--workers", 0]
EPOCH_LINE = re.compile(r"^task (\d) stage 1: epoch (\d)/2, loss \d+\.\d{4}, [\d.]+ images/s, ETA \d+:\d\d:\d\d$")


def test_a_run_without_a_terminal_writes_one_line_per_epoch_and_stage(tmp_path):
    done = run_subprocess(*RUN, "--out", tmp_path / "run")  # stderr is a pipe, as under SLURM or `| tee`
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = done.stderr.strip().splitlines()
    epochs = [EPOCH_LINE.match(line).groups() for line in lines if EPOCH_LINE.match(line)]
    assert epochs == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")], done.stderr
    for stage in ("task 1 statistics: 1 batch, 16 images", "task 1 evaluate: 1 batch, 4 images",
                  "task 2 alignment: 5 epochs, loss", "task 2 evaluate: 1 batch, 8 images"):
        assert any(line.startswith(stage) for line in lines), (stage, done.stderr)


@pytest.mark.parametrize("flag", [["--progress", "off"], ["--no-progress"]])
def test_progress_off_writes_no_progress(cli, tmp_path, flag):
    code, stdout, stderr = cli(*RUN, *flag, "--out", tmp_path / "run")
    assert code == 0, stderr
    assert stderr == "" and "stage 1" not in stdout


def test_progress_bar_draws_tqdm_bars_even_without_a_terminal(cli, tmp_path):
    code, _, stderr = cli(*RUN, "--progress", "bar", "--out", tmp_path / "run")
    assert code == 0, stderr
    assert "\r" in stderr and "task 1 stage 1" in stderr and not EPOCH_LINE.search(stderr)


def test_an_unknown_progress_mode_is_one_line(cli, tmp_path):
    code, _, stderr = cli(*RUN, "--progress", "fancy", "--out", tmp_path / "run")
    assert_one_line_error(code, stderr, "--progress must be one of auto, bar, lines, off")


def test_eta_is_hours_minutes_seconds():
    assert progress.format_seconds(3725.4) == "1:02:05" and progress.format_seconds(-1) == "0:00:00"
