"""`slca eval` against the stored counts: exact where it repeats the run's arithmetic, within a stated number of
near-tie images where it cannot (compiled, bf16/fp16, GPU kernels, another batch size or process count)."""
import json
from types import SimpleNamespace

import torch

from slca_cli.evaluation import NEAR_TIE_SHARE, near_tie_tolerance, same_numerics


def _accelerator(device="cpu", mixed="no"):
    return SimpleNamespace(device=torch.device(device), mixed_precision=mixed)


def test_only_a_repeat_of_the_runs_arithmetic_is_held_to_exact_counts():
    run = SimpleNamespace(compile=False, batch_size=16)
    assert same_numerics(run, _accelerator(), None) and same_numerics(run, _accelerator(), 16)
    assert not same_numerics(run, _accelerator(), 8)  # other batch shapes
    assert not same_numerics(SimpleNamespace(compile=True, batch_size=16), _accelerator(), None)
    assert not same_numerics(run, _accelerator(mixed="bf16"), None)
    assert not same_numerics(run, SimpleNamespace(device=torch.device("cuda"), mixed_precision="no"), None)
    assert near_tie_tolerance(10_000, exact=True) == 0
    assert near_tie_tolerance(10_000, exact=False) == round(NEAR_TIE_SHARE * 10_000) == 50
    assert near_tie_tolerance(30, exact=False) == 1  # at least one image


def test_eval_reports_the_tolerance_it_applied(finished_run, cli):
    run, _ = finished_run
    code, stdout, stderr = cli("eval", run / "task-03", "--device", "cpu", "--no-progress", "--json")
    assert code == 0, stderr
    same = json.loads(stdout)
    assert same["tolerance_images"] == 0 and same["differing_images"] == 0 and same["matches_stored"] is True
    code, stdout, stderr = cli("eval", run / "task-03", "--device", "cpu", "--no-progress", "--json",
                               "--batch-size", 5)
    assert code == 0, stderr
    other = json.loads(stdout)
    assert other["tolerance_images"] == near_tie_tolerance(sum(other["total"]), exact=False) >= 1
    assert other["matches_stored"] is (other["differing_images"] <= other["tolerance_images"])
    assert other["matches_stored"] is True  # a few dozen images: no near-tie flips at another batch size on a CPU
