"""Classifier alignment: vectorized Gaussian sampling of class features and logit-normalized head training."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .closed_form import align_closed_form
from .presets import DEFAULTS
from .protocol import task_of_class



def task_membership(task_sizes: Sequence[int], device=None) -> torch.Tensor:
    """(num_classes, num_tasks) one-hot matrix: column t marks the classes of task t."""
    return F.one_hot(task_of_class(task_sizes).to(device), len(task_sizes)).to(torch.float32)


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
    return task_of_class(task_sizes)


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


def alignment_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, membership: Optional[torch.Tensor],
                            tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the logit-normalized logits (``normalize_logits``; plain logits when ``membership``
    is None) and its gradient with respect to the raw logits, in closed form.

    With r_t = ||z_t||, m = mean_t(r_t + 1e-7) over the T tasks and s = 1 / (tau m), the loss sees u = s z and
    dL/dz_c = s g_c - (sum_k g_k z_k) s / (m T) * z_c / r_t(c), where g = (softmax(u) - onehot(y)) / B.
    A handful of fused ops per batch instead of an autograd graph (same numbers up to rounding).
    """
    batch = len(labels)
    if membership is not None:
        norms = torch.sqrt((logits * logits) @ membership)  # (B, T)
        mean_norm = (norms + 1e-7).mean(dim=1, keepdim=True)
        scale = 1.0 / (tau * mean_norm)
        normalized = logits * scale
    else:
        normalized = logits
    log_probs = torch.log_softmax(normalized, dim=1)
    picked = log_probs.gather(1, labels[:, None])
    loss = -picked.mean()
    grad = log_probs.exp_()
    grad.scatter_add_(1, labels[:, None], torch.full_like(picked, -1.0))
    grad.div_(batch)
    if membership is None:
        return loss, grad
    along = (grad * logits).sum(dim=1, keepdim=True)  # dL/ds
    per_task = (-along * scale / (mean_norm * membership.shape[1])) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    return loss, grad.mul_(scale).add_(logits * (per_task @ membership.T))


SampleTransform = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Generator]], torch.Tensor]


@dataclass
class AlignmentRecipe:
    """How classifier alignment trains the heads (spec section 5); a method may change it (``Method.alignment``).

    The defaults are RunConfig's (the paper's). ``mean_scaling``: the authors' shrinking of old class means (``task``, ``authors`` or ``off``).
    ``sample_transform(features, labels, generator)`` changes each epoch's samples (SLCA++ shrinks old classes).
    """

    epochs: int = DEFAULTS["ca_epochs"]
    samples_per_class: int = DEFAULTS["ca_samples"]
    batch_size: int = DEFAULTS["ca_batch_size"]
    lr: float = DEFAULTS["ca_lr"]
    momentum: float = DEFAULTS["momentum"]
    weight_decay: float = DEFAULTS["weight_decay"]
    tau: float = DEFAULTS["tau"]
    logit_norm: bool = DEFAULTS["logit_norm"]
    mean_scaling: str = DEFAULTS["mean_scaling"]
    mode: str = DEFAULTS["align_mode"]
    sample_transform: Optional[SampleTransform] = None


def align_classifier(heads: nn.ModuleList, means: torch.Tensor, chol: torch.Tensor, task_sizes: Sequence[int],
                     recipe: AlignmentRecipe, *, generator: Optional[torch.Generator] = None,
                     progress: Optional[Callable[[int, float], None]] = None) -> None:
    """Train every head on features sampled from the class Gaussians (spec section 5), in place.

    ``means`` and ``chol`` (the Cholesky factors cached with the statistics, ``statistics.cholesky_factors``)
    cover all seen classes in class-order position; the last task in ``task_sizes`` is the current one.
    All heads are trained as one stacked (classes x (D + 1)) matrix [weight | bias] against features with a
    column of ones, with the closed-form gradient of ``alignment_loss_and_grad`` and SGD written out (momentum,
    weight decay, cosine learning rate per epoch as torch's SGD and CosineAnnealingLR): elementwise, so the
    same optimization as per-head parameters, with two matmuls per batch whatever the number of heads.
    ``progress(epoch, mean loss)`` is called after every epoch. ``recipe.mode == "closed-form"`` sets the heads
    to the LDA classifier of the Gaussians instead (closed_form.py; no sampling, no epochs).
    """
    if recipe.mode == "closed-form":
        return align_closed_form(heads, means, chol)
    device = heads[0].weight.device
    means = means.to(device=device, dtype=torch.float64)
    if recipe.mean_scaling != "off":
        scale = mean_scale(class_tasks(task_sizes, recipe.mean_scaling), len(task_sizes) - 1).to(device)
        means = means * scale[:, None]
    chol = chol.to(device=device, dtype=torch.float32)
    means = means.to(torch.float32)
    params = torch.cat([torch.cat([h.weight.detach(), h.bias.detach()[:, None]], dim=1) for h in heads]).float()
    membership = task_membership(task_sizes, device) if recipe.logit_norm else None
    velocity: Optional[torch.Tensor] = None
    rng_device = generator.device if generator is not None else device
    batch_size, momentum, weight_decay = recipe.batch_size, recipe.momentum, recipe.weight_decay
    for epoch in range(recipe.epochs):
        epoch_lr = recipe.lr * (1 + math.cos(math.pi * epoch / max(recipe.epochs, 1))) / 2
        features, labels = sample_features(means, chol, recipe.samples_per_class, generator)
        if recipe.sample_transform is not None:
            features = recipe.sample_transform(features, labels, generator)
        order = torch.randperm(len(labels), generator=generator, device=rng_device).to(device)
        features = torch.cat([features, features.new_ones(len(features), 1)], dim=1)[order]
        labels = labels[order]
        total = torch.zeros((), device=device)
        for start in range(0, len(labels), batch_size):
            x, y = features[start:start + batch_size], labels[start:start + batch_size]
            loss, grad_logits = alignment_loss_and_grad(x @ params.T, y, membership, recipe.tau)
            grad = torch.addmm(params, grad_logits.T, x, beta=weight_decay)  # gradient + weight decay
            velocity = grad if velocity is None else velocity.mul_(momentum).add_(grad)
            params.add_(velocity, alpha=-epoch_lr)
            total += loss * len(y)
        if progress is not None:
            progress(epoch, float(total) / max(len(labels), 1))
    with torch.no_grad():
        sizes = [h.out_features for h in heads]
        for head, block in zip(heads, params.split(sizes)):
            head.weight.copy_(block[:, :-1])
            head.bias.copy_(block[:, -1])
