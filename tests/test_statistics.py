"""The fused class-statistics accumulator against torch.cov, under any batching and any split across processes."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slca_cli.statistics import ClassStatistics, cholesky_factors

RIDGE = 1e-4


def random_classes(counts, dim, seed):
    """Features of classes with the given sample counts (0 = absent), shuffled together, float64."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    centres = torch.randn(len(counts), dim, generator=gen, dtype=torch.float64) * 5
    scales = torch.rand(len(counts), dim, generator=gen, dtype=torch.float64) + 0.1
    features = centres[labels] + torch.randn(len(labels), dim, generator=gen, dtype=torch.float64) * scales[labels]
    perm = torch.randperm(len(labels), generator=gen)
    return features[perm], labels[perm]


def reference(features, labels, num_classes):
    """Mean and torch.cov (unbiased) + ridge per class, computed from all of a class's features at once."""
    dim = features.shape[1]
    means, covs = [], []
    for c in range(num_classes):
        x = features[labels == c]
        means.append(x.mean(0))
        cov = torch.cov(x.T, correction=1) if len(x) > 1 else torch.zeros(dim, dim, dtype=torch.float64)
        covs.append(cov + RIDGE * torch.eye(dim, dtype=torch.float64))
    return torch.stack(means), torch.stack(covs)


def accumulate(features, labels, num_classes, cuts, buffer_rows=2048):
    acc = ClassStatistics(num_classes, features.shape[1], buffer_rows=buffer_rows)
    bounds = [0, *cuts, len(labels)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(features[a:b], labels[a:b])
    return acc


def assert_close_relative(ours, ref, tol):
    err = ((ours - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()
    assert err < tol, err


def test_accumulator_equals_torch_cov_with_uneven_classes_absent_from_batches():
    counts = [40, 1, 3, 17, 90, 2]
    features, labels = random_classes(counts, dim=12, seed=0)
    # Batches of very different sizes; with 6 classes and batches of 1-5 items most classes miss most batches.
    ref_means, ref_covs = reference(features, labels, len(counts))
    # A staging buffer smaller than some batches, one that flushes every few rows, and the default.
    for buffer_rows in (7, 40, 2048):
        acc = accumulate(features, labels, len(counts), cuts=[1, 3, 8, 9, 14, 60, 61, 100], buffer_rows=buffer_rows)
        means, covs = acc.finalize(RIDGE)
        assert acc.counts.tolist() == counts
        assert_close_relative(means, ref_means, 1e-12)
        assert_close_relative(covs, ref_covs, 1e-10)
        assert torch.equal(covs, covs.transpose(1, 2))


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=5),
       cut_fractions=st.lists(st.floats(0, 1), max_size=6), seed=st.integers(0, 10_000),
       buffer_rows=st.integers(1, 30))
def test_any_batching_gives_the_statistics_of_one_batch(counts, cut_fractions, seed, buffer_rows):
    features, labels = random_classes(counts, dim=5, seed=seed)
    cuts = sorted({int(f * len(labels)) for f in cut_fractions})
    one = accumulate(features, labels, len(counts), cuts=[])
    many = accumulate(features, labels, len(counts), cuts=cuts, buffer_rows=buffer_rows)
    for a, b in zip(one.finalize(RIDGE), many.finalize(RIDGE)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ref_means, ref_covs = reference(features, labels, len(counts))
    torch.testing.assert_close(many.finalize(RIDGE)[1], ref_covs, rtol=1e-9, atol=1e-9)


def test_strided_shards_summed_like_an_all_reduce_equal_one_process():
    """What a multi-process run does: each process accumulates items rank::world, then the sums are added."""
    counts = [7, 1, 12, 5]
    features, labels = random_classes(counts, dim=8, seed=3)
    whole = accumulate(features, labels, len(counts), cuts=[4, 9])
    world = 3
    shards = [accumulate(features[r::world], labels[r::world], len(counts), cuts=[2]) for r in range(world)]

    # all_reduce reduces counts, sums and outer in that order; the "processes" here are the shards.
    partials = iter([sum(getattr(s, name) for s in shards) for name in ("counts", "sums", "outer")])
    merged = shards[0]
    merged.all_reduce(lambda local: next(partials))
    for a, b in zip(whole.finalize(RIDGE), merged.finalize(RIDGE)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    chained = accumulate(features[0::world], labels[0::world], len(counts), cuts=[])
    for r in range(1, world):
        chained.merge(accumulate(features[r::world], labels[r::world], len(counts), cuts=[]))
    torch.testing.assert_close(chained.finalize(RIDGE)[1], whole.finalize(RIDGE)[1], rtol=1e-12, atol=1e-12)


def test_all_reduce_applies_the_reduction_to_every_sum():
    acc = accumulate(*random_classes([3, 4], dim=4, seed=1), num_classes=2, cuts=[])
    before = (acc.counts.clone(), acc.sums.clone(), acc.outer.clone())
    acc.all_reduce(lambda t: 2 * t)  # two identical processes
    for b, a in zip(before, (acc.counts, acc.sums, acc.outer)):
        assert torch.equal(a, 2 * b)


def test_a_class_without_samples_is_an_error():
    acc = ClassStatistics(3, 4)
    acc.update(torch.randn(5, 4), torch.tensor([0, 0, 2, 2, 2]))
    try:
        acc.finalize()
    except ValueError as exc:
        assert "[1]" in str(exc)
    else:
        raise AssertionError("finalize accepted a class with no samples")


def test_cholesky_factors_are_batched_and_reproduce_the_covariances():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    covs = a @ a.transpose(1, 2)  # rank 3 of 6: singular
    covs[0] += torch.eye(6, dtype=torch.float64)  # one positive definite
    chol = cholesky_factors(covs)
    assert torch.equal(chol, torch.tril(chol))
    torch.testing.assert_close(chol[0] @ chol[0].T, covs[0])  # no jitter where none is needed
    torch.testing.assert_close(chol @ chol.transpose(1, 2), covs, atol=1e-4, rtol=0)  # jitter only as needed
    assert torch.isfinite(chol).all()


def test_balanced_and_very_unbalanced_buffers_both_match_torch_cov():
    """Balanced classes are packed one block per class (added in place), a dominant class is cut into segments."""
    for counts in ([50, 50, 49], [300, 1, 2], [0, 120, 3, 0]):
        present = [n for n in counts if n]
        features, labels = random_classes(present, dim=6, seed=len(counts))
        classes = [c for c, n in enumerate(counts) if n]
        labels = torch.tensor(classes)[labels]
        acc = accumulate(features, labels, len(counts), cuts=[], buffer_rows=1024)
        outer = acc.outer
        for c, n in enumerate(counts):
            x = features[labels == c]
            expected = x.T @ x if n else torch.zeros(6, 6, dtype=torch.float64)
            torch.testing.assert_close(outer[c], expected, rtol=1e-12, atol=1e-10)
