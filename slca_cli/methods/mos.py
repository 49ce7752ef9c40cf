"""MOS (Sun et al., "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning", AAAI 2025) on a
frozen ViT: one AdaptFormer adapter per task (adapters.py), started from the previous task's and trained with the
task's head; after every step it is merged with the mean of the earlier tasks' adapters (adapter merging); SLCA's
classifier alignment from the stored Gaussians; at test time a first pass (the first task's adapter and cosine
class prototypes) picks a task, the image is encoded again with that task's adapter and the task re-picked from
the heads until it is stable (self-refined adapter retrieval), and the two predictions are ensembled. Sources:
CONTRIBUTING.md, "Methods".
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import sum_across_processes
from ..presets import RunConfig
from ..protocol import task_of_class
from ..recipe import TrainingRecipe
from .adapters import active_adapters, adapted_blocks, adapter_parameters, inject_adapters
from .base import ClassifierInputs, Method, Stage1Inputs, recipe_from_config, require_vit

# The authors' constants (LAMDA-PILOT utils/inc_net.py tuning_config, backbone/vit_mos.py, models/mos.py).
ADAPTER_SCALE = 0.1  # ffn_adapter_scalar
ADAPTER_DROPOUT = 0.1  # Adapter(..., dropout=0.1) in init_adapters
REFINE_STEPS = 4  # MAX_ITER of the self-refined retrieval (_eval_cnn)
SEPARATION_TEMPERATURE = 0.8  # orth_loss: sim = M M^T / 0.8


def merged(current: torch.Tensor, earlier: Sequence[torch.Tensor], weight: float) -> torch.Tensor:
    """Adapter merging: ``(1 - weight) current + weight mean(earlier)`` (``current`` itself without earlier ones)."""
    if not earlier or not weight:
        return current
    return current * (1 - weight) + torch.stack(list(earlier)).mean(dim=0) * weight


def refine(start: torch.Tensor, features: torch.Tensor, classify: Callable[[torch.Tensor], torch.Tensor],
           task_of: torch.Tensor, steps: int = REFINE_STEPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Self-refined adapter retrieval for a batch: ``features`` (tasks, B, D) are every image encoded with every
    task's adapter, ``start`` (B,) the task the first pass picked. Each step classifies the features of the chosen
    task's adapter over every seen class; the task of the predicted class is chosen next, until it no longer
    changes or ``steps`` passes were made. Returns the last pass's logits and the adapter that gave them, per image
    (tensor ops only, so the whole model traces to ONNX)."""
    rows = torch.arange(features.shape[1], device=features.device)
    chosen, used = start, start
    done = torch.zeros_like(start, dtype=torch.bool)
    logits: Optional[torch.Tensor] = None
    for _ in range(steps):
        step_logits = classify(features[chosen, rows])
        logits = step_logits if logits is None else torch.where(done[:, None], logits, step_logits)
        used = torch.where(done, used, chosen)
        picked = task_of[step_logits.argmax(dim=1)]
        done = done | (picked == chosen)
        chosen = torch.where(done, chosen, picked)
    assert logits is not None
    return logits, used


def ensemble(logits: torch.Tensor, first: torch.Tensor, tasks: int) -> torch.Tensor:
    """The authors' ensemble, ``softmax(logits) + softmax(tasks * first)``, as log-probabilities (halved, so that a
    softmax of the result gives them back), floored at the smallest normal float so that they stay finite."""
    probabilities = torch.softmax(logits.float(), dim=1) + torch.softmax(first.float() * tasks, dim=1)
    return (probabilities / 2).clamp_min(torch.finfo(torch.float32).tiny).log()


