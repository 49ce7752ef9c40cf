"""What every dataset adapter returns: two splits with labels in the dataset's own class ids."""
from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import SlcaError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class LabelledSplit(Dataset):
    """One split: ``labels[i]`` is the dataset's class id of item ``i``; ``load(i)`` gives the raw image."""

    labels: List[int]
    transform: Optional[Callable] = None

    def load(self, index: int):
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A stable name of item ``index`` (a relative path), for the data fingerprint."""
        return str(index)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class FileSplit(LabelledSplit):
    """Images on disk, one path per item."""

    def __init__(self, root: Path, files: Sequence[Path], labels: Sequence[int]):
        self.root, self.files, self.labels = Path(root), list(files), list(labels)

    def load(self, index: int):
        path = self.files[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except Exception as exc:  # PIL raises many kinds of errors for damaged files
            raise SlcaError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}; replace or remove the "
                            f"file") from None

    def describe(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()


class ArraySplit(LabelledSplit):
    """Images held in memory as an HWC uint8 array (torchvision's CIFAR pickle format)."""

    def __init__(self, images, labels: Sequence[int]):
        self.images, self.labels = images, list(labels)

    def load(self, index: int):
        return Image.fromarray(self.images[index])


@dataclass
class DatasetSplits:
    """A dataset ready for the protocol: class names sorted as their ids, train and test splits."""

    name: str
    class_names: List[str]
    train: LabelledSplit
    test: LabelledSplit
    transform_style: str
    root: Optional[str] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_transforms(self, train: Callable, test: Callable) -> None:
        self.train.transform, self.test.transform = train, test

    def fingerprint(self) -> str:
        """sha256 over the (item, label) lists of both splits: equal on every machine for the same data."""
        digest = hashlib.sha256()
        for split_name, split in (("train", self.train), ("test", self.test)):
            for i in range(len(split)):
                # surrogateescape: file names that are not valid UTF-8 still hash (to their bytes)
                digest.update(f"{split_name}\t{split.describe(i)}\t{split.labels[i]}\n".encode("utf-8",
                                                                                          "surrogateescape"))
        return digest.hexdigest()


def cap_per_class(labels: Sequence[int], cap: Optional[int]) -> List[int]:
    """Indices keeping the first ``cap`` items of each class, in their stored order."""
    if cap is None:
        return list(range(len(labels)))
    seen: dict = {}
    keep = []
    for i, label in enumerate(labels):
        if seen.get(label, 0) < cap:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return keep


def _list_folder(folder: Path) -> List[os.DirEntry]:
    """The entries of ``folder`` sorted by name; an unreadable folder is a SlcaError."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        raise SlcaError(f"cannot list {folder} ({exc.strerror or exc.__class__.__name__}); make it readable") from None


def _kind(entry: os.DirEntry) -> str:
    """dir, file (regular, links followed), broken (dangling or looping link) or special (pipe, socket, device)."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:  # a link loop raises ELOOP
        return "broken"
    return "broken" if entry.is_symlink() else "special"


def scan_image_folder(split_dir: Path, flag_hint: str) -> Tuple[List[str], List[Path], List[int]]:
    """``split_dir/<class>/<image>`` -> (class names sorted, files, labels).

    Class names are compared in Unicode NFC form (macOS writes NFD), so the same name typed on two systems is one
    class. Skipped, by design: names starting with a dot (hidden, macOS ``._*`` files), loose files next to the class
    folders, sub-folders inside a class folder and files without an image extension. Errors: a class folder with
    no images, an image-named entry that is a broken or looping link or not a regular file. Links are followed one
    level only (no recursion), so link loops cannot hang the scan."""
    if not split_dir.is_dir():
        raise SlcaError(f"{split_dir} is not a folder; {flag_hint} must hold train/<class>/* and test/<class>/*")
    folders: dict = {}
    for entry in _list_folder(split_dir):
        if entry.name.startswith("."):
            continue
        kind = _kind(entry)
        if kind == "broken":
            raise SlcaError(f"{split_dir / entry.name} is a broken or looping link; fix it or remove it")
        if kind != "dir":
            continue
        name = unicodedata.normalize("NFC", entry.name)
        if name in folders:
            raise SlcaError(f"{split_dir} has two class folders named {name!r} (in different Unicode forms); "
                            f"rename or merge them")
        folders[name] = split_dir / entry.name
    classes = sorted(folders)
    if not classes:
        raise SlcaError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        for entry in _list_folder(folders[name]):
            if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            kind = _kind(entry)
            if kind == "broken":
                raise SlcaError(f"{folders[name] / entry.name} is a broken or looping link; fix it or remove it")
            if kind == "special":
                raise SlcaError(f"{folders[name] / entry.name} is not a regular file (a pipe, socket or device); "
                                f"remove it")
            if kind == "file":
                found.append(folders[name] / entry.name)
        if not found:
            raise SlcaError(f"class folder {folders[name]} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add images or remove the folder")
        files.extend(found)
        labels.extend([label] * len(found))
    return classes, files, labels


def image_folder_splits(name: str, root: Path, transform_style: str, train_per_class: Optional[int],
                        test_per_class: Optional[int]) -> DatasetSplits:
    """The image-folder layout: ``root/train/<class>/*`` and ``root/test/<class>/*``."""
    hint = f"--data-root {root}"
    missing = [name for name in ("train", "test") if not (root / name).is_dir()]
    if missing:
        raise SlcaError(f"{root} has no {' or '.join(m + '/' for m in missing)} folder; {hint} must hold "
                        f"train/<class>/* and test/<class>/*")
    train_classes, train_files, train_labels = scan_image_folder(root / "train", hint)
    test_classes, test_files, test_labels = scan_image_folder(root / "test", hint)
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise SlcaError(f"train/ and test/ under {root} have different class folders "
                        f"(only in train: {only_train[:5]}, only in test: {only_test[:5]}); make them match")
    keep_train = cap_per_class(train_labels, train_per_class)
    keep_test = cap_per_class(test_labels, test_per_class)
    train = FileSplit(root, [train_files[i] for i in keep_train], [train_labels[i] for i in keep_train])
    test = FileSplit(root, [test_files[i] for i in keep_test], [test_labels[i] for i in keep_test])
    return DatasetSplits(name, train_classes, train, test, transform_style, str(root))


class RemappedSubset(Dataset):
    """Items of ``split`` whose class is in ``keep``, with labels remapped to their class-order position;
    ``transform`` replaces the split's own (class statistics read train images with the test transform)."""

    def __init__(self, split: LabelledSplit, remap: Sequence[int], keep: Sequence[int],
                 transform: Optional[Callable] = None):
        keep_set = set(keep)
        self.split, self.transform = split, transform
        self.remap = list(remap)
        self.indices = [i for i, label in enumerate(split.labels) if self.remap[label] in keep_set]
        self.labels = [self.remap[split.labels[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        if self.transform is None:
            image, _ = self.split[self.indices[index]]
        else:
            image = self.transform(self.split.load(self.indices[index]))
        return image, torch.tensor(self.labels[index])
