"""The vectorized Gaussian sampler and the stacked-head alignment."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from slca_cli.alignment import (AlignmentRecipe, align_classifier, class_tasks, mean_scale, normalize_logits, sample_features,
                                task_membership)
from slca_cli.statistics import cholesky_factors


def random_gaussians(num_classes, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(num_classes, dim, dim, generator=gen, dtype=torch.float64) / dim ** 0.5
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(dim, dtype=torch.float64)
    means = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 3
    return means, covs


def test_float32_samples_of_many_classes_converge_to_each_class_mean_and_covariance():
    means, covs = random_gaussians(5, 6, seed=0)
    x, y = sample_features(means, cholesky_factors(covs), 30_000, torch.Generator().manual_seed(1))
    assert x.dtype == torch.float32 and x.shape == (150_000, 6)
    assert torch.equal(y.bincount(), torch.full((5,), 30_000))
    for c in range(5):
        xc = x[y == c].double()
        err_mean = (xc.mean(0) - means[c]).abs().max() / covs[c].diagonal().sqrt().max()
        err_cov = (torch.cov(xc.T) - covs[c]).abs().max() / covs[c].abs().max()
        assert err_mean < 0.03 and err_cov < 0.05, (c, err_mean, err_cov)


def test_samples_depend_only_on_the_seed():
    means, covs = random_gaussians(3, 4, seed=2)
    chol = cholesky_factors(covs)
    a = sample_features(means, chol, 7, torch.Generator().manual_seed(5))
    b = sample_features(means, chol, 7, torch.Generator().manual_seed(5))
    c = sample_features(means, chol, 7, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def per_head_alignment(heads, means, chol, sizes, *, epochs, per_class, batch, lr, tau, generator):
    """The straightforward version: logits of each head concatenated, per-head parameters, same random draws."""
    params = [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaled = (means * mean_scale(class_tasks(sizes, "task"), len(sizes) - 1)[:, None]).float()
    for _ in range(epochs):
        x, y = sample_features(scaled, chol.float(), per_class, generator)
        order = torch.randperm(len(y), generator=generator)
        x, y = x[order], y[order]
        for start in range(0, len(y), batch):
            logits = torch.cat([h(x[start:start + batch]) for h in heads], dim=1)
            loss = F.cross_entropy(normalize_logits(logits, sizes, tau), y[start:start + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()


def test_stacked_head_alignment_is_the_same_optimization_as_per_head_training():
    sizes = [3, 2, 4]
    dim = 8
    means, covs = random_gaussians(sum(sizes), dim, seed=3)
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(dim, n) for n in sizes])
    reference = copy.deepcopy(heads)
    kwargs = dict(epochs=3, per_class=20, batch=16, lr=0.05, tau=0.1)
    chol = cholesky_factors(covs)
    align_classifier(heads, means, chol, sizes, AlignmentRecipe(epochs=3, samples_per_class=20, batch_size=16,
                                                                 lr=0.05, tau=0.1),
                     generator=torch.Generator().manual_seed(9))
    per_head_alignment(reference, means, chol, sizes, generator=torch.Generator().manual_seed(9), **kwargs)
    for ours, ref in zip(heads, reference):
        torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-5, atol=1e-6)


def test_task_membership_marks_each_task_block():
    m = task_membership([2, 1, 3])
    assert m.shape == (6, 3) and m.sum(0).tolist() == [2, 1, 3] and m.sum(1).tolist() == [1] * 6


def test_closed_form_alignment_gradient_equals_autograd():
    from slca_cli.alignment import alignment_loss_and_grad
    sizes = [3, 5, 2]
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(17, sum(sizes), generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    labels = torch.randint(0, sum(sizes), (17,), generator=gen)
    for membership in (task_membership(sizes).double(), None):
        z = logits if membership is None else normalize_logits(logits, sizes, 0.1)
        expected_loss = F.cross_entropy(z, labels)
        (expected_grad,) = torch.autograd.grad(expected_loss, logits)
        loss, grad = alignment_loss_and_grad(logits.detach(), labels, membership, 0.1)
        torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
