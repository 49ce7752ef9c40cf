"""The protocol's CIFAR transforms as batched tensor ops on the training device (uint8 in, normalized float out).

Same sampling as torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, ten attempts then a centre
fallback), horizontal flip and ColorJitter(brightness); crop + resize of a whole batch is one bicubic
``grid_sample`` with a per-image affine grid. Differences from the PIL path, all below what augmentation
randomness already varies: torch's bicubic kernel (a = -0.75) instead of PIL's (a = -0.5), no rounding to
uint8 between steps, and at the crop's edges the bicubic taps read the real neighbouring pixels where
crop-then-resize repeats the edge pixel. The test transform (Resize(256/224 x size) + CenterCrop(size))
samples exactly the points torchvision's tensor Resize(antialias=False) + CenterCrop would.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Boxes = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # top, left, height, width (pixels)


def _uniform(n: int, low: float, high: float, generator: Optional[torch.Generator], device, attempts: int = 0):
    shape = (n, attempts) if attempts else (n,)
    return low + (high - low) * torch.rand(shape, generator=generator, device=device, dtype=torch.float64)


def random_resized_crop_boxes(n: int, height: int, width: int, generator: Optional[torch.Generator] = None,
                              device=None, scale: Sequence[float] = (0.08, 1.0),
                              ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> Boxes:
    """One crop box per image of ``n`` images of one size (height, width)."""
    full = lambda v: torch.full((n,), float(v), device=device, dtype=torch.float64)  # noqa: E731
    return random_resized_crop_boxes_per_image(full(height), full(width), generator, scale, ratio, attempts)


def random_resized_crop_boxes_per_image(heights: torch.Tensor, widths: torch.Tensor,
                                        generator: Optional[torch.Generator] = None,
                                        scale: Sequence[float] = (0.08, 1.0),
                                        ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> Boxes:
    """One crop box per image, drawn as torchvision's ``RandomResizedCrop.get_params`` draws it (ten attempts,
    then the whole image cut to the nearest allowed aspect ratio, centred), for images of any sizes at once."""
    device = heights.device
    h_img, w_img = heights.to(torch.float64), widths.to(torch.float64)
    n = len(h_img)
    area = (h_img * w_img).view(-1, 1)
    target = area * _uniform(n, scale[0], scale[1], generator, device, attempts)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, device, attempts))
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


def center_crop_boxes(n: int, height: int, width: int, image_size: int, device=None) -> Boxes:
    """The source region that Resize(round(size * 256 / 224)) (shorter side) + CenterCrop(size) keeps."""
    resize = round(image_size * 256 / 224)
    if height <= width:
        new_h, new_w = resize, int(resize * width / height)
    else:
        new_w, new_h = resize, int(resize * height / width)
    crop_top = int(round((new_h - image_size) / 2.0))
    crop_left = int(round((new_w - image_size) / 2.0))
    sy, sx = height / new_h, width / new_w
    full = lambda v: torch.full((n,), float(v), device=device, dtype=torch.float64)  # noqa: E731
    return full(crop_top * sy), full(crop_left * sx), full(image_size * sy), full(image_size * sx)


def crop_resize(images: torch.Tensor, boxes: Boxes, size: int, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop ``boxes`` out of float images (N, C, H, W), resize each to ``size`` x ``size`` (bicubic, edge pixels
    repeated), optionally mirrored: one affine grid and one ``grid_sample`` for the whole batch."""
    n, _, height, width = images.shape
    top, left, h, w = (b.to(images.device, torch.float64) for b in boxes)
    sign = torch.ones(n, dtype=torch.float64, device=images.device)
    if flip is not None:
        sign = torch.where(flip.to(images.device), -sign, sign)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=images.device)
    # Output pixel centre u in (0, 1) samples input x = left + u * w (pixel edges at integers).
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta.to(images.dtype), [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


_CHANNEL_STATS: Dict[Tuple, torch.Tensor] = {}


def channel_tensor(values: Sequence[float], device, dtype) -> torch.Tensor:
    """``values`` as a (1, C, 1, 1) tensor on ``device``, made once and reused: no host-to-device copy per batch."""
    key = (tuple(float(v) for v in values), str(device), dtype)
    if key not in _CHANNEL_STATS:
        _CHANNEL_STATS[key] = torch.tensor(key[0], device=device, dtype=dtype).view(1, -1, 1, 1)
    return _CHANNEL_STATS[key]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = channel_tensor(mean, images.device, images.dtype)
    s = channel_tensor(std, images.device, images.dtype)
    return (images - m) / s


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return images.to(torch.float32) / 255.0


def cifar_train_batch(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                      generator: Optional[torch.Generator] = None, brightness: float = 63 / 255) -> torch.Tensor:
    """RandomResizedCrop(size, bicubic) + horizontal flip + ColorJitter(brightness) + normalize, batched."""
    n, _, height, width = images.shape
    device = images.device
    boxes = random_resized_crop_boxes(n, height, width, generator, device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    x = crop_resize(to_float(images), boxes, size, flip).clamp_(0, 1)
    factor = _uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator, device).to(x.dtype)
    x = (x * factor.view(n, 1, 1, 1)).clamp_(0, 1)
    return normalize(x, mean, std)


def eval_batch(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize(round(size * 256 / 224)) + CenterCrop(size) (bicubic) + normalize, batched."""
    n, _, height, width = images.shape
    x = crop_resize(to_float(images), center_crop_boxes(n, height, width, size, images.device), size)
    return normalize(x.clamp_(0, 1), mean, std)
