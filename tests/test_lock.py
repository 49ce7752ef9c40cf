"""One writer per run folder: a second run into the same seed folder is refused naming the holder; a lock left by
a dead process (or an unreachable machine that stopped touching it) is taken over."""
import json
import os
import signal
import socket
import time

import pytest

from conftest import TINY, assert_one_line_error, read_json
from procs import Running

from slca_cli import lock as lock_module
from slca_cli.errors import SlcaError
from slca_cli.lock import LOCK_NAME, RunLock, machine_id, process_start_ticks

SMALL = [*TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 4, "--test-per-class", 2,
         "--batch-size", 4]


def test_two_runs_into_one_folder(tmp_path, cli):
    out = tmp_path / "run"
    first = Running(["train", *SMALL, "--out", out], env={"SLCA_STALL_AT": "fit task=1 epoch=1 batch=1"})
    first.wait_for("stalled at fit task=1")
    holder = f"slca process {first.proc.pid} on host {socket.gethostname()}"
    for extra in ([], ["--resume"]):
        code, _, err = cli("train", *SMALL, "--out", out, *extra)
        assert_one_line_error(code, err, f"{out / 'seed-1993'} is in use by {holder}", "choose another --out",
                              f"delete {out / 'seed-1993' / LOCK_NAME}")
    # Another seed writes another folder: allowed alongside.
    code, _, err = cli("train", *SMALL, "--out", out, "--seed", 7)
    assert code == 0, err
    first.proc.send_signal(signal.SIGKILL)
    first.finish()
    assert (out / "seed-1993" / LOCK_NAME).exists()  # SIGKILL leaves the lock behind ...
    code, stdout, err = cli("train", *SMALL, "--out", out, "--resume")
    assert code == 0, err  # ... and the next run takes it over
    assert f"warning: took over the lock of {out / 'seed-1993'}: process {first.proc.pid}" in stdout
    assert "is no longer running" in stdout
    assert read_json(out / "seed-1993" / "metrics.json")["tasks_done"] == 2
    assert not (out / "seed-1993" / LOCK_NAME).exists()


def plant(folder, age=0.0, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": 4242, "host": "node7", "machine": "node7/boot/1", "started": "yesterday",
              "command": "slca train ...", "token": "t" * 32, **fields}
    path = folder / LOCK_NAME
    path.write_text(json.dumps(record) if fields.get("raw") is None else fields["raw"])
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_live_lock_from_another_machine_is_respected_until_it_goes_quiet(tmp_path):
    plant(tmp_path)
    with pytest.raises(SlcaError, match="in use by slca process 4242 on host node7"):
        RunLock(tmp_path).acquire()
    plant(tmp_path, age=lock_module.STALE_AFTER_SECONDS + 60)
    messages = []
    with RunLock(tmp_path, log=messages.append):
        holder = read_json(tmp_path / LOCK_NAME)
        assert holder["pid"] == os.getpid() and holder["machine"] == machine_id()
    assert "has not touched the lock" in messages[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_dead_or_reused_pid_on_this_machine_is_stale(tmp_path):
    lock = RunLock(tmp_path)
    plant(tmp_path, pid=os.getpid(), machine=machine_id(), process_start=process_start_ticks(os.getpid()))
    assert lock.stale_reason(lock._read_holder()) is None  # alive: our own process
    plant(tmp_path, pid=os.getpid(), machine=machine_id(), process_start=-1)
    assert "pid now belongs to another process" in lock.stale_reason(lock._read_holder())
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    plant(tmp_path, pid=dead, machine=machine_id())
    assert "is no longer running" in lock.stale_reason(lock._read_holder())


def test_an_unreadable_lock_file_is_refused_while_fresh_and_taken_over_when_old(tmp_path):
    plant(tmp_path, raw="{half a reco")
    with pytest.raises(SlcaError, match="lock file is being written or is unreadable"):
        RunLock(tmp_path).acquire()
    plant(tmp_path, raw="{half a reco", age=60)
    with RunLock(tmp_path):
        assert read_json(tmp_path / LOCK_NAME)["pid"] == os.getpid()


def test_the_holder_keeps_its_lock_fresh_and_removes_only_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.05)
    held = RunLock(tmp_path)
    held.acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 10
    with pytest.raises(SlcaError, match=f"in use by slca process {os.getpid()}"):
        RunLock(tmp_path).acquire()
    # Someone replaced the lock file: releasing ours must not delete theirs.
    plant(tmp_path)
    held.release()
    assert read_json(path)["pid"] == 4242


def test_the_lock_is_released_when_a_run_fails(tmp_path, cli):
    code, _, err = cli("train", *SMALL, "--out", tmp_path, "--lr-head", 1e38, "--init-classes", 1,
                       "--increment", 3, "--train-per-class", 4, "--batch-size", 4)
    assert code == 2 and "loss became" in err
    assert not (tmp_path / "seed-1993" / LOCK_NAME).exists()