class _GatherRows(torch.autograd.Function):
    """Every process's rows, in rank order (any row counts); the gradient of a process's own rows is the sum over
    processes of theirs, so a loss computed alike on every process trains as the one-process loss (DDP averages)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([rows.shape[0]], device=rows.device))
        sizes = [int(c) for c in counts]
        padded = rows.new_zeros((max(sizes),) + tuple(rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.start, ctx.count = sum(sizes[:rank]), sizes[rank]
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start: ctx.start + ctx.count]


def all_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` of every process of a distributed run (``_GatherRows``), or ``rows`` in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherRows.apply(rows)
    return rows


def separation_loss(features: torch.Tensor, old_means: torch.Tensor) -> torch.Tensor:
    """The authors' ``orth_loss``: cross-entropy of ``M M^T / 0.8`` against the identity, M = [old class means;
    batch features] (unnormalized): each feature should be most similar to itself, not to the others or the old
    classes."""
    anchors = torch.cat([old_means.to(features), features])
    similarity = anchors @ anchors.t() / SEPARATION_TEMPERATURE
    return F.cross_entropy(similarity, torch.arange(len(anchors), device=anchors.device))


class MOSBackbone(nn.Module):
    """The frozen ViT with ``tasks`` adapters per block; ``task`` (saved) is the task being trained or, in a saved
    model, the last one. ``forward`` gives the features of one adapter (the task's, or ``adapter`` when set: the
    prototype pass); ``test_logits`` is the test-time classifier (ContinualModel's forward and `slca eval` use it).
    ``prototypes`` (the first task's adapter's class means: the first pass's cosine classifier) and ``class_means``
    (each class's own task's adapter: the separation loss) are filled per task and saved with the weights."""

    def __init__(self, vit: nn.Module, tasks: int, num_classes: int, bottleneck: int, merge: float,
                 ensemble: bool):
        super().__init__()
        inject_adapters(vit, bottleneck, ADAPTER_SCALE, count=tasks, dropout=ADAPTER_DROPOUT)
        self.vit = vit
        self.num_features = dim = int(vit.embed_dim)
        self.merge, self.ensemble = float(merge), bool(ensemble)
        self.register_buffer("task", torch.zeros((), dtype=torch.long))
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("class_means", torch.zeros(num_classes, dim))
        self.adapter: Optional[int] = None  # the adapter forward() uses instead of the task's
        self.merging = False  # stage 1 of a task after the first: merge before every training forward
        self.train_features: Optional[torch.Tensor] = None  # the last training batch's features (the loss reads them)

    def encode(self, images: torch.Tensor, adapter: int) -> torch.Tensor:
        with active_adapters(self.vit, adapter):
            return self.vit(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training and self.merging:
            self.merge_adapter()
        features = self.encode(images, int(self.task) if self.adapter is None else self.adapter)
        self.train_features = features if self.training else None
        return features

    @torch.no_grad()
    def start_task(self, task: int) -> None:
        """Task ``task`` trains adapter ``task``, starting from the previous task's final one (the authors keep
        training one ``cur_adapter``)."""
        self.task.fill_(task)
        if task > 0:
            for block in adapted_blocks(self.vit):
                block.adapters[task].load_state_dict(block.adapters[task - 1].state_dict())
        self.merging = task > 0 and self.merge > 0

    @torch.no_grad()
    def merge_adapter(self) -> None:
        """The current task's adapter, in every block, merged with the mean of the earlier tasks' (``merged``)."""
        task = int(self.task)
        for block in adapted_blocks(self.vit):
            earlier = [dict(block.adapters[k].named_parameters()) for k in range(task)]
            for name, param in block.adapters[task].named_parameters():
                param.copy_(merged(param, [e[name] for e in earlier], self.merge))

    def finish_stage1(self) -> None:
        """The merge after the last step, then the adapter is final."""
        if self.merging:
            self.merge_adapter()
        self.merging = False
        self.train_features = None

    def retrieve(self, images: torch.Tensor, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores over every seen class, the adapter retrieved per image): every task's adapter encodes the images;
        the first pass is the cosine similarity of the first adapter's features to the prototypes; its class's task
        starts ``refine``; with ``ensemble`` the scores are ``ensemble``'s, else the refined logits."""
        sizes = [int(head.out_features) for head in model.task_heads]
        seen = sum(sizes)
        task_of = task_of_class(sizes).to(images.device)
        features = torch.stack([self.encode(images, t) for t in range(len(sizes))])
        first = F.normalize(features[0].float(), dim=1) @ F.normalize(self.prototypes[:seen].float(), dim=1).t()
        logits, used = refine(task_of[first.argmax(dim=1)], features, model.logits, task_of)
        return (ensemble(logits, first, len(sizes)) if self.ensemble else logits), used

    def test_logits(self, images: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return self.retrieve(images, model)[0]


class MOS(Method):
    """Frozen ViT; each task trains its adapter (lr_backbone) and head (lr_head) with SGD on a cosine schedule."""

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        require_vit(self.name, cfg.backbone, backbone)
        return MOSBackbone(backbone, cfg.num_tasks, cfg.num_classes, cfg.adapter_bottleneck, cfg.mos_merge,
                           cfg.mos_ensemble)

    def start_task(self, model: nn.Module, task: int, cfg: RunConfig) -> None:
        model.backbone.start_task(task)

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        """The task's adapter and head; the ViT is frozen but in train mode, as the authors' (the adapters'
        dropout; the ViT itself has none). Loss: cross-entropy + ``mos_reg`` x ``separation_loss`` over the global
        batch and the old classes' means."""
        mos = model.backbone
        groups = [{"params": adapter_parameters(mos.vit, task), "lr": cfg.lr_backbone},
                  {"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        recipe = recipe_from_config(groups, cfg)
        if not cfg.mos_reg:
            return recipe
        classify, old = recipe.loss, sum(cfg.task_sizes[:task])

        def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            features = all_rows(mos.train_features.float())
            return classify(logits, targets) + cfg.mos_reg * separation_loss(features, mos.class_means[:old])

        recipe.loss = loss
        return recipe

    def after_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: Stage1Inputs
                     ) -> Dict[str, torch.Tensor]:
        model.backbone.finish_stage1()
        return inputs.state

    @torch.no_grad()
    def fit_classifier(self, model: nn.Module, task: int, cfg: RunConfig, inputs: ClassifierInputs
                       ) -> Dict[str, torch.Tensor]:
        """The heads train (stage 1 and alignment); here the new classes' means are kept: their own adapter's (the
        class statistics) and the first adapter's (the prototypes; a pass over the task's training images under
        the test transform, summed over processes; the statistics themselves in the first task)."""
        mos = model.backbone
        means = inputs.task_means
        rows = slice(inputs.offset, inputs.offset + len(means))
        mos.class_means[rows] = means.to(mos.class_means)
        mos.prototypes[rows] = (means if task == 0 else first_adapter_means(mos, inputs)).to(mos.prototypes)
        return {}


def first_adapter_means(mos: MOSBackbone, inputs: ClassifierInputs) -> torch.Tensor:
    """Class means of the first task's adapter's features over this task's training images."""
    count = len(inputs.task_means)
    sums = torch.zeros(count, mos.num_features, dtype=torch.float64, device=inputs.task_means.device)
    counts = torch.zeros(count, dtype=torch.float64, device=sums.device)
    mos.adapter = 0
    try:
        for features, labels in inputs.batches():
            index = (labels.long() - inputs.offset).to(sums.device)
            sums.index_add_(0, index, features.to(sums))
            counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    finally:
        mos.adapter = None
    sums = sum_across_processes(sums, inputs.accelerator)
    counts = sum_across_processes(counts, inputs.accelerator)
    return (sums / counts.clamp_min(1)[:, None]).float()
