"""ImageNet-R: 200 classes, 30,000 images in one folder of class folders, split 80/20 by us (as DualPrompt).

The split is a function of the sorted relative file list and a fixed seed only, never of the order a
filesystem lists files in, so it is the same on every machine; it is recorded in the run folder.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import SlcaError
from .archives import locate_dataset
from .base import (DatasetSplits, check_class_count, class_folders, file_splits, has_split_folders,
                   image_files, image_folder_splits)

NUM_CLASSES = 200
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
SPLIT_FILE = "imagenet-r-split.json"
LAYOUT = ("imagenet-r/<wnid>/*.jpg (the extracted imagenet-r.tar, 200 class folders), the imagenet-r.tar "
          "itself, or train/<wnid>/* and test/<wnid>/* already split")


@dataclass(frozen=True)
class Source:
    url: str
    md5: str
    filename: str


# The authors' address (github.com/hendrycks/imagenet-r); md5 as published with it.
SOURCE = Source("https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar", "a61312130a589d0ca1a8fca1f2bd3337",
                "imagenet-r.tar")


def split_positions(num_files: int, seed: int = SPLIT_SEED,
                    train_fraction: float = TRAIN_FRACTION) -> Tuple[List[int], List[int]]:
    """Positions (in the sorted file list) of the train and test files: a random permutation of all files
    (numpy's legacy RandomState, stable across numpy versions), the first ``round(train_fraction * n)`` train."""
    order = np.random.RandomState(seed).permutation(num_files)
    n_train = int(round(train_fraction * num_files))
    return sorted(int(i) for i in order[:n_train]), sorted(int(i) for i in order[n_train:])


def sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def split_record(relative_files: Sequence[str], seed: int = SPLIT_SEED,
                 train_fraction: float = TRAIN_FRACTION) -> Dict[str, Any]:
    """Our split of ImageNet-R's files (relative posix paths ``<wnid>/<file>``), with checksums to compare."""
    files = sorted(relative_files)
    train_pos, test_pos = split_positions(len(files), seed, train_fraction)
    train, test = [files[i] for i in train_pos], [files[i] for i in test_pos]
    return {"dataset": "imagenet-r", "format": "slca-split", "version": 1,
            "rule": "files sorted by relative path; numpy.random.RandomState(seed).permutation(n); "
                    "the first round(train_fraction * n) are train, the rest test",
            "seed": seed, "train_fraction": train_fraction, "num_files": len(files),
            "file_list_sha256": sha256_lines(files),
            "split_sha256": sha256_lines([f"train\t{f}" for f in train] + [f"test\t{f}" for f in test]),
            "train": train, "test": test}


def _class_folder_layout(folder: Path) -> bool:
    """One folder of class folders (not train/ and test/): ImageNet-R as its tar unpacks."""
    if has_split_folders(folder):
        return False
    classes = class_folders(folder)
    return len(classes) >= 2 and any(image_files(folder / c) for c in classes[:3])


def scan_single_folder(folder: Path) -> Tuple[List[str], List[str]]:
    """(class names sorted, relative paths ``<class>/<file>`` of every image, sorted)."""
    classes = class_folders(folder)
    files = []
    for name in classes:
        found = image_files(folder / name)
        if not found:
            raise SlcaError(f"class folder {folder / name} has no images; ImageNet-R has images in all "
                            f"{NUM_CLASSES} class folders: extract imagenet-r.tar again")
        files.extend(f"{name}/{p.name}" for p in found)
    return classes, sorted(files)


def imagenet_r_splits(root: Path, train_per_class: Optional[int], test_per_class: Optional[int]) -> DatasetSplits:
    layout, folder, _ = locate_dataset(
        "imagenet-r", root, {"single": _class_folder_layout, "split": has_split_folders}, LAYOUT,
        hints=("imagenet-r",),
        advice="; run `slca datasets prepare imagenet-r --data-root DIR` to download imagenet-r.tar (2 GB), or "
               f"put imagenet-r.tar from {SOURCE.url} there")
    if layout == "split":
        splits = image_folder_splits("imagenet-r", folder, "crop", train_per_class, test_per_class)
        splits.layout = "train/<wnid>/*, test/<wnid>/* (split already)"
        return check_class_count(splits, NUM_CLASSES, LAYOUT)
    classes, files = scan_single_folder(folder)
    record = split_record(files)
    index = {name: i for i, name in enumerate(classes)}

    def labelled(relative: List[str]):
        return [folder / f for f in relative], [index[f.split("/", 1)[0]] for f in relative]

    splits = file_splits("imagenet-r", folder, classes, labelled(record["train"]), labelled(record["test"]),
                         "crop", train_per_class, test_per_class,
                         f"one folder of class folders, split {TRAIN_FRACTION:.0%} train with seed {SPLIT_SEED}")
    splits.records[SPLIT_FILE] = record
    return check_class_count(splits, NUM_CLASSES, LAYOUT)
