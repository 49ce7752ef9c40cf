"""InfLoRA (Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024) on a
frozen ViT: every task adds a low-rank branch to the key and value projections of each block's attention (the k and v
thirds of timm's ``attn.qkv``). Its down-projection (the paper's B_t, our ``lora_A``: rank x D, fixed) is designed
before the task from the task's attention inputs with the old tasks' input subspace (DualGPM's, per layer) projected
out, so that training the up-projection (the paper's A_t, our ``lora_B``, from zero) moves the weight only along
directions the old tasks' inputs do not use. After stage 1 the subspace grows by the task's inputs up to an energy
threshold and the branch is merged into the weight. The per-layer bases are kept as ``method.basis.<layer>``.
Sources: CONTRIBUTING.md, "Methods".
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from ..distributed import sum_across_processes
from ..errors import SlcaError
from ..presets import RunConfig
from ..progress import progress
from ..recipe import TrainingRecipe
from ..stages import mark
from .base import Method, Stage1Inputs, recipe_from_config, require_vit
from .cofima import process_batches
from .lora import LoRALinear, inject_lora, lora_layers

BASIS = "basis."  # method-state key prefix of each layer's subspace basis (D x k)
DOWN_SCALE = 1.0 / math.sqrt(3.0)  # the authors' scale of the designed down-projection rows
TINY = 1e-10  # relative size below which a residual direction carries no energy


def design_down(covariance: torch.Tensor, basis: Optional[torch.Tensor], rank: int) -> torch.Tensor:
    """The (rank x D) down-projection: the top-``rank`` left singular vectors of ``(I - U U^T) C`` (C the task's input
    covariance, U the old tasks' orthonormal basis, D x k) as rows, times 1/sqrt(3). Computed in the complement of U,
    so every row is orthogonal to U even where the projected covariance has no energy left; rows beyond the
    complement's dimension (D - k < rank) are zero. float64."""
    covariance = covariance.double()
    dim = covariance.shape[0]
    if basis is None or basis.shape[1] == 0:
        complement = torch.eye(dim, dtype=torch.float64)
    else:
        full, _, _ = torch.linalg.svd(basis.double(), full_matrices=True)
        complement = full[:, basis.shape[1]:]
    down = torch.zeros(rank, dim, dtype=torch.float64)
    if complement.shape[1] == 0:
        return down
    left, _, _ = torch.linalg.svd(complement.T @ covariance, full_matrices=False)
    directions = complement @ left[:, :rank]
    down[: directions.shape[1]] = directions.T * DOWN_SCALE
    return down


def update_basis(covariance: torch.Tensor, basis: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
    """GPM's subspace after a task (Saha et al., ICLR 2021; the energy of a direction being the squared singular
    value of the input covariance, as the InfLoRA authors compute it): the old basis plus the fewest leading
    directions of the residual ``C - U U^T C`` that bring the share of C's energy inside the basis to ``threshold``
    (the first task: the fewest leading directions of C). At most D columns; float64."""
    covariance = covariance.double()
    dim = covariance.shape[0]
    left, values, _ = torch.linalg.svd(covariance)
    energy = values.pow(2)
    total = float(energy.sum())
    if total <= 0:  # no input energy at all: nothing to add
        return torch.zeros(dim, 0, dtype=torch.float64) if basis is None else basis.double()
    if basis is None or basis.shape[1] == 0:
        share = torch.cumsum(energy, 0) / total
        keep = min(int((share < threshold).sum()) + 1, dim)
        return left[:, :keep]
    basis = basis.double()
    residual = covariance - basis @ (basis.T @ covariance)
    r_left, r_values, _ = torch.linalg.svd(residual)
    r_energy = r_values.pow(2)
    kept = (total - float(r_energy.sum())) / total  # what the old basis already holds
    add = 0
    for value, part in zip(r_values.tolist(), (r_energy / total).tolist()):
        if kept >= threshold or value <= TINY * float(values[0]) or basis.shape[1] + add >= dim:
            break
        kept += part
        add += 1
    return torch.cat([basis, r_left[:, :add]], dim=1)


def task_threshold(cfg: RunConfig, task: int) -> float:
    """The authors' threshold of task ``task`` (0-based): rising linearly from the start value towards the end one."""
    return cfg.inflora_threshold + (cfg.inflora_threshold_end - cfg.inflora_threshold) * task / cfg.num_tasks


@torch.no_grad()
def input_covariances(model: nn.Module, loader, accelerator, layers: List[LoRALinear], desc: str = "",
                      show_progress: bool = False) -> torch.Tensor:
    """(layers, D, D) float64 on the CPU: the mean of ``x x^T`` over every token entering each layer, on this
    process's share of ``loader``'s global batches (``cofima.process_batches``), summed over processes, so every
    process designs the same down-projections."""
    from ..data.loaders import finish_batch
    device = accelerator.device
    here = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 where the device has it
    dim = layers[0].in_features
    sums = torch.zeros(len(layers), dim, dim, dtype=torch.float64, device=here)
    count = torch.zeros(1, dtype=torch.float64, device=here)

    def recorder(index: int):
        def record(module, args):
            x = args[0].detach().reshape(-1, dim).float()
            sums[index] += (x.T @ x).to(here, torch.float64)
            if index == 0:
                count.add_(x.shape[0])
        return record

    handles = [layer.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    shard, steps = process_batches(loader, accelerator)
    finish = finish_batch(loader)
    model.eval()
    bar = progress(desc, steps, "batch", enabled=show_progress and accelerator.is_main_process)
    try:
        for images, _ in shard:
            model.backbone(finish(images.to(device, non_blocking=True)))
            bar.update(1)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    total = sum_across_processes(torch.cat([sums.reshape(-1), count]).to(device), accelerator).cpu()
    tokens = float(total[-1])
    if tokens == 0:
        raise SlcaError("--method inflora: the task has no training images to design its LoRA branch from")
    return (total[:-1] / tokens).reshape(len(layers), dim, dim)


class InfLoRA(Method):
    """Frozen ViT; per task: design the down-projections, train the up-projections and the head, grow the
    subspace, merge the branch."""

    def finalize_config(self, cfg: RunConfig) -> RunConfig:
        if cfg.lora_rank < 1:
            raise SlcaError("--method inflora trains a LoRA branch per task: --lora-rank must be at least 1, got 0 "
                            "(the authors: 10)")
        return cfg

    def wrap_backbone(self, backbone: nn.Module, cfg: RunConfig) -> nn.Module:
        require_vit(self.name, cfg.backbone, backbone)

        def key_value_rows(layer: nn.Linear):
            if layer.out_features != 3 * layer.in_features:
                raise SlcaError(f"--method inflora adapts the key and value thirds of attn.qkv, but {cfg.backbone}'s "
                                f"qkv maps {layer.in_features} to {layer.out_features} features; use a timm ViT")
            return layer.in_features, layer.out_features

        inject_lora(backbone, cfg.lora_rank, cfg.lora_scale, targets=("attn.qkv",), rows=key_value_rows)
        return backbone

    def before_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: Stage1Inputs) -> None:
        """The task's down-projections from its attention inputs, orthogonal to the stored subspaces; up = 0."""
        layers = list(lora_layers(model.backbone))
        mark("subspace", task=task + 1, step="design")
        covariances = input_covariances(model, inputs.train_views(), inputs.accelerator, layers,
                                        f"task {task + 1} design", inputs.show_progress)
        bases = self.bases(inputs.state, len(layers), task)
        with torch.no_grad():
            for layer, covariance, basis in zip(layers, covariances, bases):
                layer.lora_A.copy_(design_down(covariance, basis, layer.rank).to(layer.lora_A))
                layer.lora_B.zero_()

    def recipe(self, model: nn.Module, task: int, cfg: RunConfig) -> TrainingRecipe:
        """The up-projections at ``lr_backbone``, the task's head at ``lr_head``; the ViT stays in eval mode."""
        ups = [layer.lora_B for layer in lora_layers(model.backbone)]
        groups = [{"params": ups, "lr": cfg.lr_backbone},
                  {"params": list(model.task_heads[task].parameters()), "lr": cfg.lr_head}]
        return recipe_from_config(groups, cfg, frozen_modules=(model.backbone,))

    def after_stage1(self, model: nn.Module, task: int, cfg: RunConfig, inputs: Stage1Inputs
                     ) -> Dict[str, torch.Tensor]:
        """Grow each layer's subspace by the trained model's inputs, then merge the branch into the weight."""
        layers = list(lora_layers(model.backbone))
        mark("subspace", task=task + 1, step="update")
        covariances = input_covariances(model, inputs.train_views(), inputs.accelerator, layers,
                                        f"task {task + 1} subspace", inputs.show_progress)
        threshold = task_threshold(cfg, task)
        bases = [update_basis(c, b, threshold)
                 for c, b in zip(covariances, self.bases(inputs.state, len(layers), task))]
        with torch.no_grad():
            for layer in layers:
                layer.base.weight.add_(layer.delta())
                layer.lora_B.zero_()
        inputs.log(f"inflora: task {task + 1} subspace (threshold {threshold:.4f}) holds "
                   f"{', '.join(str(b.shape[1]) for b in bases)} of {layers[0].in_features} dimensions per block")
        return {f"{BASIS}{i}": b.float().contiguous() for i, b in enumerate(bases)}

    @staticmethod
    def bases(state: Dict[str, torch.Tensor], count: int, task: int) -> List[Optional[torch.Tensor]]:
        """The stored basis of each layer (none before the first task)."""
        if task == 0:
            return [None] * count
        missing = [i for i in range(count) if f"{BASIS}{i}" not in state]
        if missing:
            raise SlcaError(f"--method inflora: the previous task's state lacks the subspace of block {missing[0]}; "
                            f"the run folder was written by another method or version: start a new --out")
        return [state[f"{BASIS}{i}"] for i in range(count)]
