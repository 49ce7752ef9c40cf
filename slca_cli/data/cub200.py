"""CUB-200-2011: 200 bird classes, the official train_test_split.txt (5,994 train / 5,794 test images)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from ..errors import SlcaError
from .archives import locate_dataset
from .base import DatasetSplits, check_class_count, file_splits, has_split_folders, image_folder_splits
from .class_names import CUB200
from .hub_mirror import Mirror, Row, image_suffix

NUM_CLASSES = 200
OFFICIAL_FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt")
LAYOUT = ("CUB_200_2011/ as in the official CUB_200_2011.tgz (images.txt, train_test_split.txt, "
          "image_class_labels.txt, classes.txt, images/<class>/*.jpg), the .tgz itself, or train/<class>/* and "
          "test/<class>/*")
HOME = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
FOLDER = "CUB_200_2011"

# The hub copy `slca datasets prepare cub200` fetches: parquet shards (image bytes + label, the class names in the
# schema), 5,994 / 5,794 rows, i.e. the official train_test_split.txt (CONTRIBUTING.md, "Benchmark mirrors").
# Pinned to the commit whose data files were uploaded (c1492c7) plus a README edit; list_sha256 not recorded yet.
MIRROR = Mirror("cub200", "bentrevett/caltech-ucsd-birds-200-2011", "1ef09e021b0b65b40337f6f285909656f407f6e0",
                {"train": ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"),
                 "test": ("data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet")},
                (NUM_CLASSES, 5_994, 5_794), class_names=tuple(f"{k:03d}.{name}" for k, name in enumerate(CUB200, 1)),
                size="about 1.1 GB")


def read_id_table(path: Path) -> Dict[int, str]:
    """``<id> <value>`` per line (CUB's metadata files) -> {id: value}."""
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise SlcaError(f"{path} line {number} is not '<id> <value>': {line[:60]!r}; extract "
                            f"CUB_200_2011.tgz again")
        table[int(parts[0])] = parts[1].strip()
    return table


def _official_layout(folder: Path) -> bool:
    return (folder / "images.txt").is_file() and (folder / "train_test_split.txt").is_file()


def official_splits(folder: Path, train_per_class: Optional[int], test_per_class: Optional[int]) -> DatasetSplits:
    """Images and split from the official metadata; class ids are the sorted class names' ranks (the official
    ids, since the names start with their 3-digit number)."""
    missing = [name for name in OFFICIAL_FILES if not (folder / name).is_file()]
    if missing:
        raise SlcaError(f"{folder} has images.txt but not {', '.join(missing)}; expected {LAYOUT}")
    images, is_train, image_class, classes = (read_id_table(folder / name) for name in OFFICIAL_FILES)
    names = sorted(classes.values())
    class_id = {cid: names.index(name) for cid, name in classes.items()}
    train: tuple = ([], [])
    test: tuple = ([], [])
    absent: List[str] = []
    for image_id in sorted(images):
        if image_id not in is_train or image_id not in image_class:
            raise SlcaError(f"image {image_id} of {folder / 'images.txt'} is not in train_test_split.txt or "
                            f"image_class_labels.txt; extract CUB_200_2011.tgz again")
        label = class_id.get(int(image_class[image_id]))
        if label is None:
            raise SlcaError(f"image {image_id} has class {image_class[image_id]}, which classes.txt does not list")
        path = folder / "images" / images[image_id]
        if not path.is_file():
            absent.append(str(path))
        files, labels = train if is_train[image_id] == "1" else test
        files.append(path)
        labels.append(label)
    if absent:
        raise SlcaError(f"{len(absent)} images listed in images.txt are missing (first: {absent[0]}); extract "
                        f"CUB_200_2011.tgz again")
    return file_splits("cub200", folder, names, train, test, "fine-grained", train_per_class, test_per_class,
                       "official CUB_200_2011 (images.txt + train_test_split.txt)")


def write_official_layout(folder: Path, names: List[str], rows: Iterator[Row]) -> List[Tuple[str, str, str]]:
    """The mirror's rows as ``folder`` = CUB_200_2011/: images/<class>/<file> and the four metadata files, image
    ids numbered train rows first, then test rows, each in the mirror's order (so the loader lists each split in the
    mirror's order). ``names``: the official folder names of the mirror's labels (checked against classes.txt's by
    hub_mirror.official_names). Returns the (split, images.txt path, class) list."""
    classes = list(names)
    entries, seen = [], set()
    for row in rows:
        fname = row.filename or f"{row.split}_{row.index:05d}{image_suffix(row.data)}"
        relative = f"{classes[row.label]}/{fname}"
        if relative in seen:
            raise SlcaError(f"{MIRROR.where}: two images are named {relative}; the mirror is damaged")
        seen.add(relative)
        path = folder / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(row.data)
        entries.append((row.split, relative, classes[row.label]))
    class_id = {name: i + 1 for i, name in enumerate(classes)}
    ids = range(1, len(entries) + 1)
    tables = {"classes.txt": [f"{i} {name}" for name, i in class_id.items()],
              "images.txt": [f"{i} {rel}" for i, (_, rel, _) in zip(ids, entries)],
              "image_class_labels.txt": [f"{i} {class_id[name]}" for i, (_, _, name) in zip(ids, entries)],
              "train_test_split.txt": [f"{i} {int(split == 'train')}" for i, (split, _, _) in zip(ids, entries)]}
    for filename, lines in tables.items():
        (folder / filename).write_text("\n".join(lines) + "\n")
    return [(split, f"images/{rel}", name) for split, rel, name in entries]


def cub200_splits(root: Path, train_per_class: Optional[int], test_per_class: Optional[int]) -> DatasetSplits:
    layout, folder, _ = locate_dataset(
        "cub200", root, {"official": _official_layout, "split": has_split_folders}, LAYOUT,
        hints=(FOLDER,), advice=f"; `slca datasets prepare cub200` fetches it when online, or download "
                                f"CUB_200_2011.tgz from {HOME} and put it there")
    if layout == "official":
        splits = official_splits(folder, train_per_class, test_per_class)
    else:
        splits = image_folder_splits("cub200", folder, "fine-grained", train_per_class, test_per_class)
    return check_class_count(splits, NUM_CLASSES, LAYOUT)
