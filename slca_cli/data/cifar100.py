"""CIFAR-100 from torchvision's pickle folder (downloaded when online) or the image-folder layout."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import SlcaError
from .base import ArraySplit, DatasetSplits, cap_per_class, image_folder_splits


def cifar100_splits(root: Path, train_per_class: Optional[int], test_per_class: Optional[int],
                    download: bool = True) -> DatasetSplits:
    if (root / "train").is_dir() and (root / "test").is_dir():
        splits = image_folder_splits("cifar100", root, "cifar", train_per_class, test_per_class)
        if splits.num_classes != 100:
            raise SlcaError(f"{root} holds {splits.num_classes} class folders, CIFAR-100 has 100; "
                            f"use --dataset folder for other image folders")
        return splits
    from torchvision.datasets import CIFAR100

    have_pickles = (root / "cifar-100-python").is_dir()
    try:
        train = CIFAR100(str(root), train=True, download=download and not have_pickles)
        test = CIFAR100(str(root), train=False, download=False)
    except Exception as exc:
        raise SlcaError(f"CIFAR-100 is not under {root} and could not be downloaded ({exc.__class__.__name__}); "
                        f"put torchvision's cifar-100-python/ folder or train/<class>/*.png + test/<class>/*.png "
                        f"there, or point --data-root at them") from None
    keep_train = cap_per_class(train.targets, train_per_class)
    keep_test = cap_per_class(test.targets, test_per_class)
    return DatasetSplits(
        "cifar100", list(train.classes),
        ArraySplit(train.data[keep_train], [train.targets[i] for i in keep_train]),
        ArraySplit(test.data[keep_test], [test.targets[i] for i in keep_test]),
        "cifar", str(root))
