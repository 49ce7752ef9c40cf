"""Classifier alignment: vectorized Gaussian sampling of class features and logit-normalized head training."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .statistics import cholesky_factors  # noqa: F401  (re-exported: the sampler's factorization)


def task_membership(task_sizes: Sequence[int], device=None) -> torch.Tensor:
    """(num_classes, num_tasks) one-hot matrix: column t marks the classes of task t."""
    task_of = torch.repeat_interleave(torch.arange(len(task_sizes), device=device),
                                      torch.tensor(list(task_sizes), device=device))
    return F.one_hot(task_of, len(task_sizes)).to(torch.float32)


def normalize_logits(logits: torch.Tensor, task_sizes: Sequence[int], tau: float,
                     membership: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Divide each row by tau times the mean over tasks of ``||z[classes of t]||_2 + 1e-7``.

    ``membership`` (``task_membership(task_sizes)``) may be passed in to avoid rebuilding it every batch.
    """
    if membership is None:
        membership = task_membership(task_sizes, logits.device)
    membership = membership.to(logits.dtype)
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


def sample_features(means: torch.Tensor, chol: torch.Tensor, per_class: int,
                    generator: Optional[torch.Generator] = None, dtype=torch.float32):
    """``per_class`` draws from N(mean_c, L_c L_c^T) for every class at once: (C*S, D) features, (C*S,) labels.

    One batched matmul of (C, S, D) standard normal noise with the (C, D, D) lower-triangular factors, computed
    in ``dtype`` (float32 by default, float64 on request) on the device of ``means``; the noise comes from
    ``generator``, so the samples are reproducible from its seed.
    """
    num_classes, dim = means.shape
    noise = torch.randn(num_classes, per_class, dim, generator=generator, device=means.device, dtype=dtype)
    samples = torch.baddbmm(rearrange(means.to(dtype), "c d -> c 1 d"), noise,
                            chol.to(device=means.device, dtype=dtype).transpose(1, 2))
    labels = repeat(torch.arange(num_classes, device=means.device), "c -> (c s)", s=per_class)
    return rearrange(samples, "c s d -> (c s) d"), labels


def align_classifier(heads: nn.ModuleList, means: torch.Tensor, covs: Optional[torch.Tensor],
                     task_sizes: Sequence[int], *, epochs: int = 5, samples_per_class: int = 256,
                     batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                     tau: float = 0.1, logit_norm: bool = True, mean_scaling: str = "task",
                     generator: Optional[torch.Generator] = None,
                     progress: Optional[Callable[[int, float], None]] = None,
                     chol: Optional[torch.Tensor] = None) -> None:
    """Train every head on features sampled from the class Gaussians (spec section 5), in place.

    ``means`` and ``chol`` (the Cholesky factors cached with the statistics; computed from ``covs`` when not
    given) cover all seen classes in class-order position; the last task in ``task_sizes`` is the current one.
    The heads are trained as one stacked (classes x D) weight and bias: plain SGD is elementwise, so this is
    the same optimization as per-head parameters, with one matmul per batch instead of one per head.
    """
    device = heads[0].weight.device
    means = means.to(device=device, dtype=torch.float64)
    if mean_scaling != "off":
        scale = mean_scale(class_tasks(task_sizes, mean_scaling), len(task_sizes) - 1).to(device)
        means = means * scale[:, None]
    if chol is None:
        chol = cholesky_factors(covs.to(device))
    chol = chol.to(device=device, dtype=torch.float32)
    means = means.to(torch.float32)
    weight = torch.cat([h.weight.detach() for h in heads]).float().clone().requires_grad_(True)
    bias = torch.cat([h.bias.detach() for h in heads]).float().clone().requires_grad_(True)
    membership = task_membership(task_sizes, device)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    rng_device = generator.device if generator is not None else device
    for epoch in range(epochs):
        features, labels = sample_features(means, chol, samples_per_class, generator)
        order = torch.randperm(len(labels), generator=generator, device=rng_device).to(device)
        features, labels = features[order], labels[order]
        total = torch.zeros((), device=device)
        for start in range(0, len(labels), batch_size):
            x, y = features[start:start + batch_size], labels[start:start + batch_size]
            logits = torch.addmm(bias, x, weight.t())
            if logit_norm:
                logits = normalize_logits(logits, task_sizes, tau, membership)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(y)
        schedule.step()
        if progress is not None:
            progress(epoch, float(total) / max(len(labels), 1))
    with torch.no_grad():
        sizes = [h.out_features for h in heads]
        for head, w, b in zip(heads, weight.split(sizes), bias.split(sizes)):
            head.weight.copy_(w)
            head.bias.copy_(b)
