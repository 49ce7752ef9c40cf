"""Stage 1 (the slow learner) and the passes over data that follow it: features and evaluation."""
from __future__ import annotations

import math
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from .closed_form import shrink_class_covariances
from .data.loaders import finish_batch
from .distributed import process_loader, sum_across_processes
from .errors import SlcaError
from .model import ContinualModel, freeze_batchnorm_statistics
from .progress import iterate, progress
from .recipe import TrainingRecipe
from .stages import mark
from .statistics import ClassStatistics, cholesky_factors

# Steps between host syncs in stage 1: the loss stays on the device in between, so the GPU is never stalled.
SYNC_EVERY = 25


def fit_task(model: ContinualModel, loader: DataLoader, accelerator, recipe: TrainingRecipe, *, task: int,
             label_offset: int, show_progress: bool = True, epoch_checkpoints=None) -> List[float]:
    """Stage 1 of one task: train what ``recipe`` says (parameter groups, optimizer, schedule, loss over the
    current head, frozen modules, BatchNorm statistics) for ``recipe.epochs`` epochs; earlier heads stay frozen.
    Returns the mean loss of each epoch. ``epoch_checkpoints`` (midtask.TaskEpochs) restores an interrupted
    task's state before the first epoch and saves it after epochs."""
    epochs = recipe.epochs
    recipe.mark_trainable(model)
    optimizer, schedule = recipe.make()
    train_model, optimizer = accelerator.prepare(TaskForward(model, task), optimizer)
    # An on-device loader already splits each global batch across processes; DataLoaders go through accelerate.
    train_loader = loader if getattr(loader, "on_device", False) else accelerator.prepare_data_loader(loader)
    finish = finish_batch(loader)
    start_epoch, losses = (epoch_checkpoints.restore(accelerator, model, optimizer, schedule, loader,
                                                     train_loader) if epoch_checkpoints else (0, []))
    bar = progress(f"task {task + 1} stage 1", epochs * len(train_loader), "batch", epochs=epochs,
                   enabled=show_progress and accelerator.is_main_process)
    bar.update(start_epoch * len(train_loader))
    bar.start_at_epoch(start_epoch)
    for epoch in range(start_epoch, epochs):
        train_model.train()
        if recipe.freeze_bn:
            freeze_batchnorm_statistics(model.backbone)
        for module in recipe.frozen_modules:
            module.eval()
        total, seen = torch.zeros((), device=accelerator.device), 0
        for step, (images, labels) in enumerate(train_loader):
            images = finish(images)  # uint8 host batches are normalized here, on the device
            mark("fit", task=task + 1, epoch=epoch + 1, batch=step + 1)
            with accelerator.autocast():
                logits = train_model(images)
                loss = recipe.loss(logits.float(), labels - label_offset)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if recipe.grad_clip:
                accelerator.clip_grad_norm_(list(recipe.parameters()), recipe.grad_clip)
            optimizer.step()
            total += loss.detach() * len(labels)
            seen += len(labels)
            bar.update(1, images=len(labels))
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == len(train_loader):
                value = float(loss.detach())
                _check_finite(value, float(total), task, epoch)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
        schedule.step()
        # The mean over every process's images, so the recorded loss does not depend on the process count.
        summed = sum_across_processes(torch.stack([total, total.new_tensor(float(seen))]), accelerator)
        losses.append(float(summed[0]) / max(float(summed[1]), 1.0))
        bar.epoch_done(epoch, losses[-1])
        if epoch_checkpoints:
            epoch_checkpoints.epoch_done(epoch, accelerator, model, optimizer, schedule, loader, losses)
    bar.close()
    accelerator.free_memory()
    model.requires_grad_(False)
    return losses


class TaskForward(nn.Module):
    """What accelerate prepares for one task: the model through head ``task``. A fresh one per task, so what
    prepare() attaches (DDP wrapper, autocast forward, its prepared mark) never outlives the task, and the model
    itself is never patched."""

    def __init__(self, model: ContinualModel, task: int):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, head=self.task)


