import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from slca_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress"]


class Cli:
    """Runs `slca` in this process (fast) and returns (exit code, stdout, stderr)."""

    def __call__(self, *args):
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def cli():
    return Cli()


def run_subprocess(*args, env=None, cwd=None):
    """`python -m slca_cli ARGS` in a fresh interpreter, as a user runs it."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "slca_cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def interrupt_at_task(monkeypatch, task):
    """Stop the run (as Ctrl-C does) when task ``task`` reaches evaluation; returns the real ``evaluate`` (to put
    back with ``monkeypatch.setattr``)."""
    import slca_cli.runner as runner
    real = runner.evaluate

    def stop(model, loader, accelerator, sizes, *rest):
        if len(sizes) == task:
            raise KeyboardInterrupt
        return real(model, loader, accelerator, sizes, *rest)

    monkeypatch.setattr(runner, "evaluate", stop)
    return real


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One whole 3-task run through the CLI, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run") / "run"
    code, stdout, stderr = Cli()("train", *TINY, "--tasks", 3, "--epochs", 1, "--num-classes", 9, "--out", out)
    assert code == 0, stderr
    return out / "seed-1993", stdout


def write_image_tree(root: Path, classes, per_split=(4, 2), size=16, ext=".png"):
    """train/<class>/*.png and test/<class>/*.png with a distinct colour per class."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_split):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.full((size, size, 3), (37 * c) % 256, dtype=np.uint8)
                pixels = (pixels + rng.integers(0, 20, pixels.shape)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}{ext}")
    return root


DIGIT_RUN = ["--dataset", "folder", "--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress", "--tasks", 2,
             "--epochs", 2]


@pytest.fixture(scope="session")
def digit_folders(tmp_path_factory):
    """Digits 0-7 and, as a batch arriving later, 8-9, as train/<digit>/*.png and test/<digit>/*.png folders."""
    from slca_cli.data.digits import write_digit_folders
    root = tmp_path_factory.mktemp("digits")
    return (write_digit_folders(root / "digits-0-7", range(8), 8, 4),
            write_digit_folders(root / "digits-8-9", (8, 9), 8, 4))


@pytest.fixture(scope="session")
def digit_run(digit_folders, tmp_path_factory):
    """A finished 2-task run on the digits 0-7 folder (shared by predict, export and continue tests: read only)."""
    out = tmp_path_factory.mktemp("digit-run") / "run"
    code, _, stderr = Cli()("train", *DIGIT_RUN, "--data-root", digit_folders[0], "--out", out)
    assert code == 0, stderr
    return out / "seed-1993"


@pytest.fixture(scope="session")
def method_run(digit_folders, tmp_path_factory):
    """``method_run(METHOD)``: a finished 2-task run of METHOD on the digits 0-7 folder (1 epoch, 4 training and 2
    test images per class), trained on first use and shared (read only) by the predict and export tests."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"method-{method}") / "run"
            extra = ["--ranpac-dim", 32] if method == "ranpac" else []
            code, _, stderr = Cli()("train", "--dataset", "folder", "--data-root", digit_folders[0], "--backbone",
                                    "vit-tiny-test", "--device", "cpu", "--no-progress", "--epochs", 1, "--ca-epochs",
                                    1, "--method", method, "--tasks", 2, "--test-per-class", 2, "--train-per-class",
                                    4, *extra, "--out", out)
            assert code == 0, stderr
            runs[method] = out / "seed-1993"
        return runs[method]

    return get
