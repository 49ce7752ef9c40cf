"""Beyond the paper (issue 13): SimpleCIL, RanPAC, --covariance shrinkage and --align-mode closed-form.

The math against numpy / scikit-learn; each method through the whole CLI: train, SIGKILL + --resume (equal to a
straight run bit for bit), eval, report, identity checks on --resume, the demo's --method, two processes."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, assert_one_line_error, read_json
from procs import assert_evaluates_as_stored, assert_kill_and_resume_match, train_each, train_with_two_processes

from slca_cli.closed_form import (RIDGE_GRID, cosine_prototypes, lda_classifier, oas_shrinkage, ridge_validation_errors,
                                  ridge_weights, select_ridge, shrink_class_covariances)
from slca_cli.methods.ranpac import held_out_split

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 6, "--train-per-class", 8, "--test-per-class", 6,
         "--batch-size", 8]
VARIANTS = {"simplecil": ["--method", "simplecil"],
            "ranpac": ["--method", "ranpac", "--ranpac-dim", 64],
            "ranpac-adapt": ["--method", "ranpac", "--ranpac-dim", 64, "--ranpac-adapt"],
            "slca-cf": ["--method", "slca", "--align-mode", "closed-form", "--covariance", "shrinkage",
                        "--ca-epochs", 1]}
# Where each variant is killed: inside its own classifier stage (ranpac), or before the task's evaluation.
KILL_AT = {"simplecil": "evaluate task=2", "ranpac": "classifier task=2", "ranpac-adapt": "classifier task=2",
           "slca-cf": "evaluate task=2"}
RESULT_KEYS = ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc", "counts")


# ---- math ----

def test_oas_equals_scikit_learn():
    from sklearn.covariance import OAS
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 12)) @ rng.normal(size=(12, 12))
    model = OAS().fit(x)
    mle = np.cov(x, rowvar=False, bias=True)
    shrunk, rho = oas_shrinkage(torch.tensor(mle), torch.tensor(30.0))
    np.testing.assert_allclose(shrunk.numpy(), model.covariance_, rtol=1e-10, atol=1e-12)
    assert abs(float(rho) - model.shrinkage_) < 1e-12


def test_class_shrinkage_works_on_the_unbiased_covariances_the_accumulator_gives():
    from sklearn.covariance import OAS
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 6)) * (1 + c) for c, n in enumerate((9, 15))]
    covs = torch.tensor(np.stack([np.cov(x, rowvar=False) for x in xs]))
    got = shrink_class_covariances(covs, torch.tensor([9.0, 15.0]), ridge=0.01)
    for g, x in zip(got, xs):
        want = OAS().fit(x).covariance_ * len(x) / (len(x) - 1) + 0.01 * np.eye(6)
        np.testing.assert_allclose(g.numpy(), want, rtol=1e-10)


def test_lda_heads_equal_scikit_learns_linear_discriminant():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(loc=c, size=(40, 5)) @ rng.normal(size=(5, 5)) for c in range(3)])
    y = np.repeat(np.arange(3), 40)
    lda = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(3, 1 / 3)).fit(x, y)
    means = torch.tensor(np.stack([x[y == c].mean(0) for c in range(3)]))
    covs = torch.tensor(np.stack([np.cov(x[y == c], rowvar=False, bias=True) for c in range(3)]))
    weight, bias = lda_classifier(means, covs)
    np.testing.assert_allclose(weight.numpy(), lda.coef_, rtol=1e-8)
    np.testing.assert_allclose(bias.numpy(), lda.intercept_ - np.log(1 / 3), rtol=1e-8)


@pytest.mark.parametrize("samples", [20, 80])  # fewer (dual form) and more (primal form) samples than features
def test_ridge_validation_errors_equal_direct_solves(samples):
    rng = np.random.default_rng(3)
    h, hv = rng.normal(size=(samples, 40)), rng.normal(size=(10, 40))
    y, yv = np.eye(4)[rng.integers(0, 4, samples)], np.eye(4)[rng.integers(0, 4, 10)]
    lambdas = (1e-2, 1.0, 1e2)
    got = ridge_validation_errors(*(torch.tensor(a) for a in (h, y, hv, yv)), lambdas)
    for lam, err in zip(lambdas, got):
        w = np.linalg.solve(h.T @ h + lam * np.eye(40), h.T @ y)
        assert abs(float(err) - ((hv @ w - yv) ** 2).mean()) < 1e-9
    best = select_ridge(*(torch.tensor(a) for a in (h, y, hv, yv)), lambdas)
    assert best == lambdas[int(np.argmin(got.numpy()))]
    w = ridge_weights(torch.tensor(h.T @ h), torch.tensor(h.T @ y), 1.0)
    np.testing.assert_allclose(w.numpy(), np.linalg.solve(h.T @ h + np.eye(40), h.T @ y), rtol=1e-9)
    assert RIDGE_GRID[0] == 1e-8 and RIDGE_GRID[-1] == 1e13


def test_held_out_split_is_one_in_five_per_class_whatever_the_sample_order():
    features, labels = torch.randn(50, 7), torch.arange(50) % 2
    mask = held_out_split(features, labels)
    assert [int(mask[labels == c].sum()) for c in (0, 1)] == [5, 5]
    perm = torch.randperm(50)
    assert torch.equal(held_out_split(features[perm], labels[perm]), mask[perm])


def test_cosine_prototype_heads_rank_as_cosine_similarity():
    means, x = torch.randn(5, 8), torch.randn(20, 8)
    cosine = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
    assert torch.equal((x @ cosine_prototypes(means).T).argmax(1), cosine.argmax(1))


# ---- whole CLI ----

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run per variant (one process for them all)."""
    table = {name: [*TINY, *SMALL, *flags] for name, flags in VARIANTS.items()}
    return train_each(tmp_path_factory.mktemp("beyond"), table)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_trains_evaluates_and_resumes_after_a_kill(straight, tmp_path, cli, name):
    want = straight / name / "seed-1993"
    assert_evaluates_as_stored(cli, want)
    # SIGKILL inside task 2, then --resume: the same numbers and the same tensors as the straight run.
    args = ["train", *TINY, *SMALL, *VARIANTS[name], "--out", tmp_path / name]
    assert_kill_and_resume_match(want, args, KILL_AT[name], RESULT_KEYS)


