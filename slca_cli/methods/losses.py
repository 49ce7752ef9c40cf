"""Stage-1 losses: cross-entropy, and SLCA++'s symmetric cross-entropy (CE plus reverse CE)."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F


def reverse_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_c p_ic log clamp(onehot_ic, 1e-4, 1)`` with p = softmax clamped to [1e-7, 1]; the log of the
    clamped one-hot is 0 on the target and log(1e-4) elsewhere, so this is ``-log(1e-4) (1 - p_target)``-like."""
    p = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    onehot = F.one_hot(targets, logits.shape[1]).to(p.dtype).clamp(min=1e-4, max=1.0)
    return -(p * torch.log(onehot)).sum(dim=1).mean()


def symmetric_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, a: float = 1.0,
                            b: float = 0.0) -> torch.Tensor:
    """``a * CE + b * RCE`` (Wang et al., ICCV 2019), as SLCA++ uses it for the slow learner."""
    loss = a * F.cross_entropy(logits, targets) if a else logits.new_zeros(())
    return loss + b * reverse_cross_entropy(logits, targets) if b else loss


def classification_loss(cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Plain cross-entropy unless the run sets --sce-a / --sce-b."""
    if cfg.sce_a == 1.0 and cfg.sce_b == 0.0:
        return F.cross_entropy
    return functools.partial(symmetric_cross_entropy, a=cfg.sce_a, b=cfg.sce_b)
