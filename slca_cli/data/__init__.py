"""Dataset registry: name -> adapter that returns DatasetSplits from a data root."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from ..errors import SlcaError
from .base import DatasetSplits, RemappedSubset, image_folder_splits
from .cifar100 import cifar100_splits
from .digits import digits_splits
from .synthetic import NATIVE_SIZE, synthetic_splits
from .transforms import build_tensor_transforms, build_transforms

__all__ = ["DATASETS", "DatasetInfo", "DatasetSplits", "RemappedSubset", "default_data_root", "load_dataset",
           "attach_transforms"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    layout: str
    needs_root: bool
    loader: Callable[..., DatasetSplits]


def _synthetic(root, num_classes, train_per_class, test_per_class):
    return synthetic_splits(num_classes or 20, train_per_class or 40, test_per_class or 20)


def _folder(root, num_classes, train_per_class, test_per_class):
    return image_folder_splits("folder", root, "crop", train_per_class, test_per_class)


def _cifar100(root, num_classes, train_per_class, test_per_class):
    return cifar100_splits(root, train_per_class, test_per_class)


def _digits(root, num_classes, train_per_class, test_per_class):
    return digits_splits(train_per_class, test_per_class)


DATASETS: Dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo("synthetic", "generated colour/texture classes, any number (--num-classes)",
                             "nothing on disk: generated on the fly", False, _synthetic),
    "cifar100": DatasetInfo("cifar100", "Split CIFAR-100: 100 classes, 10 tasks of 10",
                            "torchvision's cifar-100-python/ (downloaded when online) or train/<class>/*, "
                            "test/<class>/*", True, _cifar100),
    "digits": DatasetInfo("digits", "scikit-learn's handwritten digits: 1,797 real 8x8 images, 10 classes "
                          "(about 1,200 train / 600 test), shipped inside scikit-learn", "nothing to download: "
                          "read from the installed scikit-learn", False, _digits),
    "folder": DatasetInfo("folder", "your own images: class folders under train/ and test/",
                          "train/<class>/*, test/<class>/* (required: --data-root)", True, _folder),
}


def default_data_root(name: str) -> Path:
    """$SLCA_DATA_ROOT/<name>, else ~/.cache/slca/data/<name>."""
    base = os.environ.get("SLCA_DATA_ROOT") or Path.home() / ".cache" / "slca" / "data"
    return Path(base) / name


def load_dataset(name: str, data_root: Optional[str], num_classes: Optional[int] = None,
                 train_per_class: Optional[int] = None, test_per_class: Optional[int] = None) -> DatasetSplits:
    if name not in DATASETS:
        raise SlcaError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)} (see `slca datasets`)")
    info = DATASETS[name]
    if num_classes is not None and name != "synthetic":
        raise SlcaError(f"--num-classes applies to --dataset synthetic only; {name} has its classes on disk")
    if num_classes is not None and num_classes < 1:
        raise SlcaError(f"--num-classes must be at least 1, got {num_classes}")
    root = None
    if info.needs_root:
        if data_root is None and name == "folder":
            raise SlcaError("--dataset folder needs --data-root DIR holding train/<class>/* and test/<class>/*")
        root = Path(data_root).expanduser() if data_root else default_data_root(name)
        if data_root and not root.is_dir():
            raise SlcaError(f"--data-root {data_root} does not exist; expected {info.layout}")
    return info.loader(root, num_classes, train_per_class, test_per_class)


def attach_transforms(data: DatasetSplits, image_size: int, mean, std) -> None:
    """Give both splits the protocol's transforms for this dataset at ``image_size``."""
    if data.transform_style == "tensor":
        data.set_transforms(*build_tensor_transforms(image_size, NATIVE_SIZE, mean, std))
    else:
        data.set_transforms(*build_transforms(data.transform_style, image_size, mean, std))
