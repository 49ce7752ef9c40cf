"""Drift compensation of the stored class Gaussians (``--drift-compensation linear``).

The slow learner keeps moving the backbone, so the means and covariances stored for old classes describe features
the backbone no longer produces (on real CIFAR-100, recomputing them with the final backbone lifts SLCA's Last-Acc
from 43.75 to 49.25). Without old images the drift is estimated on the current task's images: their features before
and after stage 1, under the test transform and ``drift_views`` seeded train-transform views, give a ridge fit
``f_after ~ P f_before`` with ``P = I + Delta``; every stored Gaussian then moves to ``N(P mu, P Sigma P^T)``.
The idea is that of learnable drift compensation (Gomez-Villa et al., ECCV 2024), here in closed form.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch


def fit_linear_drift(before: torch.Tensor, after: torch.Tensor, ridge: float,
                     reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """``P = I + Delta`` minimizing ``||after - before P^T||^2 + lam ||Delta||^2`` over paired rows (N, D), with
    ``lam = ridge * tr(before^T before) / D`` (``ridge`` is relative to the mean eigenvalue, so it does not depend
    on the features' scale or count). Shrinks towards no drift where the current images span no direction.
    ``reduce`` sums the two D x D moments over processes (each holding its own rows)."""
    a, b = before.to(torch.float64), after.to(torch.float64)
    return linear_drift_from_sums(reduce(a.T @ a), reduce((b - a).T @ a), ridge)


def linear_drift_from_sums(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """``fit_linear_drift`` from the summed ``before^T before`` (D, D) and ``(after - before)^T before`` (D, D),
    which add up over batches and processes."""
    dim = gram.shape[0]
    lam = ridge * float(gram.diagonal().sum()) / dim
    regularized = gram + lam * torch.eye(dim, dtype=gram.dtype, device=gram.device)
    delta = torch.linalg.solve(regularized, cross.T).T  # Delta (G + lam I) = cross; G is symmetric
    return torch.eye(dim, dtype=gram.dtype, device=gram.device) + delta


def compensate(drift: torch.Tensor, means: Sequence[torch.Tensor], factors: Sequence[torch.Tensor]
               ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Each task's stored (C, D) means and (C, D, D) covariance factors L (Sigma = L L^T) moved by ``drift``:
    ``P mu`` and ``P L``, a square root of ``P Sigma P^T`` (the sampler and the LDA heads need no triangular one)."""
    p = drift.to(torch.float64)
    moved_means = [(m.to(torch.float64) @ p.T).to(m.dtype) for m in means]
    moved_factors = [torch.matmul(p, f.to(torch.float64)).to(f.dtype) for f in factors]
    return moved_means, moved_factors


def drift_loaders(loaders, classes: Sequence[int], views: int, seed: int) -> list:
    """The passes whose features are paired before and after stage 1: the statistics pass and ``views`` train
    passes, each drawn from its own seed alone (the same crops, flips and order both times, and under any number of
    processes: ``PassLoaders.train_views``)."""
    return [loaders.statistics(classes)] + [loaders.train_views(classes, seed * 100 + v) for v in range(views)]


def drift_features(model, passes, accelerator) -> List[torch.Tensor]:
    """This process's features of every pass, in the pass order (labels are not needed)."""
    from .learner import feature_batches
    return [torch.cat([features for features, _ in feature_batches(model, loader, accelerator, "", False)])
            for loader in passes]


def estimate_drift(before: List[torch.Tensor], after: List[torch.Tensor], ridge: float, reduce) -> torch.Tensor:
    """The drift map from paired per-process features of the passes; ``reduce`` sums a tensor over processes."""
    a, b = torch.cat(before), torch.cat(after)
    if a.shape != b.shape:
        raise RuntimeError(f"drift passes differ in size before and after stage 1 ({a.shape} vs {b.shape})")
    return fit_linear_drift(a, b, ridge, reduce)
