"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models", 2023): the frozen
pre-trained backbone and a cosine classifier whose weights are the class-mean prototypes. No training."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..closed_form import cosine_prototypes
from ..presets import RunConfig
from .base import ClassifierInputs, Method


class SimpleCIL(Method):
    """No stage 1; each new head is set from the class statistics."""

    def trains(self, task: int, cfg: RunConfig) -> bool:
        return False

    @torch.no_grad()
    def fit_classifier(self, model: nn.Module, task: int, cfg: RunConfig, inputs: ClassifierInputs
                       ) -> Dict[str, torch.Tensor]:
        """The new head's weights are the unit-norm means of the new classes (from the class statistics, already
        summed over processes); bias 0. Old heads keep their prototypes: the backbone never changes."""
        head = model.task_heads[task]
        head.weight.copy_(cosine_prototypes(inputs.task_means.to(torch.float64)).to(head.weight))
        head.bias.zero_()
        return {}
