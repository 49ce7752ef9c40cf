"""--drift-compensation linear: the drift fit against a direct solve, the moved Gaussians, and the whole CLI (train,
SIGKILL + --resume equal to a straight run, eval, report, refusals)."""
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, assert_one_line_error, read_json
from procs import Running

from slca_cli.checkpoint import verify_task
from slca_cli.drift import compensate, estimate_drift, fit_linear_drift, linear_drift_from_sums

FLAGS = ["--tasks", 3, "--epochs", 1, "--num-classes", 6, "--train-per-class", 8, "--test-per-class", 6,
         "--batch-size", 8, "--method", "slca", "--ca-epochs", 1]
DRIFT = ["--drift-compensation", "linear", "--drift-views", 2]


def test_drift_fit_is_the_ridge_solution_towards_no_drift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    b = a @ rng.normal(size=(6, 6)).T + 0.1 * rng.normal(size=(40, 6))
    ridge = 0.3
    lam = ridge * np.trace(a.T @ a) / 6
    delta = np.linalg.solve(a.T @ a + lam * np.eye(6), a.T @ (b - a)).T  # argmin ||b - a(I+D)^T||^2 + lam ||D||^2
    got = fit_linear_drift(torch.tensor(a), torch.tensor(b), ridge)
    np.testing.assert_allclose(got.numpy(), np.eye(6) + delta, rtol=1e-10, atol=1e-12)


def test_a_tiny_ridge_recovers_an_exact_linear_drift_and_a_huge_one_none():
    a = torch.randn(200, 5, dtype=torch.float64)
    p = torch.eye(5, dtype=torch.float64) + 0.3 * torch.randn(5, 5, dtype=torch.float64)
    torch.testing.assert_close(fit_linear_drift(a, a @ p.T, 1e-12), p)
    torch.testing.assert_close(fit_linear_drift(a, a @ p.T, 1e12), torch.eye(5, dtype=torch.float64), atol=1e-9,
                               rtol=0)


def test_shards_of_the_pairs_sum_to_the_fit_of_all():
    a, b = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    shards = [(a[:11], b[:11]), (a[11:], b[11:])]
    parts = [(x.T @ x, (y - x).T @ x) for x, y in shards]
    summed = linear_drift_from_sums(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1], 0.5)
    torch.testing.assert_close(summed, fit_linear_drift(a, b, 0.5))
    torch.testing.assert_close(estimate_drift([a[:11], a[11:]], [b[:11], b[11:]], 0.5, lambda t: t), summed)


