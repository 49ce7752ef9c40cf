"""Tiny copies of the benchmarks' real on-disk layouts: same files and structure, a few small images per class."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image


def image_bytes(shade: int, fmt: str = "JPEG", size: int = 8) -> bytes:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = shade % 256
    pixels[..., 1] = (7 * shade) % 256
    pixels[: size // 2, :, 2] = 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def imagenet_r_names(num_classes: int = 200) -> List[str]:
    """Relative paths ``<wnid>/<file>`` of the fake ImageNet-R: class i holds 3 + i % 5 images (1,000 in all),
    so classes differ in size as in the real one."""
    return [f"n{1000 + 7 * c:08d}/art_{j}.jpg" for c in range(num_classes) for j in range(3 + c % 5)]


def write_imagenet_r(root: Path, num_classes: int = 200) -> Path:
    """``root/imagenet-r/<wnid>/*.jpg`` as imagenet-r.tar unpacks (with its README.txt)."""
    folder = root / "imagenet-r"
    for name in imagenet_r_names(num_classes):
        write_file(folder / name, image_bytes(int(name[1:9]) // 7))
    (folder / "README.txt").write_text("ImageNet-R (fake)\n")
    return root


def cub_class_names(num_classes: int = 200) -> List[str]:
    return [f"{c + 1:03d}.Bird_{c + 1}" for c in range(num_classes)]


def write_cub(root: Path, num_classes: int = 200, per_class: int = 3, train_per_class: int = 2) -> Path:
    """``root/CUB_200_2011/`` with the official metadata files; images.txt lists class by class, with the
    first ``train_per_class`` images of each class marked 1 (train) in train_test_split.txt."""
    folder = root / "CUB_200_2011"
    images, split, labels = [], [], []
    image_id = 0
    for c, name in enumerate(cub_class_names(num_classes)):
        for j in range(per_class):
            image_id += 1
            relative = f"{name}/{name[4:]}_{j:04d}.jpg"
            write_file(folder / "images" / relative, image_bytes(c))
            images.append(f"{image_id} {relative}")
            split.append(f"{image_id} {1 if j < train_per_class else 0}")
            labels.append(f"{image_id} {c + 1}")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(cub_class_names(num_classes))))
    return root


def cars_class_names(num_classes: int = 196) -> List[str]:
    """Official-looking names, deliberately not in alphabetical order, one with a '/' as the real 'Ram C/V'."""
    names = [f"Make{(c * 37) % num_classes:03d} Model Sedan 2012" for c in range(num_classes)]
    names[5] = "Ram C/V Cargo Van Minivan 2012"
    return names


def _annotations(fnames: Sequence[str], classes: Sequence[int], with_class: bool = True) -> np.ndarray:
    """A (1, n) MATLAB struct array as the devkit stores it: bbox fields, class (left out in the shipped
    cars_test_annos.mat), fname."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    table = np.zeros((1, len(fnames)), dtype=[(f, "O") for f in fields])
    for i, (fname, cls) in enumerate(zip(fnames, classes)):
        values = [np.array([[v]], np.uint8) for v in (1, 1, 8, 8)] + ([np.array([[cls]], np.uint8)]
                                                                     if with_class else [])
        table[0, i] = tuple(values + [np.array([fname])])
    return table


def cars_split_lists(num_classes: int, per_split: Tuple[int, int]):
    """(file names, 1-based classes) of train and test, images numbered 00001.jpg on as in the devkit."""
    out = []
    for count in per_split:
        classes = [c + 1 for c in range(num_classes) for _ in range(count)]
        out.append(([f"{i + 1:05d}.jpg" for i in range(len(classes))], classes))
    return out


def write_cars_devkit(root: Path, num_classes: int = 196, per_split=(2, 1), nested: bool = False) -> Path:
    """devkit/cars_meta.mat, devkit/cars_train_annos.mat, devkit/cars_test_annos.mat (no labels, as shipped),
    cars_test_annos_withlabels.mat, cars_train/*.jpg, cars_test/*.jpg (``nested``: cars_train/cars_train/)."""
    from scipy.io import savemat

    names = cars_class_names(num_classes)
    (train_files, train_classes), (test_files, test_classes) = cars_split_lists(num_classes, per_split)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(train_files, train_classes)})
    savemat(root / "devkit" / "cars_test_annos.mat",
            {"annotations": _annotations(test_files, test_classes, with_class=False)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _annotations(test_files, test_classes)})
    for split, files, classes in (("cars_train", train_files, train_classes), ("cars_test", test_files, test_classes)):
        folder = root / split / split if nested else root / split
        for fname, cls in zip(files, classes):
            write_file(folder / fname, image_bytes(cls))
    return root


def write_cars_annos(root: Path, num_classes: int = 196, per_split=(2, 1)) -> Path:
    """The all-in-one layout: cars_annos.mat (relative_im_path, class, test) + car_ims/*.jpg."""
    from scipy.io import savemat

    names = cars_class_names(num_classes)
    rows = [(c + 1, t) for t, count in enumerate(per_split) for c in range(num_classes) for _ in range(count)]
    paths = [f"car_ims/{i + 1:06d}.jpg" for i in range(len(rows))]
    table = np.zeros((1, len(rows)), dtype=[(f, "O") for f in ("relative_im_path", "bbox_x1", "class", "test")])
    for i, ((cls, test), path) in enumerate(zip(rows, paths)):
        table[0, i] = (np.array([path]), np.array([[1]], np.uint8), np.array([[cls]], np.uint8),
                       np.array([[test]], np.uint8))
        write_file(root / path, image_bytes(cls))
    savemat(root / "cars_annos.mat", {"annotations": table, "class_names": np.array([names], dtype=object)})
    return root


def make_tar(archive: Path, folder: Path, arcname: str) -> Path:
    """``folder`` packed as ``arcname/`` into a .tar / .tgz, as the official archives are."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if archive.name.endswith(("gz", "tgz")) else "w"
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=arcname)
    return archive
