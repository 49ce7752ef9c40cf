"""Finding unreadable images before a run (``--skip-bad-images``), so that leaving them out never shifts a label."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from ..errors import SlcaError
from .base import DatasetSplits, FileSplit

SKIPPED_FILE = "skipped-images.json"


def image_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be decoded, or None. Decodes it fully (JPEGs at 1/8 scale: all their data is still
    read, so a truncated file is caught, at a fraction of the cost)."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except Exception as exc:  # PIL raises many kinds of errors for damaged files
        return f"{exc.__class__.__name__}: {exc}"


def find_unreadable(paths: Sequence[Path], workers: Optional[int] = None,
                    show_progress: bool = True) -> List[Tuple[int, str]]:
    """(position, reason) of every unreadable file in ``paths``; decoding runs in threads (PIL releases the GIL)."""
    from ..progress import iterate

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(iterate(pool.map(image_problem, paths, chunksize=64), "checking images", len(paths),
                               "image", enabled=show_progress))
    return [(i, reason) for i, reason in enumerate(results) if reason is not None]


def drop_unreadable(data: DatasetSplits, show_progress: bool = True) -> DatasetSplits:
    """``data`` without its unreadable images; each left-out file is listed (path, split, class, reason) in
    ``data.skipped`` and in the run-folder record ``skipped-images.json``."""
    entries = []
    for split_name in ("train", "test"):
        split = getattr(data, split_name)
        if not isinstance(split, FileSplit):
            continue  # images held in memory (CIFAR pickles) were decoded already
        bad = dict(find_unreadable(split.files, show_progress=show_progress))
        if not bad:
            continue
        for i, reason in sorted(bad.items()):
            entries.append({"path": split.describe(i), "split": split_name,
                            "class": data.class_names[split.labels[i]], "reason": reason})
        setattr(data, split_name, split.subset([i for i in range(len(split)) if i not in bad]))
    empty = sorted(set(range(data.num_classes)) - set(data.train.labels))
    if empty:
        raise SlcaError(f"every training image of class '{data.class_names[empty[0]]}' is unreadable "
                        f"({len(empty)} such classes); replace the files or remove the class folder")
    data.skipped = [e["path"] for e in entries]
    data.records[SKIPPED_FILE] = {"root": data.root, "count": len(entries), "images": entries}
    return data
