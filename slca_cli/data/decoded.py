"""Decoded-image caches: every image of a split decoded once (PIL, as the host path decodes it), taken through
the deterministic part of its transform, and stored as one uint8 array under ``$SLCA_DATA_ROOT/decoded/``.

The cache is keyed by the split's file list (root, relative paths, byte sizes, modification times) and its
geometry, so every run and seed on the same data reuses it, and any change to a file builds a new one. Three
geometries serve the protocol's transforms (transforms.py):

- ``square S``: ``Resize((S, S))`` (CUB / Cars training, before ``RandomCrop``): the host path's pixels exactly;
- ``center S``: ``Resize(round(S * 256 / 224)) + CenterCrop(S)`` (every test pass): the host path's pixels exactly;
- ``bounded S``: the original, shrunk (aspect kept, PIL bicubic) only when its longer side exceeds S, at the top
  left of an S x S canvas whose rest repeats the edge pixels, with its true (height, width) recorded (ImageNet-R
  and ``folder`` training, before ``RandomResizedCrop``). The crop is then drawn on the shrunk image: the same
  boxes relative to the image, read from fewer pixels when the original is larger than S.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ..errors import SlcaError
from .archives import data_home
from .base import FileSplit, LabelledSplit

FORMAT_VERSION = 1
BICUBIC = T.InterpolationMode.BICUBIC


@dataclass(frozen=True)
class Geometry:
    """How an image is stored: ``kind`` square, center or bounded, at ``size`` x ``size`` pixels."""

    kind: str
    size: int

    def describe(self) -> str:
        return f"{self.kind}-{self.size}"

    def render(self, image: Image.Image) -> Tuple[np.ndarray, Tuple[int, int]]:
        """(size x size x 3 uint8 pixels, (height, width) of the image inside them)."""
        image = image.convert("RGB")
        if self.kind == "square":
            image = T.Resize((self.size, self.size), interpolation=BICUBIC)(image)
        elif self.kind == "center":
            resize = round(self.size * 256 / 224)
            image = T.CenterCrop(self.size)(T.Resize(resize, interpolation=BICUBIC)(image))
        elif self.kind == "bounded":
            width, height = image.size
            if max(width, height) > self.size:
                scale = self.size / max(width, height)
                image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
            pixels = np.asarray(image, dtype=np.uint8)
            h, w = pixels.shape[:2]
            return np.pad(pixels, ((0, self.size - h), (0, self.size - w), (0, 0)), mode="edge"), (h, w)
        else:
            raise ValueError(f"unknown cache geometry {self.kind!r}")
        return np.array(image, dtype=np.uint8), (self.size, self.size)

    def nbytes(self, count: int) -> int:
        return count * self.size * self.size * 3


def cache_folder() -> Path:
    return data_home() / "decoded"


def cache_key(split: LabelledSplit, geometry: Geometry) -> str:
    """sha256 over the format version, the geometry and every file's (root, path, size, mtime): equal for the
    same files, different as soon as one file changes or moves."""
    digest = hashlib.sha256(f"slca-decoded {FORMAT_VERSION} {geometry.describe()}\n".encode())
    root = str(Path(split.root).resolve()) if isinstance(split, FileSplit) else ""
    digest.update(f"{root}\n".encode("utf-8", "surrogateescape"))
    for i in range(len(split)):
        stat = ""
        if isinstance(split, FileSplit):
            try:
                info = os.stat(split.files[i])
                stat = f"{info.st_size} {info.st_mtime_ns}"
            except OSError:
                stat = "missing"  # the build then names the file
        digest.update(f"{split.describe(i)}\t{stat}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


class _Rendered(Dataset):
    def __init__(self, split: LabelledSplit, geometry: Geometry):
        self.split, self.geometry = split, geometry

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        pixels, (h, w) = self.geometry.render(self.split.load(index))
        return torch.from_numpy(pixels), torch.tensor([h, w], dtype=torch.int32)


@dataclass
class DecodedImages:
    """A built cache: ``images`` (N, S, S, 3) uint8 (memory-mapped), ``sizes`` (N, 2) true (height, width)."""

    images: np.ndarray
    sizes: np.ndarray
    path: Path
    build_seconds: float = 0.0


def _paths(split: LabelledSplit, geometry: Geometry) -> Tuple[Path, Path]:
    key = cache_key(split, geometry)
    folder = cache_folder()
    return folder / f"{key}-{geometry.describe()}.npy", folder / f"{key}-{geometry.describe()}.json"


def open_cache(split: LabelledSplit, geometry: Geometry) -> Optional[DecodedImages]:
    """The cache of ``split`` at ``geometry`` when a complete one exists (its JSON is written last), else None."""
    array_path, meta_path = _paths(split, geometry)
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    expected = (len(split), geometry.size, geometry.size, 3)
    if tuple(images.shape) != expected or images.dtype != np.uint8 or len(meta.get("sizes", ())) != len(split):
        return None
    return DecodedImages(images, np.asarray(meta["sizes"], dtype=np.int64).reshape(-1, 2), array_path)


def build_cache(split: LabelledSplit, geometry: Geometry, workers: int = 0, log=None) -> DecodedImages:
    """Decode every image of ``split`` once (in parallel by ``workers``) into its cache, or open the one already
    built. Written as a temporary file and renamed, the JSON last, so a crash never leaves a partial cache."""
    found = open_cache(split, geometry)
    if found is not None:
        return found
    array_path, meta_path = _paths(split, geometry)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(array_path.with_suffix(".building")):
        found = open_cache(split, geometry)  # another process (a rank on this node) built it meanwhile
        if found is not None:
            return found
        return _build(split, geometry, array_path, meta_path, workers, log)


@contextmanager
def _build_lock(path: Path, poll_seconds: float = 1.0):
    """One builder per cache: the others wait for it. A lock whose process died on this machine is taken over."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _holder_is_dead(path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                continue
            time.sleep(poll_seconds)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        break
    try:
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _holder_is_dead(path: Path) -> bool:
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return False  # being written right now; look again next time
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _build(split: LabelledSplit, geometry: Geometry, array_path: Path, meta_path: Path, workers: int,
           log) -> DecodedImages:
    need = geometry.nbytes(len(split))
    free = shutil.disk_usage(array_path.parent).free
    if need > free:
        raise SlcaError(f"the decoded-image cache needs {need / 1e9:.1f} GB in {array_path.parent}, "
                        f"{free / 1e9:.1f} GB free; free space, set SLCA_DATA_ROOT elsewhere, or pass "
                        f"--augment-on-host")
    if log:
        log(f"decoding {len(split)} images once into {array_path.name} ({need / 1e9:.2f} GB, "
            f"{geometry.describe()})")
    started = time.perf_counter()
    temporary = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
    images = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8,
                                       shape=(len(split), geometry.size, geometry.size, 3))
    sizes = np.zeros((len(split), 2), dtype=np.int64)
    loader = DataLoader(_Rendered(split, geometry), batch_size=64, num_workers=workers)
    start = 0
    try:
        for pixels, hw in loader:
            images[start:start + len(pixels)] = pixels.numpy()
            sizes[start:start + len(pixels)] = hw.numpy()
            start += len(pixels)
        images.flush()
        del images
        os.replace(temporary, array_path)
    finally:
        if temporary.exists():
            temporary.unlink()
    seconds = time.perf_counter() - started
    meta = {"format": "slca-decoded", "version": FORMAT_VERSION, "geometry": geometry.describe(),
            "count": len(split), "build_seconds": round(seconds, 3), "sizes": sizes.tolist()}
    meta_temporary = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    meta_temporary.write_text(json.dumps(meta))
    os.replace(meta_temporary, meta_path)
    built = open_cache(split, geometry)
    built.build_seconds = seconds
    return built
