"""RanPAC (McDonnell et al., NeurIPS 2023): a frozen backbone (optionally adapted on the first task), a fixed
random projection of its features to M dims with ReLU, and a ridge-regression classifier from the Gram matrix
and class sums accumulated task by task; lambda is chosen on held-out training samples of each task."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ..closed_form import ridge_weights, select_ridge
from ..distributed import sum_across_processes
from ..errors import SlcaError
from ..presets import RunConfig
from ..stages import mark
from .base import ClassifierInputs, Method

HELD_OUT_EVERY = 5  # 80:20 split of each task's training samples for choosing lambda, as in the paper


class RandomProjection(nn.Module):
    """``relu(x W)`` with a fixed W ~ N(0, 1) of shape (D, M); W is a buffer, saved with the backbone."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(in_features, out_features))
        self.out_features = out_features
        self.active = True  # off while the first task adapts the backbone with an ordinary head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight.to(x.dtype))


def gram_memory_mib(dim: int) -> float:
    """The M x M Gram matrix in float32 (kept in memory and in every task's stats.safetensors)."""
    return dim * dim * 4 / 2**20


def held_out_split(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of held-out rows: every 5th sample of each class, in an order fixed by (label, feature sum),
    so the split does not depend on how the samples were sharded across processes."""
    key = features.double().sum(dim=1)
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.arange(len(labels), device=labels.device) - start
    mask = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    mask[order] = rank % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return mask


def gather_rows(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """Every process's rows, concatenated (shards of different lengths allowed)."""
    if accelerator.num_processes == 1:
        return tensor
    count = accelerator.gather(torch.tensor([len(tensor)], device=tensor.device))
    padded = accelerator.gather(accelerator.pad_across_processes(tensor, dim=0))
    longest = int(count.max())
    return torch.cat([padded[i * longest:i * longest + int(n)] for i, n in enumerate(count.tolist())])


class RanPAC(Method):
    """No stage 1 (or only on task 1, --ranpac-adapt); the ridge heads are solved after each feature pass."""

    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        if cfg.align:
            raise SlcaError("--method ranpac computes its ridge classifier on the random features; classifier "
                            "alignment (--align) does not apply to it, drop --align")
        return cfg

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        backbone.head_input = RandomProjection(int(backbone.num_features), cfg.ranpac_dim)
        return backbone

    def trains(self, task: int, cfg: RunConfig) -> bool:
        return task == 0 and cfg.ranpac_adapt

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        """First-task adaptation trains the backbone with an ordinary head on its own features (the paper's
        phase 1); that head is dropped afterwards."""
        if self.trains(task, cfg):
            model.backbone.head_input.active = False
            model.task_heads[task] = _fresh_head(model, model.feature_dim, cfg.task_sizes[task])

    @torch.no_grad()
    def fit_classifier(self, model: nn.Module, task: int, cfg: RunConfig, inputs: ClassifierInputs
                       ) -> Dict[str, torch.Tensor]:
        project = model.backbone.head_input
        if not project.active:  # after first-task adaptation: the ridge head reads the projection
            project.active = True
            model.task_heads[task] = _fresh_head(model, project.out_features, cfg.task_sizes[task])
        accelerator = inputs.accelerator
        if task == 0 or not inputs.state:
            inputs.log(f"ranpac: random projection {model.feature_dim} -> {cfg.ranpac_dim} dims; the "
                       f"{cfg.ranpac_dim} x {cfg.ranpac_dim} Gram matrix takes {gram_memory_mib(cfg.ranpac_dim):.0f} MiB "
                       f"(float32) in memory and in every task's stats.safetensors (solved in float64: 3x that)")
        mark("classifier", task=task + 1)
        gram, targets, rows, labels = self.accumulate(project, inputs, cfg.task_sizes[task], accelerator.device)
        gram = sum_across_processes(gram, accelerator)
        targets = sum_across_processes(targets, accelerator)
        # The stored (float32) sums are what the next task, straight or resumed, continues from.
        old_gram = inputs.state.get("gram")
        old_targets = inputs.state.get("targets")
        if old_gram is not None:
            gram = gram + old_gram.to(gram)
            targets = torch.cat([old_targets.to(targets), targets], dim=1)
        gram, targets = gram.float(), targets.float()
        lam = self.choose_lambda(project, gather_rows(rows, accelerator), gather_rows(labels, accelerator),
                                 cfg.task_sizes[task])
        weight = ridge_weights(gram, targets, lam).T.float()  # (seen classes, M)
        sizes = [h.out_features for h in model.task_heads]
        for head, block in zip(model.task_heads, weight.split(sizes)):
            head.weight.copy_(block)
            head.bias.zero_()
        inputs.log(f"ranpac task {task + 1}: lambda {lam:g} (held-out choice)")
        lambdas = torch.cat([inputs.state.get("lambda", torch.zeros(0, dtype=torch.float64)),
                             torch.tensor([lam], dtype=torch.float64)])
        return {"gram": gram.cpu(), "targets": targets.cpu(), "lambda": lambdas}

    @staticmethod
    def accumulate(project: RandomProjection, inputs: ClassifierInputs, num_new: int, device
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's share of the task's Gram matrix H^T H and class sums H^T Y (float64), and its raw
        features and labels (for the choice of lambda)."""
        dim = project.out_features
        gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        targets = torch.zeros(dim, num_new, dtype=torch.float64, device=device)
        rows, labels = [], []
        for features, y in inputs.batches():
            y = (y - inputs.offset).long()
            h = project(features.float()).double()
            gram.addmm_(h.T, h)
            targets.index_add_(1, y, h.T)
            rows.append(features.float())
            labels.append(y)
        empty = torch.zeros(0, project.weight.shape[0], device=device)
        return (gram, targets, torch.cat(rows) if rows else empty,
                torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device))

    @staticmethod
    def choose_lambda(project: RandomProjection, features: torch.Tensor, labels: torch.Tensor, num_new: int) -> float:
        """Ridge fit on 80% of this task's samples, lambda with the lowest squared error on the other 20%."""
        held_out = held_out_split(features, labels)
        h = project(features)
        y = torch.nn.functional.one_hot(labels, num_new).to(h.dtype)
        return select_ridge(h[~held_out], y[~held_out], h[held_out], y[held_out])


def _fresh_head(model: nn.Module, dim: int, classes: int) -> nn.Linear:
    head = nn.Linear(dim, classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head.to(model.task_heads[0].weight.device)
