"""Classifiers computed, not trained: covariance shrinkage (OAS), LDA heads from stored class Gaussians, cosine
prototypes and ridge regression with a held-out choice of lambda (SimpleCIL, RanPAC, ``--align-mode closed-form``)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

# RanPAC's grid for the ridge lambda (McDonnell et al., NeurIPS 2023): 10^-8 ... 10^13.
RIDGE_GRID = tuple(10.0 ** e for e in range(-8, 14))


def oas_shrinkage(cov_mle: torch.Tensor, n: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Oracle Approximating Shrinkage (Chen et al. 2010, as scikit-learn's ``OAS``) of a batch of maximum-likelihood
    covariances (..., D, D) from ``n`` samples each: ``(1 - rho) S + rho tr(S)/D I``. Returns (shrunk, rho).

    Needs only S and n, so it works from the accumulated sums (Ledoit-Wolf would need fourth moments)."""
    d = cov_mle.shape[-1]
    n = torch.as_tensor(n, dtype=cov_mle.dtype, device=cov_mle.device)
    mu = cov_mle.diagonal(dim1=-2, dim2=-1).sum(-1) / d
    alpha = (cov_mle * cov_mle).sum((-2, -1)) / d ** 2
    num = alpha + mu ** 2
    den = (n + 1) * (alpha - mu ** 2 / d)
    rho = torch.where(den == 0, torch.ones_like(num), torch.clamp(num / torch.where(den == 0, 1, den), max=1.0))
    shrunk = (1 - rho)[..., None, None] * cov_mle
    shrunk.diagonal(dim1=-2, dim2=-1).add_((rho * mu)[..., None])
    return shrunk, rho


def shrink_class_covariances(covs: torch.Tensor, counts: torch.Tensor, ridge: float) -> torch.Tensor:
    """``--covariance shrinkage``: unbiased class covariances (C, D, D) without ridge -> OAS-shrunk (of the MLE,
    as OAS is defined), back on the unbiased scale, plus ``ridge * I``."""
    counts = counts.to(covs.dtype)
    to_mle = ((counts - 1).clamp(min=0) / counts)[:, None, None]
    shrunk, _ = oas_shrinkage(covs * to_mle, counts)
    shrunk = shrunk / to_mle.clamp(min=torch.finfo(covs.dtype).tiny)
    shrunk.diagonal(dim1=1, dim2=2).add_(ridge)
    return shrunk


def lda_classifier(means: torch.Tensor, covs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant heads from class means (C, D) and covariances (C, D, D): the pooled covariance S (their
    mean), ``W = mu S^-1``, ``b = -mu S^-1 mu / 2`` (equal priors). Float64."""
    means = means.to(torch.float64)
    pooled = covs.to(torch.float64).mean(dim=0)
    pooled = (pooled + pooled.T) / 2
    weight = torch.linalg.solve(pooled, means.T).T
    bias = -0.5 * (weight * means).sum(dim=1)
    return weight, bias


def align_closed_form(heads, means: torch.Tensor, chol: torch.Tensor) -> None:
    """``--align-mode closed-form``: set the stacked heads to the LDA classifier of the stored Gaussians (class
    means, Cholesky factors of the covariances), in place; the sampling settings (epochs, lr, tau, mean scaling)
    do not apply."""
    chol = chol.to(torch.float64)
    weight, bias = lda_classifier(means, chol @ chol.transpose(1, 2))
    with torch.no_grad():
        sizes = [h.out_features for h in heads]
        for head, w, b in zip(heads, weight.split(sizes), bias.split(sizes)):
            head.weight.copy_(w)
            head.bias.copy_(b)


def cosine_prototypes(means: torch.Tensor) -> torch.Tensor:
    """SimpleCIL's classifier: unit-norm class means. A linear head with these weights and no bias ranks the
    classes as cosine similarity does (the feature's own norm is the same for every class)."""
    return means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)


def ridge_weights(gram: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """``(G + lam I)^-1 C`` in float64: the ridge regression from features to one-hot targets. Cholesky; LU where a
    tiny lambda leaves the (float32-rounded) Gram matrix numerically indefinite."""
    g = gram.to(torch.float64).clone()
    g.diagonal().add_(lam)
    targets = targets.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        return torch.linalg.solve(g, targets)
    return torch.cholesky_solve(targets, factor)


def ridge_validation_errors(h_fit: torch.Tensor, y_fit: torch.Tensor, h_val: torch.Tensor, y_val: torch.Tensor,
                            lambdas: Sequence[float] = RIDGE_GRID) -> torch.Tensor:
    """Mean squared error on (h_val, y_val) of the ridge fit to (h_fit, y_fit), for every lambda: one
    eigendecomposition, in the dual (n x n) form when there are fewer samples than features, else the primal."""
    h_fit, y_fit, h_val, y_val = (t.to(torch.float64) for t in (h_fit, y_fit, h_val, y_val))
    lam = torch.tensor(list(lambdas), dtype=torch.float64, device=h_fit.device)
    if len(h_fit) <= h_fit.shape[1]:  # W = H^T (H H^T + lam I)^-1 Y
        evals, evecs = torch.linalg.eigh(h_fit @ h_fit.T)
        left, right = (h_val @ h_fit.T) @ evecs, evecs.T @ y_fit
    else:  # W = (H^T H + lam I)^-1 H^T Y
        evals, evecs = torch.linalg.eigh(h_fit.T @ h_fit)
        left, right = h_val @ evecs, evecs.T @ (h_fit.T @ y_fit)
    evals = evals.clamp(min=0)
    errors = []
    for value in lam:
        pred = left @ (right / (evals + value)[:, None])
        errors.append(((pred - y_val) ** 2).mean())
    return torch.stack(errors)


def select_ridge(h_fit, y_fit, h_val, y_val, lambdas: Sequence[float] = RIDGE_GRID) -> float:
    """The lambda of ``lambdas`` with the lowest held-out error (the smallest one on ties)."""
    errors = ridge_validation_errors(h_fit, y_fit, h_val, y_val, lambdas)
    return float(lambdas[int(torch.argmin(errors))])
