"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images of 10 classes that ship inside the installed
scikit-learn package, so a real continual-learning run needs no download (``slca demo``)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import SlcaError
from .base import ArraySplit, DatasetSplits, cap_per_class

CLASS_NAMES = [str(d) for d in range(10)]


class DigitsSplit(ArraySplit):
    def describe(self, index: int) -> str:
        return f"digits/{self.ids[index]}"


def split_indices(labels: np.ndarray, test_every: int = 3):
    """A fixed stratified split: within each class, every ``test_every``-th image (in stored order) is a test
    image, the rest train (about 1,200 train / 600 test). It never depends on the run's seed."""
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.extend(members[::test_every])
        train.extend(np.setdiff1d(members, members[::test_every]))
    return np.sort(np.array(train)), np.sort(np.array(test))


def digits_splits(train_per_class: Optional[int], test_per_class: Optional[int]) -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SlcaError("--dataset digits reads scikit-learn's bundled digits: pip install scikit-learn") from None
    bunch = load_digits()
    # 0..16 grey levels -> 0..255, replicated to RGB so every backbone takes them.
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=3)
    labels = bunch.target.astype(int)
    splits = []
    for indices, cap in zip(split_indices(labels), (train_per_class, test_per_class)):
        keep = indices[cap_per_class(labels[indices].tolist(), cap)]
        split = DigitsSplit(rgb[keep], labels[keep].tolist())
        split.ids = keep.tolist()
        splits.append(split)
    return DatasetSplits("digits", CLASS_NAMES, splits[0], splits[1], "digits", None)


def write_digit_folders(root, digits, train_per_class: Optional[int] = None,
                        test_per_class: Optional[int] = None):
    """The chosen digits of the same fixed split as image folders, ``root/train/<digit>/NNNN.png`` and
    ``root/test/<digit>/NNNN.png`` (8x8 greyscale, NNNN the image's index in scikit-learn's array): real images
    for `--dataset folder`, `slca predict` and continuing a run with classes that arrive later."""
    from pathlib import Path

    from PIL import Image
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SlcaError("the digits are read from scikit-learn's bundled copy: pip install scikit-learn") from None
    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(int)
    for split, indices, cap in zip(("train", "test"), split_indices(labels), (train_per_class, test_per_class)):
        for digit in digits:
            folder = Path(root) / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in [i for i in indices if labels[i] == digit][:cap]:
                Image.fromarray(grey[i]).save(folder / f"{i:04d}.png")
    return Path(root)
