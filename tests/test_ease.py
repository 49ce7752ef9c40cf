"""EASE (methods/ease.py): the prototype completion and the reweighted cosine classifier against hand-computed
numpy; through the whole CLI: train, `slca eval`, SIGKILL inside task 2 + --resume (equal to a straight run),
`slca report --paper`, `slca export`, two processes; bad flags, `slca continue` in one line (`slca predict`:
tests/test_predict.py; a non-ViT backbone: tests/test_methods.py)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, assert_one_line_error, read_json
from procs import Running, assert_kill_and_resume_match, train_with_two_processes

from slca_cli.methods.ease import (SubspaceNorm, class_tasks, complete_prototypes, prototype_heads,
                                   subspace_weights)

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 6, "--train-per-class", 8, "--test-per-class", 6,
         "--batch-size", 8]
EASE = ["--method", "ease", "--adapter-bottleneck", 8]
RESULT_KEYS = ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc", "counts", "train_loss")


# ---- math ----

def numpy_completion(protos, tasks, current):
    """The authors' recipe written out with loops: for every old task i and later subspace j, old class c gets
    sum_k softmax_k(cos(p_c^i, p_k^i)) p_k^j over the classes k of tasks j..current."""
    out = protos.copy()
    for i in range(current):
        for j in range(i + 1, current + 1):
            anchors = [k for k in range(len(tasks)) if j <= tasks[k] <= current]
            for c in [c for c in range(len(tasks)) if tasks[c] == i]:
                a = protos[c, i]
                sims = np.array([a @ protos[k, i] / np.linalg.norm(a) / np.linalg.norm(protos[k, i])
                                 for k in anchors])
                soft = np.exp(sims) / np.exp(sims).sum()
                out[c, j] = sum(s * protos[k, j] for s, k in zip(soft, anchors))
    return out


def test_prototype_completion_matches_the_hand_computed_one():
    rng = np.random.default_rng(0)
    sizes = [2, 3, 2]
    tasks = class_tasks(sizes)
    assert tasks.tolist() == [0, 0, 1, 1, 1, 2, 2]
    protos = rng.normal(size=(7, 3, 5))
    for c, t in enumerate(tasks.tolist()):
        protos[c, t + 1:] = 0  # not measured: the adapter came after the class
    for current in (1, 2):
        seen = tasks <= current
        got = complete_prototypes(torch.tensor(protos[seen.numpy()]), tasks[seen], current)
        want = numpy_completion(protos[seen.numpy()], tasks[seen].tolist(), current)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
        assert not np.allclose(got.numpy()[0, current], 0)  # every old class has a prototype everywhere
    # measured prototypes are never changed
    full = complete_prototypes(torch.tensor(protos), tasks, 2).numpy()
    for c, t in enumerate(tasks.tolist()):
        np.testing.assert_array_equal(full[c, :t + 1], protos[c, :t + 1])


def test_a_head_on_normalized_subspaces_scores_the_reweighted_sum_of_cosines():
    rng = np.random.default_rng(1)
    sizes, current, alpha, dim = [2, 2, 1], 2, 0.1, 4
    tasks = class_tasks(sizes)
    protos = rng.normal(size=(5, 3, dim))
    weights = subspace_weights(tasks, current, 3, alpha)
    want_w = np.array([[1 if j == t else alpha / current for j in range(3)] for t in tasks.tolist()])
    np.testing.assert_allclose(weights.numpy(), want_w)
    np.testing.assert_array_equal(subspace_weights(tasks[:2], 0, 3, alpha).numpy(), [[1, 0, 0], [1, 0, 0]])
    heads = prototype_heads(torch.tensor(protos), weights)
    x = rng.normal(size=(3, 3 * dim))
    logits = (SubspaceNorm(dim, 3)(torch.tensor(x)) @ heads.t()).numpy()
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    want = np.array([[sum(want_w[c, j] * cos(x[n, j * dim:(j + 1) * dim], protos[c, j]) for j in range(3))
                      for c in range(5)] for n in range(3)])
    np.testing.assert_allclose(logits, want, rtol=1e-10)
    zero = SubspaceNorm(dim, 3)(torch.zeros(1, 3 * dim))
    assert torch.equal(zero, torch.zeros_like(zero))  # an untrained subspace contributes nothing


def test_means_only_statistics_equal_the_full_ones_and_keep_no_covariance():
    from slca_cli.statistics import ClassStatistics
    x, labels = torch.randn(20, 6, dtype=torch.float64), torch.arange(20) % 3
    full, means_only = ClassStatistics(3, 6), ClassStatistics(3, 6, covariances=False)
    for acc in (full, means_only):
        acc.update(x[:7], labels[:7])
        acc.update(x[7:], labels[7:])
    (want, _), (got, covs) = full.finalize(), means_only.finalize()
    torch.testing.assert_close(got, want)
    assert covs.shape == (3, 0, 0)


# ---- whole CLI ----

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("ease")
    run = Running(["train", *TINY, *SMALL, *EASE, "--out", root / "run"])
    assert run.finish() == 0, "\n".join(run.lines[-20:])
    return root / "run" / "seed-1993"


def test_ease_trains_evaluates_and_resumes_after_a_kill(straight, tmp_path, cli):
    metrics = read_json(straight / "metrics.json")
    assert len(metrics["task_accuracy"]) == 2 and all(0 <= a <= 100 for a in metrics["task_accuracy"])
    assert [len(x) for x in metrics["train_loss"]] == [1, 1]  # every task trains its adapter
    code, stdout, stderr = cli("eval", straight / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["matches_stored"] is True
    args = ["train", *TINY, *SMALL, *EASE, "--out", tmp_path / "run"]
    assert_kill_and_resume_match(straight, args, "fit task=2 epoch=1 batch=2", RESULT_KEYS)


def test_each_task_trains_only_its_own_adapter_and_heads_are_the_completed_prototypes(straight):
    first, second = (load_file(str(straight / f"task-0{t}" / "model.safetensors")) for t in (1, 2))
    adapter = lambda k: ".adapters." in k  # noqa: E731
    pretrained = [k for k in first if k.startswith("backbone.") and not adapter(k) and k != "backbone.task"]
    assert pretrained and all(torch.equal(first[k], second[k]) for k in pretrained)
    own = [k for k in first if ".adapters.0.up." in k]
    assert own and any(float(first[k].abs().max()) > 0 for k in own)  # adapter 1 trained in task 1
    later = [k for k in first if ".adapters.1.up." in k]
    assert all(float(first[k].abs().max()) == 0 for k in later)  # adapter 2 still fresh after task 1
    assert all(torch.equal(first[k], second[k]) for k in first if ".adapters.0." in k)  # frozen in task 2
    assert any(not torch.equal(first[k], second[k]) for k in later)
    assert int(second["backbone.task"]) == 1
    stats1, stats2 = (load_file(str(straight / f"task-0{t}" / "stats.safetensors")) for t in (1, 2))
    assert stats2["chol"].shape == (3, 0, 0) and stats2["means"].shape == (3, 2 * 64)  # means only
    protos = stats2["method.prototypes"]
    assert protos.shape == (6, 2, 64)
    torch.testing.assert_close(protos[3:].flatten(1), stats2["means"].float())  # the new classes' means
    torch.testing.assert_close(protos[:3], stats1["method.prototypes"])  # old ones kept as measured
    tasks = class_tasks([3, 3])
    want = prototype_heads(complete_prototypes(protos.double(), tasks, 1), subspace_weights(tasks, 1, 2, 0.1))
    heads = torch.cat([second["task_heads.0.weight"], second["task_heads.1.weight"]])
    torch.testing.assert_close(heads, want.float())
    assert read_json(straight / "config.json")["config"]["fresh_norm"] is False


def test_report_lists_ease_without_unverified_numbers(straight, tmp_path, cli):
    folder = tmp_path / "cifar" / "ease" / "seed-1993"
    shutil.copytree(straight, folder)
    for file in ("config.json", "metrics.json"):
        data = read_json(folder / file)
        data.get("config", data).update(dataset="cifar100")
        (folder / file).write_text(json.dumps(data))
    code, stdout, stderr = cli("report", tmp_path / "cifar", "--out", tmp_path / "r", "--paper", "--no-figures")
    assert code == 0, stderr
    rows = [line for line in stdout.splitlines() if line.startswith("| cifar100") and "| EASE |" in line]
    assert len(rows) == 1, stdout


def test_export_asks_for_onnx_in_one_line(straight, tmp_path, cli):
    code, _, stderr = cli("export", straight / "task-02", "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, "--method ease is not a plain timm model", "--format onnx")


def test_ease_runs_with_two_processes(tmp_path, cli):
    """Each test image counted once over both processes, and the folder scores as stored with one process."""
    flags = [*TINY, *SMALL, "--train-per-class", 7, "--batch-size", 4, *EASE]
    train_with_two_processes(flags, tmp_path / "two")
    run = tmp_path / "two" / "seed-1993"
    assert [c["total"] for c in read_json(run / "metrics.json")["counts"]] == [[18], [18, 18]]
    code, stdout, stderr = cli("eval", run / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["matches_stored"] is True, stderr


@pytest.mark.parametrize("flags,fragment", [
    (["--adapter-bottleneck", "0"], "--adapter-bottleneck"),
    (["--ease-alpha", "-1"], "--ease-alpha"),
    (["--align"], "--align"),
])
def test_bad_ease_flags_are_one_line_errors(cli, tmp_path, flags, fragment):
    code, _, stderr = cli("train", *TINY, *SMALL, "--method", "ease", *flags, "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "x").exists()


def test_an_ease_run_cannot_be_continued():
    from slca_cli.errors import SlcaError
    from slca_cli.grow import grown_config
    from slca_cli.presets import DEFAULTS, RunConfig
    cfg = RunConfig(**dict(DEFAULTS, dataset="folder", backbone="vit-tiny-test", method="ease", num_classes=4,
                           task_sizes=(2, 2)))
    with pytest.raises(SlcaError, match="cannot be continued"):
        grown_config(cfg, 2, {})
