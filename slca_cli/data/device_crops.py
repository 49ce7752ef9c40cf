"""The random part of the JPEG datasets' transforms as batched tensor ops on decoded uint8 images (decoded.py).

- ``fine-grained`` (CUB, Cars): ``RandomCrop(size)`` + horizontal flip of the cached ``Resize((S, S))`` images: an
  integer gather, so every crop holds exactly the pixels the PIL path's crop holds (offsets drawn uniformly as
  torchvision draws them).
- ``crop`` (ImageNet-R, folder): ``RandomResizedCrop(size)`` + flip on each image's own (height, width) inside its
  canvas: boxes drawn as torchvision's ``get_params`` draws them (device_transforms' sampler), resized by one bicubic ``grid_sample`` for the
  batch (device_transforms.crop_resize; no antialiasing, which matters little as the cache bounds a downscale to
  S / size).
- test geometry (every dataset): the cache already holds ``Resize + CenterCrop``; only normalization is left.
Inputs are (N, S, S, 3) uint8 on any device; outputs (N, 3, size, size) normalized float32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .device_transforms import (channel_tensor, crop_resize, normalize, random_resized_crop_boxes_per_image,
                                to_float)


def random_crop_offsets(n: int, height: int, width: int, size: int, generator: Optional[torch.Generator],
                        device=None):
    """(top, left) of ``RandomCrop(size)`` for ``n`` images: each uniform over the allowed integer offsets."""
    top = torch.randint(0, height - size + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, width - size + 1, (n,), generator=generator, device=device)
    return top, left


def gather_crops(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int,
                 flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``images[i, top_i : top_i + size, left_i : left_i + size]`` (mirrored where ``flip``) for NHWC images.
    On a GPU one advanced-indexing kernel (no host sync); on a CPU slices and one stack, 4x faster there."""
    if images.device.type == "cpu":
        return sliced_crops(images, top, left, size, flip)
    return indexed_crops(images, top, left, size, flip)


def sliced_crops(images, top, left, size, flip=None) -> torch.Tensor:
    crops = torch.stack([images[i, a:a + size, b:b + size] for i, (a, b) in enumerate(zip(top.tolist(),
                                                                                          left.tolist()))])
    if flip is not None and bool(flip.any()):
        crops[flip] = crops[flip].flip(2)
    return crops


def indexed_crops(images, top, left, size, flip=None) -> torch.Tensor:
    steps = torch.arange(size, device=images.device)
    rows = top.view(-1, 1) + steps
    cols = left.view(-1, 1) + steps
    if flip is not None:
        cols = torch.where(flip.view(-1, 1), cols.flip(1), cols)
    batch = torch.arange(len(images), device=images.device).view(-1, 1, 1)
    return images[batch, rows.view(-1, size, 1), cols.view(-1, 1, size)]


def nchw_float(images: torch.Tensor) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [0, 1]."""
    return to_float(images.permute(0, 3, 1, 2))


def normalized_nchw(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """NHWC uint8 -> normalized NCHW float32 (channels-last in memory): ``x * (1 / (255 std)) - mean / std`` in
    place on the channel-contiguous layout, two passes instead of four."""
    scale = channel_tensor([1 / (255 * s) for s in std], images.device, torch.float32).view(-1)
    shift = channel_tensor([m / s for m, s in zip(mean, std)], images.device, torch.float32).view(-1)
    return images.to(torch.float32).mul_(scale).sub_(shift).permute(0, 3, 1, 2)


def fine_grained_train_batch(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RandomCrop(size) + RandomHorizontalFlip + normalize of cached ``Resize((S, S))`` images."""
    n, height, width, _ = images.shape
    top, left = random_crop_offsets(n, height, width, size, generator, images.device)
    flip = torch.rand(n, generator=generator, device=images.device) < 0.5
    return normalized_nchw(gather_crops(images, top, left, size, flip), mean, std)


def crop_train_batch(images: torch.Tensor, sizes: torch.Tensor, size: int, mean: Sequence[float],
                     std: Sequence[float], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RandomResizedCrop(size, bicubic) + RandomHorizontalFlip + normalize of cached bounded-canvas images whose
    true (height, width) are ``sizes``."""
    boxes = random_resized_crop_boxes_per_image(sizes[:, 0], sizes[:, 1], generator)
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    x = crop_resize(nchw_float(images), boxes, size, flip).clamp_(0, 1)
    return normalize(x, mean, std)


def cached_eval_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalize cached ``Resize + CenterCrop`` images (the test transform's pixels, exactly)."""
    return normalized_nchw(images, mean, std)
