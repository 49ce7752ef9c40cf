"""CIFAR-100 from torchvision's pickle folder (downloaded when online) or the image-folder layout, or an archive
of either (e.g. cifar100-png.tar.gz), extracted into the cache on first use."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import SlcaError
from .archives import MissingData, locate_dataset
from .base import ArraySplit, DatasetSplits, check_class_count, cap_per_class, has_split_folders, image_folder_splits

NUM_CLASSES = 100
LAYOUT = ("train/<class>/*.png and test/<class>/*.png (100 class folders), torchvision's cifar-100-python/ "
          "folder, or an archive of either (e.g. cifar100-png.tar.gz)")


def _has_pickles(folder: Path) -> bool:
    return (folder / "cifar-100-python" / "meta").is_file()


def _is_pickle_folder(folder: Path) -> bool:
    return folder.name == "cifar-100-python" and (folder / "meta").is_file()


def cifar100_splits(root: Path, train_per_class: Optional[int], test_per_class: Optional[int],
                    download: bool = True) -> DatasetSplits:
    try:
        layout, folder, _ = locate_dataset(
            "cifar100", root, {"folders": has_split_folders, "pickles": _has_pickles, "inside": _is_pickle_folder},
            LAYOUT)
    except MissingData:
        if not download:
            raise
        layout, folder = "download", root
    if layout == "folders":
        splits = image_folder_splits("cifar100", folder, "cifar", train_per_class, test_per_class)
        return check_class_count(splits, NUM_CLASSES, LAYOUT)
    if layout == "inside":
        folder = folder.parent
    from torchvision.datasets import CIFAR100

    try:
        train = CIFAR100(str(folder), train=True, download=layout == "download")
        test = CIFAR100(str(folder), train=False, download=False)
    except Exception as exc:
        raise SlcaError(f"CIFAR-100 is not under {folder} and could not be downloaded ({exc.__class__.__name__}); "
                        f"put torchvision's cifar-100-python/ folder or train/<class>/*.png + test/<class>/*.png "
                        f"there, or point --data-root at them") from None
    keep_train = cap_per_class(train.targets, train_per_class)
    keep_test = cap_per_class(test.targets, test_per_class)
    return DatasetSplits(
        "cifar100", list(train.classes),
        ArraySplit(train.data[keep_train], [train.targets[i] for i in keep_train]),
        ArraySplit(test.data[keep_test], [test.targets[i] for i in keep_test]),
        "cifar", str(folder), "torchvision cifar-100-python/")
