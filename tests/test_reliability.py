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
