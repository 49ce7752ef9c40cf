"""--threads: the affinity cores shared among a node's processes by default, N on request; passive OpenMP waits
unless the user chose a wait setting."""
import torch

from slca_cli import threads
from tests.conftest import TINY, assert_one_line_error


def test_the_default_shares_the_affinity_cores_among_the_local_processes(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 5, 7, 9})
    assert threads.available_cores() == 6
    assert threads.default_threads(local_processes=1) == 6
    assert threads.default_threads(local_processes=4) == 1 and threads.default_threads(local_processes=8) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert threads.default_threads() == 2


def test_passive_waits_unless_the_user_set_a_wait_setting():
    env = {}
    assert threads.quiet_waits(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for name in threads.WAIT_SETTINGS:
        env = {name: "1"}
        assert not threads.quiet_waits(env) and env == {name: "1"}


def test_threads_flag_sets_torchs_threads(cli, tmp_path):
    before = torch.get_num_threads()
    try:
        code, _, err = cli("train", *TINY, "--tasks", 1, "--epochs", 1, "--num-classes", 2, "--train-per-class", 2,
                           "--test-per-class", 1, "--workers", 0, "--threads", 1, "--out", tmp_path / "run")
        assert code == 0, err
        assert torch.get_num_threads() == 1
        code, _, err = cli("train", *TINY, "--threads", 0, "--out", tmp_path / "bad")
        assert_one_line_error(code, err, "--threads must be 1 or more")
    finally:
        torch.set_num_threads(before)
