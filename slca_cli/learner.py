"""Stage 1 (the slow learner) and the passes over data that follow it: features and evaluation."""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import SlcaError
from .model import ContinualModel, freeze_batchnorm_statistics
from .recipe import TrainingRecipe, paper_recipe


def default_workers(tensor_data: bool) -> int:
    """Loader processes: none for generated tensors, else up to 8 leaving one core free."""
    return 0 if tensor_data else max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=False)


def fit_task(model: ContinualModel, loader: DataLoader, accelerator, *, task: int, label_offset: int, epochs: int,
             lr_backbone: float, lr_head: float, momentum: float, weight_decay: float,
             lr_drop_epoch: Optional[int], freeze_bn: bool = False, show_progress: bool = True,
             recipe: Optional[TrainingRecipe] = None) -> List[float]:
    """Train the backbone (``lr_backbone``) and the current head (``lr_head``) with cross-entropy over the
    current head only; earlier heads stay frozen; with ``freeze_bn`` BatchNorm keeps its running statistics.
    A method's ``recipe`` replaces that default (which parameters train at what lr, optimizer, schedule, loss).
    Returns the mean loss of each epoch."""
    if recipe is None:
        recipe = paper_recipe(model, task, lr_backbone=lr_backbone, lr_head=lr_head, momentum=momentum,
                              weight_decay=weight_decay, lr_drop_epoch=lr_drop_epoch)
    recipe.mark_trainable(model)
    optimizer, schedule = recipe.make(epochs)
    train_model, optimizer, train_loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    bar = tqdm(total=epochs * len(train_loader), desc=f"task {task + 1} stage 1", unit="batch", leave=False,
               disable=not (show_progress and accelerator.is_main_process))
    for epoch in range(epochs):
        train_model.train()
        if freeze_bn:
            freeze_batchnorm_statistics(model.backbone)
        for module in recipe.frozen_modules:
            module.eval()
        total, seen = 0.0, 0
        for images, labels in train_loader:
            with accelerator.autocast():
                logits = train_model(images, head=task)
                loss = recipe.loss(logits.float(), labels - label_offset)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SlcaError(f"the loss became {value} in task {task + 1}, epoch {epoch + 1}; finished tasks "
                                f"are kept: lower --lr-backbone / --lr-head or use --precision fp32, then --resume")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if recipe.grad_clip:
                accelerator.clip_grad_norm_(list(recipe.parameters()), recipe.grad_clip)
            optimizer.step()
            total += value * len(labels)
            seen += len(labels)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}")
        schedule.step()
        losses.append(total / max(seen, 1))
    bar.close()
    accelerator.free_memory()
    model.requires_grad_(False)
    return losses


@torch.no_grad()
def feature_batches(model: ContinualModel, loader: DataLoader, accelerator,
                    desc: str = "", show_progress: bool = True) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(features in float32, labels) of every sample exactly once, gathered across processes, eval mode."""
    model.eval()
    prepared = accelerator.prepare_data_loader(loader)
    for images, labels in tqdm(prepared, desc=desc, unit="batch", leave=False,
                               disable=not (show_progress and accelerator.is_main_process)):
        with accelerator.autocast():
            features = model.features(images)
        features, labels = accelerator.gather_for_metrics((features.float().contiguous(), labels))
        yield features, labels


@torch.no_grad()
def evaluate(model: ContinualModel, loader: DataLoader, accelerator, task_sizes: Sequence[int],
             show_progress: bool = True) -> Tuple[List[int], List[int]]:
    """Correct and total test images per seen task, argmax over all heads (raw logits)."""
    seen = sum(task_sizes)
    correct = torch.zeros(seen, dtype=torch.long)
    total = torch.zeros(seen, dtype=torch.long)
    for features, labels in feature_batches(model, loader, accelerator, "evaluate", show_progress):
        predictions = model.logits(features.to(model.task_heads[0].weight.dtype)).argmax(dim=1)
        labels = labels.cpu()
        total += torch.bincount(labels, minlength=seen)
        correct += torch.bincount(labels[predictions.cpu() == labels], minlength=seen)
    bounds = torch.cumsum(torch.tensor([0] + list(task_sizes)), 0).tolist()
    per_task = [(int(correct[a:b].sum()), int(total[a:b].sum())) for a, b in zip(bounds[:-1], bounds[1:])]
    return [c for c, _ in per_task], [n for _, n in per_task]
