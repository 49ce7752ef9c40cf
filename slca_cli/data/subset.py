"""`--classes`: a run on some of a dataset's classes (e.g. CIFAR-100's 50-99 after pre-training on 0-49), given as
the dataset's own class ids and renumbered 0..N-1 in increasing id order before the run's class order is drawn."""
from __future__ import annotations

import dataclasses
import re
from typing import List, Sequence

from ..errors import SlcaError
from .base import ArraySplit, DatasetSplits, FileSplit, LabelledSplit

_PART = re.compile(r"^(\d+)(?:-(\d+))?$")
EXAMPLE = "ids and ranges such as 50-99 or 0-9,20,30-39"


def parse_classes(text: str) -> List[int]:
    """'50-99', '0-9,20,30-39' -> the sorted, distinct class ids; a SlcaError naming the bad part otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise SlcaError(f"--classes is empty; give {EXAMPLE}, or leave the flag out for every class")
    ids = set()
    for part in parts:
        match = _PART.match(part)
        if not match:
            raise SlcaError(f"--classes: '{part}' is not a class id or range; give {EXAMPLE}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise SlcaError(f"--classes: the range {part} is reversed; write {last}-{first}")
        ids.update(range(first, last + 1))
    return sorted(ids)


def format_classes(ids: Sequence[int]) -> str:
    """The canonical text of a set of ids (consecutive ids as ranges): what config.json records, so that two
    spellings of the same classes are the same experiment."""
    runs: List[List[int]] = []
    for c in sorted(set(ids)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def canonical_classes(text: str) -> str:
    return format_classes(parse_classes(text))


def check_classes(ids: Sequence[int], num_classes: int, dataset: str) -> None:
    outside = [c for c in ids if c >= num_classes]
    if outside:
        raise SlcaError(f"--classes {format_classes(outside)}: {dataset} has {num_classes} classes (ids 0-"
                        f"{num_classes - 1}); give ids below {num_classes}")


class ClassSubsetSplit(LabelledSplit):
    """Some items of a split, relabelled; each item loads (and is named) as it is in the whole split."""

    def __init__(self, split: LabelledSplit, indices: Sequence[int], labels: Sequence[int]):
        self.split, self.indices, self.labels = split, list(indices), list(labels)

    def load(self, index: int):
        return self.split.load(self.indices[index])

    def describe(self, index: int) -> str:
        return self.split.describe(self.indices[index])


def _pick(split: LabelledSplit, new_id: dict) -> LabelledSplit:
    keep = [i for i, label in enumerate(split.labels) if label in new_id]
    labels = [new_id[split.labels[i]] for i in keep]
    if type(split) is FileSplit:  # stays a FileSplit: the decoded-image cache keys on its files
        return FileSplit(split.root, [split.files[i] for i in keep], labels)
    if type(split) is ArraySplit:  # stays an ArraySplit: the device path uploads its array as it is
        return ArraySplit(split.images[keep], labels)
    return ClassSubsetSplit(split, keep, labels)


def select_classes(data: DatasetSplits, ids: Sequence[int]) -> DatasetSplits:
    """The splits of classes ``ids`` only, class ``ids[k]`` renamed k (names and records kept)."""
    check_classes(ids, data.num_classes, data.name)
    new_id = {c: k for k, c in enumerate(ids)}
    return dataclasses.replace(data, class_names=[data.class_names[c] for c in ids], train=_pick(data.train, new_id),
                               test=_pick(data.test, new_id))
