"""Generated images: each class a colour and an oriented stripe texture, plus noise. Deterministic, learnable."""
from __future__ import annotations

import math

import torch

from .base import DatasetSplits, LabelledSplit

NATIVE_SIZE = 32
SPLIT_SEEDS = {"train": 1, "test": 2}


def _class_pattern(label: int):
    gen = torch.Generator().manual_seed(10_007 * (label + 1))
    colour = torch.rand(3, generator=gen)
    frequency = 1.0 + 4.0 * torch.rand(1, generator=gen).item()
    angle = math.pi * torch.rand(1, generator=gen).item()
    return colour, frequency, angle


class SyntheticSplit(LabelledSplit):
    """``per_class`` images of each of ``num_classes`` classes, each a function of (split, index) only."""

    def __init__(self, num_classes: int, per_class: int, split: str, noise: float = 0.15):
        self.labels = [c for c in range(num_classes) for _ in range(per_class)]
        self.split_seed, self.noise, self.split = SPLIT_SEEDS[split], noise, split
        self.patterns = [_class_pattern(c) for c in range(num_classes)]
        coords = torch.arange(NATIVE_SIZE, dtype=torch.float32) / NATIVE_SIZE
        self.yy, self.xx = torch.meshgrid(coords, coords, indexing="ij")

    def load(self, index: int) -> torch.Tensor:
        colour, frequency, angle = self.patterns[self.labels[index]]
        gen = torch.Generator().manual_seed(1_000_003 * self.split_seed + index)
        phase = 2 * math.pi * torch.rand(1, generator=gen).item()
        wave = torch.sin(2 * math.pi * frequency * (self.xx * math.cos(angle) + self.yy * math.sin(angle)) + phase)
        image = 0.15 + 0.7 * colour[:, None, None] + 0.15 * wave[None]
        image = image + self.noise * torch.randn(3, NATIVE_SIZE, NATIVE_SIZE, generator=gen)
        return image.clamp(0, 1)

    def describe(self, index: int) -> str:
        return f"{self.split}/{self.labels[index]}/{index}"


def synthetic_splits(num_classes: int, train_per_class: int, test_per_class: int) -> DatasetSplits:
    names = [f"class_{c:03d}" for c in range(num_classes)]
    return DatasetSplits("synthetic", names, SyntheticSplit(num_classes, train_per_class, "train"),
                         SyntheticSplit(num_classes, test_per_class, "test"), "tensor")