def test_simplecil_heads_are_the_unit_class_means_and_nothing_trains(straight):
    run = straight / "simplecil" / "seed-1993"
    stats, model = (load_file(str(run / "task-02" / f)) for f in ("stats.safetensors", "model.safetensors"))
    torch.testing.assert_close(model["task_heads.1.weight"], cosine_prototypes(stats["means"]).float())
    assert not model["task_heads.1.bias"].any()
    assert read_json(run / "metrics.json")["train_loss"] == [[], []]
    first = load_file(str(run / "task-01" / "model.safetensors"))
    assert all(torch.equal(first[k], model[k]) for k in first if k.startswith("backbone."))


def test_ranpac_stores_gram_and_class_sums_and_its_heads_are_the_ridge_solution(straight):
    run = straight / "ranpac" / "seed-1993"
    stats = load_file(str(run / "task-02" / "stats.safetensors"))
    model = load_file(str(run / "task-02" / "model.safetensors"))
    gram, targets, lambdas = stats["method.gram"], stats["method.targets"], stats["method.lambda"]
    assert gram.shape == (64, 64) and targets.shape == (64, 6) and lambdas.shape == (2,)
    assert torch.allclose(gram, gram.T) and float(lambdas[-1]) in RIDGE_GRID
    first = load_file(str(run / "task-01" / "stats.safetensors"))["method.gram"]
    assert bool((torch.linalg.eigvalsh((gram - first).double()) > -1e-3 * gram.abs().max()).all())  # added a PSD part
    heads = torch.cat([model["task_heads.0.weight"], model["task_heads.1.weight"]])
    torch.testing.assert_close(heads, ridge_weights(gram, targets, float(lambdas[-1])).T.float())
    assert model["backbone.head_input.weight"].shape[1] == 64


def test_ranpac_adaptation_trains_only_the_first_task(straight):
    losses = read_json(straight / "ranpac-adapt" / "seed-1993" / "metrics.json")["train_loss"]
    assert len(losses[0]) == 1 and losses[1] == []
    plain = load_file(str(straight / "ranpac" / "seed-1993" / "task-01" / "model.safetensors"))
    adapted = load_file(str(straight / "ranpac-adapt" / "seed-1993" / "task-01" / "model.safetensors"))
    assert not torch.equal(plain["backbone.blocks.0.mlp.fc1.weight"], adapted["backbone.blocks.0.mlp.fc1.weight"])


