"""Class statistics: one fused, batched mean/covariance accumulator (float64, no Python loop over classes)."""
from __future__ import annotations

from typing import Callable, Tuple

import torch


class ClassStatistics:
    """Per-class counts, sums and sums of outer products of features, accumulated batch by batch.

    Memory is O(C x D^2 + K x D) whatever the number of samples: features are never kept beyond a staging buffer
    of ``buffer_rows`` (K) rows, whose outer products are added, for all classes in it at once, when it fills.
    Staging amortizes the D x D update of every class present over many small batches. The sums are plain
    float64 sums, so partial statistics of any split of the data (batches, processes) add up to the same result
    up to float64 rounding: that is what makes ``merge`` and ``all_reduce`` exact.
    """

    def __init__(self, num_classes: int, dim: int, device=None, dtype=torch.float64, buffer_rows: int = 2048,
                 covariances: bool = True):
        self.covariances = covariances  # False: counts and sums only; finalize gives (C, 0, 0) covariances
        if not covariances:
            dim_outer, buffer_rows = 0, 0
        else:
            dim_outer = dim
        self.counts = torch.zeros(num_classes, dtype=dtype, device=device)
        self.sums = torch.zeros(num_classes, dim, dtype=dtype, device=device)
        self._outer = torch.zeros(num_classes, dim_outer, dim_outer, dtype=dtype, device=device)
        self._rows = torch.empty(buffer_rows, dim, dtype=dtype, device=device)
        self._row_labels = torch.empty(buffer_rows, dtype=torch.long, device=device)
        self._staged = 0

    @property
    def outer(self) -> torch.Tensor:
        """Per-class sums of outer products (C, D, D), staged rows included."""
        self._flush()
        return self._outer

    @outer.setter
    def outer(self, value: torch.Tensor) -> None:
        self._flush()
        self._outer = value

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch; ``labels`` are indices in ``[0, num_classes)``."""
        if len(labels) == 0:
            return
        x = features.to(device=self.sums.device, dtype=self.sums.dtype)
        labels = labels.to(self.sums.device).long()
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=x.dtype))
        self.sums.index_add_(0, labels, x)
        if not self.covariances:
            return
        capacity = len(self._rows)
        for start in range(0, len(labels), capacity):
            chunk, chunk_labels = x[start:start + capacity], labels[start:start + capacity]
            if self._staged + len(chunk) > capacity:
                self._flush()
            self._rows[self._staged:self._staged + len(chunk)] = chunk
            self._row_labels[self._staged:self._staged + len(chunk)] = chunk_labels
            self._staged += len(chunk)

    def _flush(self) -> None:
        """Add the outer products of the staged rows: rows sorted by class, packed zero-padded into
        (segments, s, D), one bmm. Roughly balanced classes take one segment each (s = the largest count, at most
        twice the rows in padding); when every class is present that bmm accumulates in place. Unbalanced ones
        are cut into segments of s = ceil(rows / classes present), at most two per class on average, whose
        products are added with one index_add: padding stays bounded however unbalanced the classes are."""
        n = self._staged
        if n == 0:
            return
        x, labels = self._rows[:n], self._row_labels[:n]
        order = torch.argsort(labels, stable=True)
        labels, x = labels[order], x[order]
        present, per_class = torch.unique_consecutive(labels, return_counts=True)
        longest = int(per_class.max())
        seg_len = longest if longest * len(present) <= 2 * n else -(-n // len(present))
        seg_per_class = (per_class + seg_len - 1) // seg_len
        seg_start = torch.cumsum(seg_per_class, 0) - seg_per_class
        class_start = torch.cumsum(per_class, 0) - per_class
        slot = torch.repeat_interleave(torch.arange(len(present), device=x.device), per_class)
        position = torch.arange(n, device=x.device) - class_start[slot]
        segment = seg_start[slot] + position // seg_len
        segments = int(seg_per_class.sum())
        packed = x.new_zeros(segments, seg_len, x.shape[1])
        packed[segment, position % seg_len] = x
        if segments == len(present) == len(self._outer):  # every class, one segment each, in class order
            self._outer.baddbmm_(packed.transpose(1, 2), packed)
        else:
            segment_class = torch.repeat_interleave(present, seg_per_class)
            self._outer.index_add_(0, segment_class, packed.transpose(1, 2) @ packed)
        self._staged = 0

    def merge(self, other: "ClassStatistics") -> None:
        """Add another accumulator's partial statistics (same classes, e.g. another shard of the data)."""
        self.counts += other.counts.to(self.counts.device)
        self.sums += other.sums.to(self.sums.device)
        self.outer += other.outer.to(self.sums.device)

    def all_reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the partial statistics of every process, so that all of them hold the same statistics.

        ``reduce_fn`` sums a tensor over processes (``distributed.sum_across_processes``); each process must have
        accumulated a disjoint shard of the samples, each sample exactly once.
        """
        if not self.covariances:
            self.counts, self.sums = reduce_fn(self.counts), reduce_fn(self.sums)
            return
        self.counts, self.sums, self.outer = (reduce_fn(t) for t in (self.counts, self.sums, self.outer))

    def finalize(self, ridge: float = 1e-4) -> Tuple[torch.Tensor, torch.Tensor]:
        """(means, covariances): unbiased covariance plus ``ridge * I``; a class with one sample gets ``ridge * I``."""
        if bool((self.counts == 0).any()):
            missing = torch.nonzero(self.counts == 0).flatten().tolist()
            raise ValueError(f"no samples for class indices {missing[:10]}")
        means = self.sums / self.counts[:, None]
        if not self.covariances:
            return means, self._outer
        # scatter = sum x x^T - n mu mu^T = outer - sums mu^T, in one fused batched op
        scatter = torch.baddbmm(self.outer, self.sums[:, :, None], means[:, None, :], alpha=-1)
        weight = torch.where(self.counts > 1, 1 / (self.counts - 1).clamp(min=1), torch.zeros_like(self.counts))
        covs = (scatter + scatter.transpose(1, 2)).mul_(0.5 * weight[:, None, None])
        covs.diagonal(dim1=1, dim2=2).add_(ridge)
        return means, covs


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
