"""Classifier alignment: vectorized Gaussian sampling of class features and logit-normalized head training."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn


def task_membership(task_sizes: Sequence[int], device=None) -> torch.Tensor:
    """(num_classes, num_tasks) one-hot matrix: column t marks the classes of task t."""
    task_of = torch.repeat_interleave(torch.arange(len(task_sizes), device=device),
                                      torch.tensor(list(task_sizes), device=device))
    return F.one_hot(task_of, len(task_sizes)).to(torch.float32)


def normalize_logits(logits: torch.Tensor, task_sizes: Sequence[int], tau: float) -> torch.Tensor:
    """Divide each row by tau times the mean over tasks of ``||z[classes of t]||_2 + 1e-7``."""
    membership = task_membership(task_sizes, logits.device).to(logits.dtype)
    per_task_norm = torch.sqrt(logits.pow(2) @ membership) + 1e-7
    return logits / (per_task_norm.mean(dim=1, keepdim=True) * tau)


def mean_scale(class_task: torch.Tensor, current_task: int) -> torch.Tensor:
    """The authors' shrinking of old class means: ``0.9 + 0.1 (t_c + 1) / (T + 1)`` (1 for the current task)."""
    return 0.9 + 0.1 * (class_task.to(torch.float64) + 1) / (current_task + 1)


def class_tasks(task_sizes: Sequence[int], mode: str) -> torch.Tensor:
    """Task index of every seen class: the true one (``task``) or the authors' ``c // current_task_size``."""
    if mode == "authors":
        return torch.arange(sum(task_sizes)) // task_sizes[-1]
    return torch.repeat_interleave(torch.arange(len(task_sizes)), torch.tensor(list(task_sizes)))


def cholesky_factors(covs: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch of covariances, in float64, adding jitter only where needed."""
    covs = covs.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(covs)
    jitter = 1e-6
    while bool((info > 0).any()) and jitter < 1.0:
        eye = torch.eye(covs.shape[-1], dtype=covs.dtype, device=covs.device)
        factor, info = torch.linalg.cholesky_ex(covs + jitter * eye)
        jitter *= 10
    return factor


def sample_features(means: torch.Tensor, chol: torch.Tensor, per_class: int,
                    generator: Optional[torch.Generator] = None, dtype=torch.float32):
    """``per_class`` draws from N(mean_c, L_c L_c^T) for every class at once: (C*S, D) features, (C*S,) labels."""
    num_classes, dim = means.shape
    noise = torch.randn(num_classes, per_class, dim, generator=generator, device=means.device, dtype=chol.dtype)
    samples = rearrange(means.to(chol.dtype), "c d -> c 1 d") + noise @ chol.transpose(1, 2)
    labels = repeat(torch.arange(num_classes, device=means.device), "c -> (c s)", s=per_class)
    return rearrange(samples, "c s d -> (c s) d").to(dtype), labels


def align_classifier(heads: nn.ModuleList, means: torch.Tensor, covs: torch.Tensor, task_sizes: Sequence[int], *,
                     epochs: int = 5, samples_per_class: int = 256, batch_size: int = 256, lr: float = 0.01,
                     momentum: float = 0.9, weight_decay: float = 5e-4, tau: float = 0.1, logit_norm: bool = True,
                     mean_scaling: str = "task", generator: Optional[torch.Generator] = None,
                     progress: Optional[Callable[[int, float], None]] = None,
                     sample_transform: Optional[Callable] = None) -> None:
    """Train every head on features sampled from the class Gaussians (spec section 5), in place.

    ``means``/``covs`` cover all seen classes in class-order position; the last task in ``task_sizes`` is current.
    ``sample_transform(features, labels, generator)`` changes each epoch's samples (SLCA++ shrinks old classes).
    """
    device = heads[0].weight.device
    means = means.to(device=device, dtype=torch.float64)
    if mean_scaling != "off":
        scale = mean_scale(class_tasks(task_sizes, mean_scaling), len(task_sizes) - 1).to(device)
        means = means * scale[:, None]
    chol = cholesky_factors(covs.to(device))
    params = [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    for epoch in range(epochs):
        features, labels = sample_features(means, chol, samples_per_class, generator)
        if sample_transform is not None:
            features = sample_transform(features, labels, generator)
        order = torch.randperm(len(labels), generator=generator, device=generator.device if generator else None)
        order = order.to(device)
        features, labels = features[order], labels[order]
        total = 0.0
        for start in range(0, len(labels), batch_size):
            x, y = features[start:start + batch_size], labels[start:start + batch_size]
            logits = torch.cat([h(x) for h in heads], dim=1)
            if logit_norm:
                logits = normalize_logits(logits, task_sizes, tau)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
        schedule.step()
        if progress is not None:
            progress(epoch, total / max(len(labels), 1))
