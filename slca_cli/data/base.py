"""What every dataset adapter returns: two splits with labels in the dataset's own class ids."""
from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
            raise SlcaError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}; replace or remove it, or "
                            f"pass --skip-bad-images to leave unreadable images out") from None

    def describe(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def subset(self, indices: Sequence[int]) -> "FileSplit":
        return FileSplit(self.root, [self.files[i] for i in indices], [self.labels[i] for i in indices])


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
    layout: str = ""
    # Files for the run folder (name -> JSON content), e.g. ImageNet-R's split or the skipped images.
    records: Dict[str, Any] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)
    # A continued run's data (grow.py): its classes keep the order they were learned in, and each task records
    # which source (dataset or folder) it came from.
    class_order: Optional[List[int]] = None
    sources: Optional[List[Dict[str, Any]]] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_transforms(self, train: Callable, test: Callable) -> None:
        self.train.transform, self.test.transform = train, test

    def fingerprint(self, legacy: bool = False) -> str:
        """sha256 over the (item, label) lists of both splits: equal on every machine for the same data. Names are
        hashed in Unicode NFC form, so a macOS (NFD) copy has the checksum of the Linux one; ``legacy``: the raw
        names, as runs written before slca normalized them recorded (accepted on --resume, see matches)."""
        digest = hashlib.sha256()
        for split_name, split in (("train", self.train), ("test", self.test)):
            for i in range(len(split)):
                name = split.describe(i) if legacy else unicodedata.normalize("NFC", split.describe(i))
                # surrogateescape: file names that are not valid UTF-8 still hash (to their bytes)
                digest.update(f"{split_name}\t{name}\t{split.labels[i]}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def matches(self, recorded: str) -> bool:
        """Whether a recorded fingerprint is this data's, in today's form or the legacy (raw names) one."""
        return recorded == self.fingerprint() or recorded == self.fingerprint(legacy=True)


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


def has_split_folders(folder: Path) -> bool:
    """The image-folder layout: ``train/`` and ``test/`` side by side."""
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _list_folder(folder: Path) -> List[os.DirEntry]:
    """The entries of ``folder`` sorted by name; an unreadable folder is a SlcaError."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: unicodedata.normalize("NFC", e.name))  # one order for NFC and NFD
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


def class_name(folder_name: str) -> str:
    """A class folder's name in Unicode NFC form: macOS writes names decomposed (NFD), Linux keeps what it is given,
    so the same name copied between them is one class."""
    return unicodedata.normalize("NFC", folder_name)


def class_folders(folder: Path) -> List[str]:
    """Names of the class folders under ``folder`` as they are on disk, sorted by their NFC form (that order gives
    the class ids). Hidden folders and ``__MACOSX`` are skipped; a broken or looping link, or two names that differ
    only in Unicode form, is an error. Links are followed one level only, so loops cannot hang the scan."""
    names: dict = {}
    for entry in _list_folder(folder):
        if entry.name.startswith(".") or entry.name == "__MACOSX":
            continue
        kind = _kind(entry)
        if kind == "broken":
            raise SlcaError(f"{folder / entry.name} is a broken or looping link; fix it or remove it")
        if kind != "dir":
            continue  # loose files next to the class folders
        name = class_name(entry.name)
        if name in names:
            raise SlcaError(f"{folder} has two class folders named {name!r} (in different Unicode forms); rename "
                            f"or merge them")
        names[name] = entry.name
    return [names[k] for k in sorted(names)]


def image_files(folder: Path) -> List[Path]:
    """Image files directly in ``folder``, sorted by name. Left out: hidden files (``.x``, macOS ``._x``), other
    extensions, sub-folders. An image-named entry that is a broken or looping link, or a pipe, socket or device
    (opening it could block forever), is an error."""
    found = []
    for entry in _list_folder(folder):
        if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        kind = _kind(entry)
        if kind == "broken":
            raise SlcaError(f"{folder / entry.name} is a broken or looping link; fix it or remove it")
        if kind == "special":
            raise SlcaError(f"{folder / entry.name} is not a regular file (a pipe, socket or device); remove it")
        if kind == "file":
            found.append(folder / entry.name)
    return found


def check_class_count(splits: "DatasetSplits", expected: int, layout_hint: str) -> "DatasetSplits":
    """The benchmark's class count is part of its protocol (task sizes): anything else is the wrong folder."""
    if splits.num_classes != expected:
        raise SlcaError(f"{splits.root} holds {splits.num_classes} classes, {splits.name} has {expected} "
                        f"({layout_hint}); point --data-root at the full dataset, or use --dataset folder for "
                        f"other image folders")
    return splits


def scan_image_folder(split_dir: Path, flag_hint: str) -> Tuple[List[str], List[Path], List[int]]:
    """``split_dir/<class>/<image>`` -> (class names sorted, files, labels).

    Class names are compared in Unicode NFC form (macOS writes NFD), so the same name typed on two systems is one
    class. Skipped, by design: names starting with a dot (hidden, macOS ``._*`` files), loose files next to the class
    folders, sub-folders inside a class folder and files without an image extension. Errors: a class folder with
    no images, an image-named entry that is a broken or looping link or not a regular file. Links are followed one
    level only (no recursion), so link loops cannot hang the scan."""
    if not split_dir.is_dir():
        raise SlcaError(f"{split_dir} is not a folder; {flag_hint} must hold train/<class>/* and test/<class>/*")
    folders = class_folders(split_dir)
    classes = [class_name(f) for f in folders]
    if not classes:
        raise SlcaError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    files, labels = [], []
    for label, folder in enumerate(folders):
        found = image_files(split_dir / folder)
        if not found:
            raise SlcaError(f"class folder {split_dir / folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
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
    return file_splits(name, root, train_classes, (train_files, train_labels), (test_files, test_labels),
                       transform_style, train_per_class, test_per_class, "train/<class>/*, test/<class>/*")


def file_splits(name: str, root: Path, class_names: List[str], train: Tuple[List[Path], List[int]],
                test: Tuple[List[Path], List[int]], transform_style: str, train_per_class: Optional[int],
                test_per_class: Optional[int], layout: str) -> DatasetSplits:
    """DatasetSplits over image files, keeping at most the first ``*_per_class`` items of each class."""
    (train_files, train_labels), (test_files, test_labels) = train, test
    keep_train = cap_per_class(train_labels, train_per_class)
    keep_test = cap_per_class(test_labels, test_per_class)
    return DatasetSplits(name, list(class_names),
                         FileSplit(root, [train_files[i] for i in keep_train], [train_labels[i] for i in keep_train]),
                         FileSplit(root, [test_files[i] for i in keep_test], [test_labels[i] for i in keep_test]),
                         transform_style, str(root), layout)


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
