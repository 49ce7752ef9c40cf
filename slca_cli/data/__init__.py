"""Dataset registry: name -> adapter that returns DatasetSplits from a data root."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..errors import SlcaError
from . import cars196, cub200, imagenet_r
from .archives import data_home, locate_dataset
from .base import DatasetSplits, RemappedSubset, image_folder_splits
from .cifar100 import LAYOUT as CIFAR100_LAYOUT
from .cifar100 import cifar100_splits
from .digits import digits_splits
from .screening import drop_unreadable
from .subset import check_classes, parse_classes, select_classes
from .synthetic import NATIVE_SIZE, synthetic_splits
from .transforms import build_tensor_transforms, build_transforms

__all__ = ["DATASETS", "DatasetInfo", "DatasetSplits", "RemappedSubset", "default_data_root", "load_dataset",
           "attach_transforms"]

FOLDER_LAYOUT = "train/<class>/* and test/<class>/* (or an archive holding them)"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    layout: str
    needs_root: bool
    loader: Callable[..., DatasetSplits]
    # (classes, train images, test images) of the full benchmark, as the paper uses it.
    expected: Optional[Tuple[int, int, int]] = None


def _synthetic(root, num_classes, train_per_class, test_per_class):
    return synthetic_splits(num_classes or 20, train_per_class or 40, test_per_class or 20)


def _folder(root, num_classes, train_per_class, test_per_class):
    def either(folder: Path) -> bool:  # a lone train/ or test/ still selects the folder, to name what is missing
        return (folder / "train").is_dir() or (folder / "test").is_dir()

    _, folder, _ = locate_dataset("folder", root, {"folders": either}, FOLDER_LAYOUT)
    return image_folder_splits("folder", folder, "crop", train_per_class, test_per_class)


def _on_disk(splits: Callable[..., DatasetSplits]) -> Callable[..., DatasetSplits]:
    """A loader of the registry's signature for a benchmark whose classes are fixed on disk."""
    def loader(root, num_classes, train_per_class, test_per_class):
        return splits(root, train_per_class, test_per_class)
    return loader


def _digits(root, num_classes, train_per_class, test_per_class):
    return digits_splits(train_per_class, test_per_class)


DATASETS: Dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo("synthetic", "generated colour/texture classes, any number (--num-classes)",
                             "nothing on disk: generated on the fly", False, _synthetic),
    "cifar100": DatasetInfo("cifar100", "Split CIFAR-100: 100 classes, 10 tasks of 10, 50,000 / 10,000 images",
                            CIFAR100_LAYOUT + "; downloaded by torchvision when online", True, _on_disk(cifar100_splits),
                            (100, 50_000, 10_000)),
    "imagenet-r": DatasetInfo("imagenet-r", "Split ImageNet-R: 200 classes, 10 tasks of 20, our fixed 80/20 split "
                              "(24,000 / 6,000)", imagenet_r.LAYOUT, True, _on_disk(imagenet_r.imagenet_r_splits),
                              (200, 24_000, 6_000)),
    "cub200": DatasetInfo("cub200", "Split CUB-200-2011: 200 classes, 10 tasks of 20, official split "
                          "(5,994 / 5,794)", cub200.LAYOUT + "; fetched from its hub mirror when online", True,
                          _on_disk(cub200.cub200_splits), (200, 5_994, 5_794)),
    "cars196": DatasetInfo("cars196", "Split Cars-196: 196 classes, 9 tasks of 20 + 16, official split "
                           "(8,144 / 8,041)", cars196.LAYOUT + "; fetched from its hub mirror when online", True,
                           _on_disk(cars196.cars196_splits), (196, 8_144, 8_041)),
    "digits": DatasetInfo("digits", "scikit-learn's handwritten digits: 1,797 real 8x8 images, 10 classes "
                          "(about 1,200 train / 600 test), shipped inside scikit-learn", "nothing to download: "
                          "read from the installed scikit-learn", False, _digits),
    "folder": DatasetInfo("folder", "your own images: class folders under train/ and test/",
                          FOLDER_LAYOUT + " (required: --data-root)", True, _folder),
}


# The transforms each dataset's adapter gives its splits (transforms.build_transforms), known without its data:
# `slca predict` and `slca export` preprocess new images as the run's test images were.
TRANSFORM_STYLES = {"synthetic": "tensor", "cifar100": "cifar", "imagenet-r": "crop", "cub200": "fine-grained",
                    "cars196": "fine-grained", "digits": "digits", "folder": "crop"}


def dataset_transform_style(name: str) -> str:
    if name not in TRANSFORM_STYLES:
        raise SlcaError(f"unknown dataset '{name}' in the run's config; it was written by another version of slca")
    return TRANSFORM_STYLES[name]


def default_data_root(name: str) -> Path:
    """$SLCA_DATA_ROOT/<name>, else ~/.cache/slca/data/<name>."""
    return data_home() / name


def load_dataset(name: str, data_root: Optional[str], num_classes: Optional[int] = None,
                 train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                 skip_bad_images: bool = False, classes: Optional[str] = None) -> DatasetSplits:
    """The dataset's splits; with ``skip_bad_images`` every image is decoded first and unreadable ones are left
    out (and listed in ``records``), so no label ever shifts; ``classes`` (--classes, e.g. "50-99"): those class
    ids only, renumbered 0..N-1 (subset.py). Generated data (synthetic) without --num-classes is generated up to
    the largest id given (a class's images do not depend on how many classes are generated)."""
    if name not in DATASETS:
        raise SlcaError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)} (see `slca datasets`)")
    info = DATASETS[name]
    if num_classes is not None and name != "synthetic":
        raise SlcaError(f"--num-classes applies to --dataset synthetic only; {name} has its classes on disk")
    if num_classes is not None and num_classes < 1:
        raise SlcaError(f"--num-classes must be at least 1, got {num_classes}")
    ids = parse_classes(classes) if classes is not None else None
    if ids is not None and name == "synthetic" and num_classes is None:
        num_classes = ids[-1] + 1
    root = None
    if info.needs_root:
        if data_root is None and name == "folder":
            raise SlcaError("--dataset folder needs --data-root DIR holding train/<class>/* and test/<class>/*")
        root = Path(data_root).expanduser() if data_root else default_data_root(name)
        if data_root and not root.exists():
            raise SlcaError(f"--data-root {data_root} does not exist; expected {info.layout}")
    data = info.loader(root, num_classes, train_per_class, test_per_class)
    if ids is not None:
        check_classes(ids, data.num_classes, name)  # before screening decodes every image
    data = drop_unreadable(data) if skip_bad_images else data
    return select_classes(data, ids) if ids is not None else data


def attach_transforms(data: DatasetSplits, image_size: int, mean, std) -> None:
    """Give both splits the protocol's transforms for this dataset at ``image_size``."""
    if data.transform_style == "tensor":
        data.set_transforms(*build_tensor_transforms(image_size, NATIVE_SIZE, mean, std))
    else:
        data.set_transforms(*build_transforms(data.transform_style, image_size, mean, std))
