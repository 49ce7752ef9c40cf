"""The random part of the JPEG datasets' transforms as batched tensor ops on decoded uint8 images (decoded.py).

- ``fine-grained`` (CUB, Cars): ``RandomCrop(size)`` + horizontal flip of the cached ``Resize((S, S))`` images: an
  integer gather, so every crop holds exactly the pixels the PIL path's crop holds (offsets drawn uniformly as
  torchvision draws them).
- ``crop`` (ImageNet-R, folder): ``RandomResizedCrop(size)`` + flip on each image's own (height, width) inside its
  canvas: boxes drawn as torchvision's ``get_params`` draws them, resized by one bicubic ``grid_sample`` for the
  batch (device_transforms.crop_resize; no antialiasing, which matters little as the cache bounds a downscale to
  S / size).
- test geometry (every dataset): the cache already holds ``Resize + CenterCrop``; only normalization is left.
Inputs are (N, S, S, 3) uint8 on any device; outputs (N, 3, size, size) normalized float32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .device_transforms import Boxes, channel_tensor, crop_resize, normalize, to_float


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


def random_resized_crop_boxes_per_image(heights: torch.Tensor, widths: torch.Tensor,
                                        generator: Optional[torch.Generator] = None,
                                        scale: Sequence[float] = (0.08, 1.0),
                                        ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> Boxes:
    """RandomResizedCrop boxes for images of different sizes: torchvision's ``get_params`` (ten attempts, then
    the whole image cut to the nearest allowed aspect ratio, centred), vectorized over the batch."""
    device = heights.device
    h_img, w_img = heights.to(torch.float64), widths.to(torch.float64)
    n = len(h_img)
    draw = lambda low, high, shape: low + (high - low) * torch.rand(shape, generator=generator, device=device,  # noqa: E731
                                                                    dtype=torch.float64)
    area = (h_img * w_img).view(-1, 1)
    target = area * draw(scale[0], scale[1], (n, attempts))
    aspect = torch.exp(draw(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= w_img.view(-1, 1)) & (h > 0) & (h <= h_img.view(-1, 1))
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    in_ratio = w_img / h_img
    low, high = min(ratio), max(ratio)
    fw = torch.where(in_ratio < low, w_img, torch.where(in_ratio > high, torch.round(h_img * high), w_img))
    fh = torch.where(in_ratio < low, torch.round(w_img / low), h_img)
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    top = torch.floor(torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (h_img - h + 1))
    left = torch.floor(torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (w_img - w + 1))
    top = torch.where(found, top, torch.div(h_img - fh, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(w_img - fw, 2, rounding_mode="floor"))
    return top, left, h, w


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