def _check_finite(loss: float, total: float, task: int, epoch: int) -> None:
    if not (math.isfinite(loss) and math.isfinite(total)):
        raise SlcaError(f"the loss became {loss if not math.isfinite(loss) else total} in task {task + 1}, epoch "
                        f"{epoch + 1}; finished tasks are kept. Under fp16/bf16 use --precision fp32 and --resume; "
                        f"else lower --lr-backbone / --lr-head (another experiment: use another --out)")


@torch.no_grad()
def feature_batches(model: ContinualModel, loader, accelerator, desc: str = "", show_progress: bool = True,
                    logits: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(features in float32, labels) of this process's shard of ``loader``, eval mode, on the device; with
    ``logits`` the model's test-time logits instead (``ContinualModel.scores_images``).

    The shards of all processes together hold every sample exactly once (``distributed.process_loader``);
    sum per-process results with ``distributed.sum_across_processes``. One process reads everything.
    """
    model.eval()
    device = accelerator.device
    finish = finish_batch(loader)
    for images, labels in iterate(process_loader(loader, accelerator), desc, unit="batch", images=lambda b: len(b[1]),
                                  enabled=show_progress and accelerator.is_main_process):
        images = finish(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        with torch.inference_mode(), accelerator.autocast():  # no autograd bookkeeping at all in the forward
            features = (model(images) if logits else model.features(images)).float()
        yield features.clone(), labels  # an ordinary tensor again, usable by any caller


@torch.no_grad()
def evaluate(model: ContinualModel, loader, accelerator, task_sizes: Sequence[int],
             show_progress: bool = True, desc: str = "evaluate") -> Tuple[List[int], List[int]]:
    """Correct and total test images per seen task, argmax over all heads (raw logits), every sample counted
    exactly once over all processes."""
    seen = sum(task_sizes)
    device = accelerator.device
    correct = torch.zeros(seen, dtype=torch.long, device=device)
    total = torch.zeros(seen, dtype=torch.long, device=device)
    own = model.scores_images
    for features, labels in feature_batches(model, loader, accelerator, desc, show_progress, logits=own):
        logits = features if own else model.logits(features.to(model.task_heads[0].weight.dtype))
        predictions = logits.argmax(dim=1)
        labels = labels.long()
        total += torch.bincount(labels, minlength=seen)
        correct += torch.bincount(labels[predictions == labels], minlength=seen)
    correct = sum_across_processes(correct, accelerator).cpu()
    total = sum_across_processes(total, accelerator).cpu()
    bounds = torch.cumsum(torch.tensor([0] + list(task_sizes)), 0).tolist()
    per_task = [(int(correct[a:b].sum()), int(total[a:b].sum())) for a, b in zip(bounds[:-1], bounds[1:])]
    return [c for c, _ in per_task], [n for _, n in per_task]


def class_statistics(model: ContinualModel, loader, offset: int, num_classes: int, accelerator, cfg,
                     show_progress: bool, task: int, covariances: bool = True):
    """Means and Cholesky factors of the new classes' features: test transform, eval mode, computed once. Each
    process reads its own shard; the partial sums are all-reduced, so every process holds the same statistics.
    Covariances: + ``cov_ridge`` I (the paper), or OAS-shrunk and then + ``cov_ridge`` I (``--covariance
    shrinkage``). ``covariances`` False: means only, empty (C, 0, 0) factors (Method.class_covariances)."""
    accumulator = ClassStatistics(num_classes, model.feature_dim, device=accelerator.device, covariances=covariances)
    for features, labels in feature_batches(model, loader, accelerator, f"task {task + 1} statistics",
                                            show_progress):
        accumulator.update(features, labels - offset)
    accumulator.all_reduce(lambda t: sum_across_processes(t, accelerator))
    means, covs = accumulator.finalize(cfg.cov_ridge if cfg.covariance == "ridge" else 0.0)
    if covariances and cfg.covariance == "shrinkage":
        covs = shrink_class_covariances(covs, accumulator.counts, cfg.cov_ridge)
    return means, cholesky_factors(covs)  # once per class; the sampler reuses the factors in every later task
