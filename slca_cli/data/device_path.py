"""Which decoded images each pass of the on-device path reads, what they cost, and whether they fit.

Per pass (train, statistics = train images under the test transform, test) a dataset style names a split and a
cache geometry (decoded.py). CIFAR keeps its originals (32 x 32, decoded in memory at the start of a run, as
before); the JPEG datasets read caches on disk that are uploaded to the device on first use.
"""
from __future__ import annotations

import shutil
from typing import Dict, Optional, Tuple

import torch
from PIL import Image

from .base import DatasetSplits, FileSplit
from .decoded import Geometry, cache_folder, open_cache

DEVICE_AUGMENT_STYLES = ("cifar", "fine-grained", "crop")
# The bounded canvas of RandomResizedCrop datasets, relative to the input size: 288 px at 224.
BOUNDED_RATIO = 288 / 224
# Share of the GPU's memory the decoded images may take (the model, optimizer and activations need the rest).
DEVICE_SHARE = 0.5


def pass_geometries(style: str, image_size: int) -> Dict[str, Tuple[str, Optional[Geometry]]]:
    """pass -> (split name, cache geometry; None: the originals, decoded in memory)."""
    test = Geometry("center", image_size)
    if style == "fine-grained":
        return {"train": ("train", Geometry("square", round(image_size * 300 / 224))),
                "statistics": ("train", test), "test": ("test", test)}
    if style == "crop":
        return {"train": ("train", Geometry("bounded", round(image_size * BOUNDED_RATIO))),
                "statistics": ("train", test), "test": ("test", test)}
    return {"train": ("train", None), "statistics": ("train", None), "test": ("test", None)}


def _original_bytes(split) -> int:
    """Bytes of a split's originals held as uint8 (all assumed the size of the first, as CIFAR's are)."""
    if not len(split):
        return 0
    if hasattr(split, "images"):
        return int(split.images.nbytes)
    with Image.open(split.files[0]) as image:
        width, height = image.size
    return len(split) * width * height * 3


def device_cost(data: DatasetSplits, image_size: int) -> Tuple[int, int]:
    """(bytes held on the device, bytes still to write to disk) for the on-device path of ``data``."""
    held, to_write, seen = 0, 0, set()
    for split_name, geometry in pass_geometries(data.transform_style, image_size).values():
        if (split_name, geometry) in seen:
            continue
        seen.add((split_name, geometry))
        split = getattr(data, split_name)
        if geometry is None:
            held += _original_bytes(split)
            continue
        held += geometry.nbytes(len(split))
        if open_cache(split, geometry) is None:
            to_write += geometry.nbytes(len(split))
    return held, to_write


def why_not_on_device(data: DatasetSplits, image_size: int, device: torch.device) -> Optional[str]:
    """None when the decoded images fit (disk for the caches, device memory for all of them), else the reason."""
    style = data.transform_style
    if style != "cifar" and not all(isinstance(s, FileSplit) for s in (data.train, data.test)):
        return f"{data.name}'s images are not files"
    held, to_write = device_cost(data, image_size)
    if to_write:
        folder = cache_folder()
        probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
        free = shutil.disk_usage(probe).free
        if to_write > free:
            return (f"the decoded images of {data.name} need {to_write / 1e9:.1f} GB in {folder}, "
                    f"{free / 1e9:.1f} GB free (set SLCA_DATA_ROOT elsewhere)")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = min(DEVICE_SHARE * total, free)
        if held > budget:
            return (f"the decoded images of {data.name} need {held / 1e9:.1f} GB of GPU memory, "
                    f"{budget / 1e9:.1f} GB available to them")
    return None
