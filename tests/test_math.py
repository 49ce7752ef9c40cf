"""Statistics, logit normalization and sampling checked against numpy."""
import numpy as np
import torch

from slca_cli.alignment import class_tasks, mean_scale, normalize_logits, sample_features
from slca_cli.statistics import cholesky_factors
from slca_cli.metrics import forgetting, summarize
from slca_cli.statistics import ClassStatistics


def test_accumulator_equals_numpy_mean_and_unbiased_covariance():
    rng = np.random.default_rng(0)
    dim, counts = 6, [7, 1, 30, 2, 12]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    features = rng.normal(size=(len(labels), dim)) * 3 + rng.normal(size=dim)
    perm = rng.permutation(len(labels))
    labels, features = labels[perm], features[perm]
    acc = ClassStatistics(len(counts), dim)
    # Uneven batches: some classes are absent from some batches.
    for a, b in [(0, 5), (5, 6), (6, 30), (30, len(labels))]:
        acc.update(torch.tensor(features[a:b], dtype=torch.float32), torch.tensor(labels[a:b]))
    means, covs = acc.finalize(1e-4)
    for c, n in enumerate(counts):
        x = features[labels == c].astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(means[c].numpy(), x.mean(0), rtol=1e-10, atol=1e-10)
        expected = (np.cov(x, rowvar=False, ddof=1) if n > 1 else np.zeros((dim, dim))) + 1e-4 * np.eye(dim)
        np.testing.assert_allclose(covs[c].numpy(), expected, rtol=1e-9, atol=1e-10)
    assert acc.counts.tolist() == counts


def numpy_logit_norm(z, sizes, tau):
    norms, start = [], 0
    for size in sizes:
        norms.append(np.linalg.norm(z[:, start:start + size], axis=1) + 1e-7)
        start += size
    return z / (np.mean(norms, axis=0)[:, None] * tau)


def test_logit_normalization_equals_numpy():
    rng = np.random.default_rng(1)
    sizes = [3, 4, 2]
    z = rng.normal(size=(11, sum(sizes))) * 5
    ours = normalize_logits(torch.tensor(z), sizes, 0.1).numpy()
    np.testing.assert_allclose(ours, numpy_logit_norm(z, sizes, 0.1), rtol=1e-12)


def test_mean_scaling_formula_and_authors_task_ids():
    assert torch.allclose(mean_scale(torch.tensor([0, 1, 2]), 2),
                          torch.tensor([0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0], dtype=torch.float64))
    # Equal task sizes: the authors' c // task_size is the true task; unequal: it is not.
    assert class_tasks([2, 2, 2], "authors").tolist() == class_tasks([2, 2, 2], "task").tolist()
    assert class_tasks([4, 4, 2], "task").tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert class_tasks([4, 4, 2], "authors").tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_sampler_moments_converge_to_targets():
    gen = torch.Generator().manual_seed(0)
    dim = 4
    a = torch.randn(3, dim, dim, generator=gen, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.5 * torch.eye(dim, dtype=torch.float64)
    means = torch.randn(3, dim, generator=gen, dtype=torch.float64) * 4
    x, y = sample_features(means, cholesky_factors(covs), 40_000, gen, dtype=torch.float64)
    assert x.shape == (120_000, dim) and y.bincount().tolist() == [40_000] * 3
    for c in range(3):
        xc = x[y == c].numpy()
        np.testing.assert_allclose(xc.mean(0), means[c].numpy(), atol=0.06)
        np.testing.assert_allclose(np.cov(xc, rowvar=False), covs[c].numpy(), atol=0.12 * covs[c].abs().max().item())


def test_sampler_is_reproducible_from_the_seed():
    means, chol = torch.zeros(2, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    a = sample_features(means, chol, 5, torch.Generator().manual_seed(7))[0]
    b = sample_features(means, chol, 5, torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_metrics_summary():
    counts = [{"correct": [9], "total": [10]}, {"correct": [6, 8], "total": [10, 10]}]
    m = summarize(counts, 2)
    assert m["accuracy_matrix"] == [[90.0, None], [60.0, 80.0]]
    assert m["task_accuracy"] == [90.0, 70.0]
    assert m["last_acc"] == 70.0 and m["inc_acc"] == 80.0
    assert abs(m["forgetting"] - 30.0) < 1e-9
    assert m["old_accuracy"] == [None, 60.0] and m["new_accuracy"] == [90.0, 80.0]
    assert forgetting([[50.0]]) == 0.0


def test_tasks_without_test_images_are_no_score_not_zero():
    """`slca continue` without the old data: the old tasks have no test images after the new task."""
    counts = [{"correct": [9], "total": [10]}, {"correct": [6, 8], "total": [10, 10]},
              {"correct": [0, 0, 7], "total": [0, 0, 10]}]
    m = summarize(counts, 3)
    assert m["accuracy_matrix"][2] == [None, None, 70.0]
    assert m["old_accuracy"] == [None, 60.0, None] and m["task_accuracy"][2] == 70.0
    assert m["forgetting"] is None  # no old task is scored after the last one: not measurable (it was 75 %)
    assert forgetting([[90.0, None, None], [60.0, 80.0, None], [None, 50.0, 70.0]]) == 30.0  # task 1 left out
