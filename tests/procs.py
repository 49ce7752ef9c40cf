"""A CLI run in a real process whose output is read while it runs (kill, signal and lock tests), and the straight
runs those tests compare against."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import REPO, read_json


class Running:
    """`python -m slca_cli ARGS` in a fresh process whose stderr lines are collected as they come."""

    def __init__(self, args, env=None, own_group=False):
        full_env = dict(os.environ, PYTHONPATH=str(REPO), SLCA_TRACE="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "slca_cli", *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO,
                                     start_new_session=own_group)
        self.lines, self._out = [], []
        self._readers = [threading.Thread(target=self._read, args=(pipe, sink), daemon=True)
                         for pipe, sink in ((self.proc.stderr, self.lines), (self.proc.stdout, self._out))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe, sink):
        for line in pipe:
            sink.append(line.rstrip("\n"))

    def wait_for(self, text, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                self._readers[0].join(5)
                if any(text in line for line in self.lines):
                    return
                raise AssertionError(f"process ended before {text!r}:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"{text!r} not reached in {timeout} s")

    def finish(self, timeout=300):
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(10)
        return code

    @property
    def stdout(self):
        return "\n".join(self._out)

    @property
    def errors(self):
        return [l for l in self.lines if not l.startswith("slca-trace:")]


# A 2-process gloo launch on the CPU, as a GPU user's `accelerate launch` (append "-m slca_cli ..." or a script).
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch_two(*command):
    """Run ``command`` (after the launcher) in 2 processes; fails the test with its stderr if it fails."""
    proc = subprocess.run([*LAUNCH_TWO, *map(str, command)], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_with_two_processes(args, out):
    """`slca train ARGS --out OUT` in 2 processes; returns the seed folder."""
    launch_two("-m", "slca_cli", "train", *args, "--out", out)
    return Path(out) / "seed-1993"


def assert_kill_and_resume_match(straight_run, args, kill_at, result_keys):
    """SIGKILL a run of ``args`` where it logs ``stalled at KILL_AT``, then ``--resume`` it: the metrics
    (``result_keys``) and the sealed task states equal those of ``straight_run`` (its seed-1993 folder)."""
    from slca_cli.checkpoint import verify_task
    run = Running(args, env={"SLCA_STALL_AT": kill_at})
    run.wait_for(f"stalled at {kill_at}")
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    resumed = Running([*args, "--resume"])
    assert resumed.finish() == 0, "\n".join(resumed.lines[-20:])
    out = Path(args[args.index("--out") + 1]) / "seed-1993"
    got, want = read_json(out / "metrics.json"), read_json(straight_run / "metrics.json")
    for key in result_keys:
        assert got[key] == want[key], key
    for folder in ("task-01", "task-02"):
        assert verify_task(out / folder) is None
        assert read_json(out / folder / "state.json")["sha256"] == \
            read_json(straight_run / folder / "state.json")["sha256"], folder


def train_each(root, table):
    """One uninterrupted `slca train ARGS --out ROOT/NAME` per entry NAME -> ARGS of ``table``, all in one fresh
    process (tests/launched_runs.py: one interpreter and torch import for them all, not one per run); returns
    ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = root / "plan.json"
    plan.write_text(json.dumps([[str(root / name), [str(a) for a in args], None] for name, args in table.items()]))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "launched_runs.py"), str(plan)], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def assert_evaluates_as_stored(cli, run, tasks=2):
    """A straight run (its seed-1993 folder ``run``) has every task's accuracy in [0, 100] and `slca eval` of its
    last task reproduces the stored accuracy."""
    metrics = read_json(run / "metrics.json")
    assert len(metrics["task_accuracy"]) == tasks and all(0 <= a <= 100 for a in metrics["task_accuracy"])
    code, stdout, stderr = cli("eval", run / f"task-{tasks:02d}", "--device", "cpu", "--no-progress", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["matches_stored"] is True
