"""scikit-learn's digits written as image folders (train/<digit>/*.png, test/<digit>/*.png): real images for the
tests of predict, export and continuing a run."""
from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_folders(root: Path, digits, train_per_class: int = 8, test_per_class: int = 4) -> Path:
    """The first images of each digit in the fixed split `--dataset digits` uses, as 8x8 greyscale PNGs."""
    from sklearn.datasets import load_digits

    from slca_cli.data.digits import split_indices
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