def test_compensated_gaussians_are_the_drift_maps_images():
    p = torch.eye(4, dtype=torch.float64) + 0.2 * torch.randn(4, 4, dtype=torch.float64)
    means = [torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)]
    x = torch.randn(5, 4, 4, dtype=torch.float64)
    covs = x @ x.transpose(1, 2) + torch.eye(4, dtype=torch.float64)
    chol = torch.linalg.cholesky(covs)
    moved_means, moved = compensate(p, means, [chol[:3], chol[3:]])
    torch.testing.assert_close(torch.cat(moved_means), torch.cat(means) @ p.T)
    factors = torch.cat(moved)
    torch.testing.assert_close(factors @ factors.transpose(1, 2), p @ covs @ p.T)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight 3-task run with drift compensation and the same run without it."""
    root = tmp_path_factory.mktemp("drift")
    for name, extra in (("drift", DRIFT), ("plain", [])):
        run = Running(["train", *TINY, *FLAGS, *extra, "--out", root / name])
        assert run.finish() == 0, "\n".join(run.lines[-20:])
    return root


def test_each_later_task_stores_its_drift_map_and_stage_1_is_untouched(runs):
    seed = runs / "drift" / "seed-1993"
    stats = [load_file(str(seed / f"task-0{t}" / "stats.safetensors")) for t in (1, 2, 3)]
    assert "drift" not in stats[0]
    dim = stats[0]["means"].shape[1]
    for s in stats[1:]:
        assert s["drift"].shape == (dim, dim) and not torch.equal(s["drift"], torch.eye(dim, dtype=s["drift"].dtype))
    drift_model, plain_model = (load_file(str(runs / r / "seed-1993" / "task-03" / "model.safetensors"))
                                for r in ("drift", "plain"))
    for key, value in plain_model.items():  # the extra feature passes change neither stage 1 nor its randomness
        if key.startswith(("backbone.", "stage1_heads.")):
            assert torch.equal(drift_model[key], value), key
    assert not torch.equal(drift_model["task_heads.0.weight"], plain_model["task_heads.0.weight"])


def test_resume_after_a_kill_in_the_last_task_applies_the_stored_maps(runs, tmp_path, cli):
    want = runs / "drift" / "seed-1993"
    out = tmp_path / "killed"
    args = ["train", *TINY, *FLAGS, *DRIFT, "--out", out]
    run = Running(args, env={"SLCA_STALL_AT": "evaluate task=3"})
    run.wait_for("stalled at evaluate task=3")
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    resumed = Running([*args, "--resume"])
    assert resumed.finish() == 0, "\n".join(resumed.lines[-20:])
    got, metrics = (read_json(p / "metrics.json") for p in (out / "seed-1993", want))
    for key in ("accuracy_matrix", "last_acc", "counts"):
        assert got[key] == metrics[key], key
    for folder in ("task-01", "task-02", "task-03"):
        assert verify_task(out / "seed-1993" / folder) is None
        assert read_json(out / "seed-1993" / folder / "state.json")["sha256"] == \
            read_json(want / folder / "state.json")["sha256"], folder
    code, stdout, stderr = cli("eval", want / "task-03", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and '"matches_stored": true' in stdout, stderr


def test_report_labels_the_compensated_row(runs, tmp_path, cli):
    code, stdout, stderr = cli("report", runs / "drift", runs / "plain", "--out", tmp_path / "r", "--no-figures")
    assert code == 0, stderr
    assert "| SLCA (drift-compensated) |" in stdout and "| SLCA |" in stdout


@pytest.mark.parametrize("flags,needle", [(["--method", "sl", "--drift-compensation", "linear"], "--drift-compensation"),
                                          (["--drift-compensation", "sdc"], "--drift-compensation"),
                                          (["--drift-ridge", "0"], "--drift-ridge")])
def test_bad_drift_settings_are_one_line_errors(cli, tmp_path, flags, needle):
    code, _, stderr = cli("train", *TINY, *FLAGS[:-4], *flags, "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, needle)


class _Process:
    """What the feature passes read of an accelerator: process ``rank`` of ``world`` on the CPU."""

    def __init__(self, rank=0, world=1):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")
        self.is_main_process = rank == 0


def _cifar_loaders(root, on_device, batch_size=8):
    from slca_cli.data.loaders import PassLoaders
    from slca_cli.resolve import resolve_run
    from test_device_augment import cifar_tree
    cfg, data = resolve_run("cifar100", "vit-tiny-test", "slca", {"data_root": str(cifar_tree(root)), "tasks": 10})
    return PassLoaders(data, list(range(100)), batch_size=batch_size, image_size=cfg.image_size, mean=cfg.mean,
                       std=cfg.std, device=torch.device("cpu"), workers=0, on_device=on_device)


def _pass_images(loader, process):
    from slca_cli.data.loaders import finish_batch
    from slca_cli.distributed import process_loader
    finish = finish_batch(loader)
    return [(finish(images), labels) for images, labels in process_loader(loader, process)]


def _rows(batches):
    """A pass's (image, label) rows as a sorted list of bytes: the same multiset whatever the order."""
    return sorted(bytes(x.numpy().tobytes()) + bytes(int(y).to_bytes(2, "little"))
                  for images, labels in batches for x, y in zip(images, labels))


@pytest.mark.parametrize("on_device", [True, False], ids=["device", "host"])
def test_drift_passes_repeat_exactly_and_shard_without_changing_the_views(tmp_path, on_device):
    """Before and after stage 1 the drift fit pairs the features of the same augmented views: two passes give
    identical batches (the device path once drew its crops from the global RNG), and two processes' shards are
    exactly the one-process views (the host path once failed with a TypeError at task 2 under several
    processes)."""
    from slca_cli.drift import drift_loaders
    loaders = _cifar_loaders(tmp_path / "cifar", on_device)
    classes = list(range(10, 20))  # 20 training images: batches of 8 (16 for statistics), the last partial
    first = [_pass_images(loader, _Process()) for loader in drift_loaders(loaders, classes, 2, 7)]
    torch.manual_seed(123)  # whatever the global RNG holds, the views do not change
    second = [_pass_images(loader, _Process()) for loader in drift_loaders(loaders, classes, 2, 7)]
    for a, b in zip(first, second):
        assert len(a) == len(b) >= 2
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first[1][0][0], first[2][0][0])  # each view its own draws
    assert not torch.equal(first[0][0][0], first[1][0][0])  # and train views are not the test transform
    for single, loader in zip(first, drift_loaders(loaders, classes, 2, 7)):
        shards = [_pass_images(loader, _Process(rank, 2)) for rank in range(2)]
        assert _rows(shards[0] + shards[1]) == _rows(single)