def test_report_has_a_row_per_variant_and_the_published_numbers(straight, tmp_path, cli):
    code, stdout, stderr = cli("report", *(straight / n for n in VARIANTS), "--out", tmp_path / "r", "--paper",
                               "--no-figures")
    assert code == 0, stderr
    for label in ("SimpleCIL", "RanPAC", "RanPAC (adapted)", "SLCA (closed-form, shrinkage)"):
        assert f"| {label} |" in stdout, label
    # Relabelled as Stanford Cars, the rows get the RanPAC paper's numbers (Table 1 / 2), and the note its source.
    import shutil
    for name in ("simplecil", "ranpac", "ranpac-adapt"):
        folder = tmp_path / "cars" / name / "seed-1993"
        shutil.copytree(straight / name / "seed-1993", folder)
        for file in ("config.json", "metrics.json"):
            data = read_json(folder / file)
            data.get("config", data).update(dataset="cars196")
            (folder / file).write_text(json.dumps(data))
    code, stdout, stderr = cli("report", tmp_path / "cars", "--out", tmp_path / "r2", "--paper", "--no-figures")
    assert code == 0, stderr
    rows = {line.split(" | ")[2]: line for line in stdout.splitlines() if line.startswith("| cars196")}
    assert rows["SimpleCIL"].endswith("| 37.70 | - |") and rows["RanPAC"].endswith("| 66.00 | - |")
    assert rows["RanPAC (adapted)"].endswith("| 77.50 | - |")
    assert "RanPAC paper (McDonnell et al., NeurIPS 2023" in stdout


@pytest.mark.parametrize("flag", [["--ranpac-dim", 32], ["--ranpac-adapt"]])
def test_resume_with_other_ranpac_settings_is_refused(straight, tmp_path, cli, flag):
    out = tmp_path / "copy"
    import shutil
    shutil.copytree(straight / "ranpac", out)
    code, _, stderr = cli("train", *TINY, *SMALL, "--method", "ranpac", "--ranpac-dim", 64, *flag, "--out", out,
                          "--resume")
    assert_one_line_error(code, stderr, "another experiment")


@pytest.mark.parametrize("flag,value", [("--covariance", "lw"), ("--align-mode", "exact"), ("--ranpac-dim", "0")])
def test_bad_new_settings_are_one_line_errors(cli, tmp_path, flag, value):
    code, _, stderr = cli("train", *TINY, *SMALL, flag, value, "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, flag)


def test_ranpac_refuses_classifier_alignment(cli, tmp_path):
    code, _, stderr = cli("train", *TINY, *SMALL, "--method", "ranpac", "--align", "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, "--align")


def test_demo_runs_the_chosen_methods(tmp_path, cli):
    code, stdout, stderr = cli("demo", "--backbone", "vit-tiny-test", "--epochs", 1, "--train-per-class", 4,
                               "--test-per-class", 2, "--device", "cpu", "--no-progress", "--out", tmp_path / "d",
                               "--method", "simplecil", "--method", "sl")
    assert code == 0, stderr
    table = stdout[stdout.index("method    Last-Acc"):]
    assert "SimpleCIL" in table and "SL " in table and "Seq FT" not in table
    assert not (tmp_path / "d" / "slca").exists()
    for method in ("simplecil", "sl"):
        assert read_json(tmp_path / "d" / method / "seed-1993" / "metrics.json")["tasks_done"] == 5


def test_ranpac_with_two_processes_sums_the_gram_matrix_of_one(tmp_path):
    flags = [*TINY, *SMALL, "--train-per-class", 7, "--batch-size", 4, "--method", "ranpac", "--ranpac-dim", 48]
    train_with_two_processes(flags, tmp_path / "two")
    from conftest import Cli
    code, _, stderr = Cli()("train", *flags, "--out", tmp_path / "one")
    assert code == 0, stderr
    for task in ("task-01", "task-02"):
        one, two = (load_file(str(tmp_path / r / "seed-1993" / task / "stats.safetensors")) for r in ("one", "two"))
        for key in ("method.gram", "method.targets"):
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-3)
        assert torch.equal(two["method.lambda"], one["method.lambda"])
    a, b = (read_json(tmp_path / r / "seed-1993" / "metrics.json") for r in ("one", "two"))
    assert a["counts"] == b["counts"]
