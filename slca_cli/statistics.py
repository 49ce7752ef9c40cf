"""Class statistics: one fused, batched mean/covariance accumulator (float64, no Python loop over classes)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch


class ClassStatistics:
    """Per-class counts, sums and sums of outer products of features, accumulated batch by batch.

    Memory is O(C x D^2) whatever the number of samples; features are never kept. The sums are plain float64
    sums, so partial statistics of any split of the data (batches, processes) add up to the same result up to
    float64 rounding: that is what makes ``merge`` and ``all_reduce`` exact.
    """

    def __init__(self, num_classes: int, dim: int, device=None, dtype=torch.float64):
        self.counts = torch.zeros(num_classes, dtype=dtype, device=device)
        self.sums = torch.zeros(num_classes, dim, dtype=dtype, device=device)
        self.outer = torch.zeros(num_classes, dim, dim, dtype=dtype, device=device)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch; ``labels`` are indices in ``[0, num_classes)``."""
        if len(labels) == 0:
            return
        x = features.to(device=self.sums.device, dtype=self.sums.dtype)
        labels = labels.to(self.sums.device).long()
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=x.dtype))
        self.sums.index_add_(0, labels, x)
        # Pack each class's rows into a zero-padded (classes_in_batch, max_count, D) block; one bmm per batch.
        order = torch.argsort(labels, stable=True)
        sorted_labels, x = labels[order], x[order]
        present, per_class = torch.unique_consecutive(sorted_labels, return_counts=True)
        starts = torch.cumsum(per_class, 0) - per_class
        slot = torch.repeat_interleave(torch.arange(len(present), device=x.device), per_class)
        position = torch.arange(len(x), device=x.device) - starts[slot]
        packed = x.new_zeros(len(present), int(per_class.max()), x.shape[1])
        packed[slot, position] = x
        self.outer.index_add_(0, present, packed.transpose(1, 2) @ packed)

    def merge(self, other: "ClassStatistics") -> None:
        """Add another accumulator's partial statistics (same classes, e.g. another shard of the data)."""
        self.counts += other.counts.to(self.counts.device)
        self.sums += other.sums.to(self.sums.device)
        self.outer += other.outer.to(self.outer.device)

    def all_reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the partial statistics of every process, so that all of them hold the same statistics.

        ``reduce_fn`` sums a tensor over processes (``distributed.sum_across_processes``); each process must have
        accumulated a disjoint shard of the samples, each sample exactly once.
        """
        self.counts, self.sums, self.outer = (reduce_fn(t) for t in (self.counts, self.sums, self.outer))

    def finalize(self, ridge: float = 1e-4) -> Tuple[torch.Tensor, torch.Tensor]:
        """(means, covariances): unbiased covariance plus ``ridge * I``; a class with one sample gets ``ridge * I``."""
        if bool((self.counts == 0).any()):
            missing = torch.nonzero(self.counts == 0).flatten().tolist()
            raise ValueError(f"no samples for class indices {missing[:10]}")
        n = self.counts[:, None]
        means = self.sums / n
        scatter = self.outer - n[:, :, None] * means[:, :, None] * means[:, None, :]
        denom = (self.counts - 1).clamp(min=1)[:, None, None]
        covs = torch.where(self.counts[:, None, None] > 1, scatter / denom, torch.zeros_like(scatter))
        covs = 0.5 * (covs + covs.transpose(1, 2))
        eye = torch.eye(covs.shape[-1], dtype=covs.dtype, device=covs.device)
        return means, covs + ridge * eye


def cholesky_factors(covs: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a batch of covariances in float64, one batched call; jitter only where needed.

    Computed once per class when its statistics are finalized (stored in stats.safetensors as ``chol``), so
    the alignment stage never factorizes again.
    """
    covs = covs.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(covs)
    jitter = 1e-6
    while bool((info > 0).any()) and jitter < 1.0:
        bad = info > 0
        eye = torch.eye(covs.shape[-1], dtype=covs.dtype, device=covs.device)
        retry, info_retry = torch.linalg.cholesky_ex(covs[bad] + jitter * eye)
        factor[bad], info[bad] = retry, info_retry
        jitter *= 10
    return factor
