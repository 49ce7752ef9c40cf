"""CoFiMA (Marouf et al., "Weighted Ensemble Models Are Strong Continual Learners", ECCV 2024): SLCA's slow learner,
then after stage 1 of every task the backbone becomes the Fisher-weighted average of the previous task's final
backbone and the one just trained, before the class statistics and classifier alignment (SLCA's) read it.

``theta = ((1 - a) F_prev theta_prev + a F_new theta_new) / ((1 - a) F_prev + a F_new)`` per parameter entry, with
``F`` the diagonal empirical Fisher of each task (clamped at ``--fisher-max``) and ``a`` = ``--cofima-alpha``.
Each task's Fisher is kept as method state (``method.fisher.*`` in its stats.safetensors) for the next task,
straight or resumed; the previous backbone is the model the task starts from. Sources: CONTRIBUTING.md, "Methods".
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import ProcessShard, sum_across_processes
from ..errors import SlcaError
from ..model import freeze_batchnorm_statistics
from ..presets import RunConfig
from ..progress import progress
from ..stages import mark
from .base import Method, Stage1Inputs

FISHER = "fisher."  # method-state key prefix of the stored Fisher entries


def fisher_merge(previous: torch.Tensor, current: torch.Tensor, fisher_previous: torch.Tensor,
                 fisher_current: torch.Tensor, alpha: float) -> torch.Tensor:
    """The Fisher-weighted average of two parameter tensors (``alpha`` weighs the current one). Where both
    Fishers are 0 (a parameter no loss reaches) the current value is kept: 0/0 would be NaN."""
    weight_previous = (1.0 - alpha) * fisher_previous
    weight_current = alpha * fisher_current
    total = weight_previous + weight_current
    merged = (weight_previous * previous + weight_current * current) / torch.where(total > 0, total,
                                                                                  torch.ones_like(total))
    return torch.where(total > 0, merged, current)


def fisher_state_mib(backbone: nn.Module) -> float:
    """Size of one task's stored Fisher: one float32 per backbone parameter."""
    return sum(p.numel() for p in backbone.parameters()) * 4 / 2**20


def _aligned_batches(loader, count: int) -> Iterator[Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """``count`` steps of ``loader``; None once this process's share has run out (the last global batch may hold
    no rows of it), so every process takes part in every step's all-reduce."""
    iterator = iter(loader)
    for _ in range(count):
        yield next(iterator, None)


def process_batches(loader, accelerator):
    """This process's rows of each global batch of a fixed-draw train loader (``PassLoaders.train_views``), and
    the number of global batches: the rows of one step over all processes are exactly one batch of a
    one-process run, so the Fisher does not depend on the number of processes."""
    steps = len(loader)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world == 1:
        return loader, steps
    if hasattr(loader, "for_process"):  # on-device: whole global batches transformed, each process keeps its rows
        return loader.for_process(rank, world), steps
    # host: process r reads items r, r + w, ... in batches of B / w, so step i covers items [iB, (i+1)B)
    shard = torch.utils.data.DataLoader(ProcessShard(loader.dataset, rank, world),
                                        batch_size=loader.batch_size // world, shuffle=False,
                                        num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                                        worker_init_fn=loader.worker_init_fn)
    shard.finish_batch = getattr(loader, "finish_batch", None)
    return shard, steps


def diagonal_fisher(model: nn.Module, loader, accelerator, clamp: float, desc: str = "",
                    show_progress: bool = False) -> Dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of the backbone's parameters: the mean over the training batches of the
    squared gradient of the batch's cross-entropy over all seen classes (labels are class-order positions),
    each entry clamped at ``clamp`` (the authors' ``fishermax``). float32, no autocast; BatchNorm statistics
    are left as they are."""
    from ..data.loaders import finish_batch
    device = accelerator.device
    named = [(n, p) for n, p in model.backbone.named_parameters()]
    params = [p for _, p in named]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    shard, steps = process_batches(loader, accelerator)
    finish = finish_batch(loader)
    model.train()
    freeze_batchnorm_statistics(model.backbone)
    model.backbone.requires_grad_(True)
    bar = progress(desc, steps, "batch", enabled=show_progress and accelerator.is_main_process)
    try:
        for batch in _aligned_batches(shard, steps):
            if batch is None or not len(batch[1]):  # nothing of this step here: zeros into the all-reduce
                grads, count = [torch.zeros_like(p) for p in params], torch.zeros((), device=device)
            else:
                images, labels = batch
                images = finish(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True).long()
                loss = F.cross_entropy(model(images).float(), labels, reduction="sum")
                found = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]
                count = torch.tensor(float(len(labels)), device=device)
            if accelerator.num_processes > 1:
                flat = sum_across_processes(torch.cat([g.reshape(-1) for g in grads] + [count.reshape(1)]),
                                            accelerator)
                count = flat[-1]
                grads = list(flat[:-1].split([p.numel() for p in params]))
            count = count.clamp_min(1)  # a step no process has rows of adds zeros
            for total, g, p in zip(fisher, grads, params):
                total.add_((g.reshape(p.shape) / count).float().pow(2))
            bar.update(1)
    finally:
        bar.close()
        model.requires_grad_(False)
        model.eval()
    return {name: (total / steps).clamp_(max=clamp).cpu() for (name, _), total in zip(named, fisher)}


class CoFiMA(Method):
    """The slow learner's hooks; after stage 1: Fisher of the new backbone, then the merge with the previous."""

    def __init__(self, spec):
        super().__init__(spec)
        self.previous: Dict[str, torch.Tensor] = {}

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        """The backbone this task starts from is the previous task's final (merged) one, also after --resume."""
        self.previous = ({n: p.detach().clone() for n, p in model.backbone.named_parameters()} if task > 0
                         else {})

    def after_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: Stage1Inputs
                     ) -> Dict[str, torch.Tensor]:
        mark("fisher", task=task + 1)
        if task == 0:
            inputs.log(f"cofima: each task's Fisher (one float32 per backbone parameter, "
                       f"{fisher_state_mib(model.backbone):.0f} MiB) is stored in its stats.safetensors")
        fisher = diagonal_fisher(model, inputs.train_views(), inputs.accelerator, cfg.fisher_max,
                                 f"task {task + 1} fisher", inputs.show_progress)
        if task > 0:
            previous_fisher = {k[len(FISHER):]: v for k, v in inputs.state.items() if k.startswith(FISHER)}
            missing = sorted(set(fisher) - set(previous_fisher))
            if missing:
                raise SlcaError(f"--method cofima: the previous task's Fisher lacks {len(missing)} parameter(s) "
                                f"(e.g. {missing[0]}); the run folder was written by another version: start a "
                                f"new --out")
            self.merge(model, previous_fisher, fisher, cfg.cofima_alpha)
        return {FISHER + k: v for k, v in fisher.items()}

    @torch.no_grad()
    def merge(self, model: nn.Module, previous_fisher: Dict[str, torch.Tensor], fisher: Dict[str, torch.Tensor],
              alpha: float) -> None:
        """Every backbone parameter becomes the Fisher-weighted average of its previous and current value."""
        for name, param in model.backbone.named_parameters():
            device = param.device
            param.copy_(fisher_merge(self.previous[name].to(device), param, previous_fisher[name].to(device),
                                     fisher[name].to(device), alpha))
        self.previous = {}

