"""`slca continue`: a finished run learns a new batch of classes later, exemplar-free. The new folder's classes
become the next task; the old classes are kept by their stored Gaussians (moved by the stored drift maps under
--drift-compensation), so the old training images are never needed. The continued run is a new run folder: the
finished tasks are copied into it (their state.json rewritten to the grown run), the original is only read.

A run that learned from several folders records them as ``sources`` in every task's state.json: which data each
task came from, with checksums, and whether its test images were there to be scored. `slca eval`, `--resume` and
the next continuation rebuild the data from them (``combined_data``)."""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .checkpoint import (MODEL_FILE, STATE_FILE, STATS_FILE, TaskState, atomic_write_json, complete_tasks,
                         intact_tasks, read_state, remove_path, sha256_file, state_digest,
                         task_dir_name)
from .data import TRANSFORM_STYLES, attach_transforms, load_dataset
from .data.screening import find_unreadable
from .data.base import DatasetSplits, LabelledSplit, class_name, image_folder_splits
from .errors import SlcaError
from .presets import RunConfig

Log = Callable[[str], None]


class ConcatSplit(LabelledSplit):
    """Several splits as one, each part's labels shifted by its offset (its classes' first dataset id)."""

    def __init__(self, parts: Sequence[Tuple[str, LabelledSplit, int]]):
        self.parts = list(parts)
        self.starts = [0]
        self.labels: List[int] = []
        for _, split, offset in self.parts:
            self.labels.extend(label + offset for label in split.labels)
            self.starts.append(self.starts[-1] + len(split))

    def _locate(self, index: int) -> Tuple[int, int]:
        part = bisect.bisect_right(self.starts, index) - 1
        return part, index - self.starts[part]

    def load(self, index: int):
        part, inner = self._locate(index)
        return self.parts[part][1].load(inner)

    def describe(self, index: int) -> str:
        part, inner = self._locate(index)
        return f"{self.parts[part][0]}/{self.parts[part][1].describe(inner)}"


def folder_checksums(data: DatasetSplits) -> Dict[str, str]:
    """A folder batch's file-list checksum (paths and labels, as every dataset's) and content checksum (sha256 of
    each file's bytes, in file-list order)."""
    content = hashlib.sha256()
    for split_name, split in (("train", data.train), ("test", data.test)):
        for i, path in enumerate(split.files):
            content.update(f"{split_name}\t{split.describe(i)}\t{sha256_file(path)}\n".encode("utf-8",
                                                                                            "surrogateescape"))
    return {"file_list_sha256": data.fingerprint(), "content_sha256": content.hexdigest()}


def original_source(state: TaskState) -> Dict[str, Any]:
    """The source of a run that was never continued: its dataset, as its config names it."""
    cfg = state.config
    by_id = dict(zip(state.class_order, class_names_of(state)))
    return {"kind": "dataset", "dataset": cfg.dataset, "data_root": cfg.data_root, "num_classes": cfg.num_classes,
            "class_names": [by_id[c] for c in range(cfg.num_classes)],
            "train_per_class": cfg.train_per_class, "test_per_class": cfg.test_per_class, "classes": cfg.classes,
            "skip_bad_images": cfg.skip_bad_images, "tasks": list(range(1, cfg.num_tasks + 1)),
            "file_list_sha256": state.data_fingerprint, "scored": True}


def run_sources(state: TaskState) -> List[Dict[str, Any]]:
    return [dict(s) for s in state.raw["sources"]] if "sources" in state.raw else [original_source(state)]


def _load_source(source: Dict[str, Any], style: str, data_root: Optional[str]) -> DatasetSplits:
    """One source's splits (labels in its own ids), checked against its recorded file-list checksum."""
    if source["kind"] == "dataset":
        root = data_root if data_root is not None else source["data_root"]
        data = load_dataset(source["dataset"], root, source["num_classes"] if source["dataset"] == "synthetic"
                            else None, source["train_per_class"], source["test_per_class"],
                            bool(source["skip_bad_images"]), source.get("classes"))
        where = root or source["dataset"]
    else:
        data = image_folder_splits("folder", Path(source["path"]), style, None, None)
        where = source["path"]
    if not data.matches(source["file_list_sha256"]):
        raise SlcaError(f"the files under {where} differ from those the run used (file list checksum)")
    return data


def combined_data(sources: List[Dict[str, Any]], order: Sequence[int], image_size: int, mean, std,
                  data_root: Optional[str] = None) -> DatasetSplits:
    """The data of a continued run: the newest source's training images (the only ones a task still trains on),
    the test images of every source that was scored; dataset ids follow the sources' order. ``data_root``
    replaces the first source's root (where the original dataset is now)."""
    style = TRANSFORM_STYLES[sources[0]["dataset"]]
    names: List[str] = []
    train_parts, test_parts = [], []
    for i, source in enumerate(sources):
        offset = len(names)
        if source["scored"] or i == len(sources) - 1:
            data = _load_source(source, style, data_root if i == 0 else None)
            names.extend(data.class_names)
            if source["scored"]:
                test_parts.append((f"source-{i}", data.test, offset))
            if i == len(sources) - 1:
                train_parts.append((f"source-{i}", data.train, offset))
        else:
            names.extend(source["class_names"])
    data = DatasetSplits(sources[0]["dataset"], names, ConcatSplit(train_parts), ConcatSplit(test_parts), style,
                         None, "sources", class_order=list(order), sources=sources)
    attach_transforms(data, image_size, mean, std)
    return data


def data_for_state(state: TaskState, data_root: Optional[str]) -> DatasetSplits:
    """A continued run's data for `slca eval` and friends, from a task's recorded sources."""
    cfg = state.config
    return combined_data(state.raw["sources"], state.class_order, cfg.image_size, cfg.mean, cfg.std, data_root)


def finished_run(path: Path) -> Tuple[Path, TaskState]:
    """The seed folder and last task of a finished run (a seed folder, or its last task-NN/ folder)."""
    path = Path(path)
    if not path.is_dir():
        raise SlcaError(f"{path} is not a folder; give the seed-*/ folder of a finished run")
    seed_dir = path.parent if (path / STATE_FILE).exists() else path
    done, warnings = complete_tasks(seed_dir)
    if done == 0:
        raise SlcaError(f"{seed_dir} holds no finished task{' (' + warnings[0] + ')' if warnings else ''}; give "
                        f"the seed-*/ folder of a finished run")
    last = read_state(seed_dir / task_dir_name(done - 1))
    if seed_dir != path and path.resolve() != last.task_dir.resolve():
        raise SlcaError(f"{path} is not the last task of its run ({last.task_dir.name}); continue the seed folder "
                        f"{seed_dir}")
    if last.task + 1 < last.config.num_tasks:
        raise SlcaError(f"{seed_dir} has finished {last.task + 1} of its {last.config.num_tasks} tasks; finish it "
                        f"first (the same command with --resume), then continue it")
    return seed_dir, last


def check_target(seed_dir: Path, out_dir: Path) -> None:
    """The continued run goes to a new folder: never into the run being continued (its seed folders' parent),
    nor the run into it."""
    a, b = Path(seed_dir).resolve().parent, Path(out_dir).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise SlcaError(f"--out {out_dir.parent} overlaps the run being continued ({seed_dir}); the original run is "
                        f"only read: choose another --out")


def new_batch(folder: Path, learned: Sequence[str], style: str) -> Tuple[DatasetSplits, Dict[str, str]]:
    """The new folder's splits (``train/<class>/*``, ``test/<class>/*``) and checksums; a class already learned
    is refused (class-incremental: a task brings new classes only)."""
    if not Path(folder).exists():
        raise SlcaError(f"--data-root {folder} does not exist; give a folder holding train/<class>/* and "
                        f"test/<class>/* of the new classes")
    data = image_folder_splits("folder", Path(folder).resolve(), style, None, None)
    bad = find_unreadable(list(data.train.files) + list(data.test.files))
    if bad:
        position, reason = bad[0]
        path = (list(data.train.files) + list(data.test.files))[position]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise SlcaError(f"cannot read image {path} ({reason}){more}; replace or remove it before continuing "
                        f"(nothing was written)")
    known = {class_name(n): n for n in learned}
    again = [n for n in data.class_names if class_name(n) in known]
    if again:
        raise SlcaError(f"class {again[0]!r} of --data-root {folder} is already learned by this run"
                        f"{' (and ' + str(len(again) - 1) + ' more)' if len(again) > 1 else ''}; a continued run "
                        f"learns new classes only: remove train/{again[0]} and test/{again[0]} from the folder")
    return data, folder_checksums(data)


def grown_config(cfg: RunConfig, new_classes: int, execution: Dict[str, Any]) -> RunConfig:
    """The run's config with one more task; its recipe unchanged, its data read on the host."""
    if cfg.method == "dualprompt" and cfg.prompt_pool < cfg.num_tasks + 1:
        raise SlcaError(f"--method dualprompt keeps one E-prompt per task and this run's pool of {cfg.prompt_pool} "
                        f"is full; only a run trained with --prompt-pool larger than its tasks can be continued")
    per_task = cfg.prompt_pool // cfg.num_tasks
    if cfg.method == "coda-prompt" and (cfg.num_tasks + 1) * per_task > cfg.prompt_pool:
        raise SlcaError(f"--method coda-prompt gives each task {per_task} of its {cfg.prompt_pool} prompt components "
                        f"and none are left for a new task; a coda-prompt run cannot be continued")
    if cfg.method == "ease":
        raise SlcaError(f"--method ease builds one adapter and one feature subspace per task when the run starts "
                        f"({cfg.num_tasks} here), so its heads have no room for another task; an ease run cannot be "
                        f"continued")
    if cfg.method == "mos":
        raise SlcaError("--method mos allocates its adapters and class prototypes for the run's tasks when it starts; "
                        "a mos run cannot be continued (train a new run over all the classes)")
    return cfg.replace(num_classes=cfg.num_classes + new_classes, task_sizes=tuple(cfg.task_sizes) + (new_classes,),
                       weights=None, device_augment=False, **execution)


def copy_task(source: TaskState, run_dir: Path, state_update: Dict[str, Any], link: bool,
              previous_sha256: Optional[str]) -> str:
    """``run_dir/task-NN/``: the tensor files copied (or hard-linked) byte for byte, state.json rewritten to the
    grown run; written as ``.task-NN.partial/`` and renamed into place, as every task folder is."""
    name = source.task_dir.name
    partial = run_dir / f".{name}.partial"
    remove_path(partial)
    partial.mkdir(parents=True)
    for file_name in (MODEL_FILE, STATS_FILE):
        if link:
            try:
                os.link(source.task_dir / file_name, partial / file_name)
                continue
            except OSError:
                pass  # another file system: copy
        shutil.copyfile(source.task_dir / file_name, partial / file_name)
    state = dict(source.raw, **state_update)
    state["copied_from"] = {"task_dir": str(source.task_dir.resolve()),
                            "state_sha256": sha256_file(source.task_dir / STATE_FILE)}
    state.pop("previous_state_sha256", None)
    if previous_sha256 is not None:  # the chain of states (checkpoint.chain_problem) links the rewritten ones
        state["previous_state_sha256"] = previous_sha256
    state = json.loads(json.dumps(state))
    state["state_sha256"] = state_digest(state)  # sealed again: this is the grown run's state
    atomic_write_json(partial / STATE_FILE, state)
    final = run_dir / name
    remove_path(final)
    os.replace(partial, final)
    return state["state_sha256"]


@dataclass
class Continuation:
    """A checked plan: the run being continued, the grown config, the sources and data of the new run."""

    seed_dir: Path
    last: TaskState
    cfg: RunConfig
    sources: List[Dict[str, Any]]
    order: List[int]
    names: List[str]
    data: DatasetSplits
    new_folder: Path


def plan_continuation(run: Path, new_folder: Path, out_dir: Path, *, execution: Dict[str, Any],
                      data_root: Optional[str], log: Log) -> Continuation:
    """Every check of a continuation, reading only (nothing is written): the run is finished, --out is elsewhere,
    the new folder is readable and brings new classes, the old test images are there (or are noted as not)."""
    seed_dir, last = finished_run(run)
    check_target(seed_dir, out_dir)
    cfg = last.config
    style = TRANSFORM_STYLES[run_sources(last)[0]["dataset"]]
    if style == "tensor":
        raise SlcaError(f"{seed_dir} was trained on generated data (--dataset synthetic), whose transforms take no "
                        f"image files; continue a run trained on images")
    learned = class_names_of(last)
    batch, checksums = new_batch(new_folder, learned, style)
    grown = grown_config(cfg, batch.num_classes, execution)
    recorded = resumed_sources(out_dir)
    sources = []
    for i, source in enumerate(run_sources(last)):
        if recorded is not None and i < len(recorded) - 1:
            source = dict(source, scored=recorded[i]["scored"])  # --resume: scored as when the new task began
        try:
            if source["scored"]:
                _load_source(source, style, data_root if source["kind"] == "dataset" else None)
        except SlcaError as exc:
            if recorded is not None:
                raise SlcaError(f"--resume: {exc}; the continuation in {out_dir} scored them: restore the files "
                                f"(or --old-data-root)") from None
            source = dict(source, scored=False, not_scored_because=str(exc))
        sources.append(source)
    order = list(last.class_order) + list(range(cfg.num_classes, grown.num_classes))
    sources.append({"kind": "folder", "path": str(Path(new_folder).resolve()), "class_names": batch.class_names,
                    "tasks": [grown.num_tasks], "train_images": len(batch.train), "test_images": len(batch.test),
                    "scored": True, **checksums})
    if recorded is not None and [source_key(s) for s in recorded] != [source_key(s) for s in sources]:
        raise SlcaError(f"--resume: {out_dir} holds another continuation (not {seed_dir} with the classes of "
                        f"{new_folder}); choose another --out")
    data = combined_data(sources, order, grown.image_size, grown.mean, grown.std, data_root)
    if not all(s["scored"] for s in sources):
        skipped = [s.get("not_scored_because", "not scored") for s in sources if not s["scored"]]
        log(f"old classes: their test images are not there ({'; '.join(skipped)}); each task is scored on the test "
            f"images of the new classes only ({len(batch.test)} images)")
    else:
        log(f"old classes: scored on their test images as before ({len(data.test) - len(batch.test)} images), "
            f"beside the new classes' {len(batch.test)}")
    return Continuation(seed_dir, last, grown, sources, order, learned + list(batch.class_names), data,
                        Path(new_folder))


def source_key(source: Dict[str, Any]) -> Tuple:
    return source["kind"], source.get("path"), source.get("dataset"), source["file_list_sha256"]


def resumed_sources(out_dir: Path) -> Optional[List[Dict[str, Any]]]:
    """The sources an earlier attempt of this continuation recorded in ``out_dir``, or None (nothing there)."""
    for state, _ in intact_tasks(out_dir, []):
        return state.raw.get("sources", [])
    return None


def start_continuation(plan: Continuation, out_dir: Path, *, resume: bool, link: bool, log: Log) -> None:
    """Copy the finished tasks into ``out_dir`` (those not there yet) and write provenance.json; afterwards
    runner.run_seed(plan.cfg, seed, out_dir, ..., plan.data, resume=True) trains the new task."""
    existing, _ = complete_tasks(out_dir)
    if existing and not resume:
        raise SlcaError(f"{out_dir} already holds finished tasks; pass --resume to continue it or choose another "
                        f"--out")
    update = {"config": plan.cfg.to_dict(), "class_order": plan.order, "class_names": plan.names,
              "task_sizes": list(plan.cfg.task_sizes), "data_fingerprint": plan.data.fingerprint(),
              "sources": plan.sources}
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = None
    for state, _ in intact_tasks(plan.seed_dir, []):
        if state.task >= existing:
            previous = copy_task(state, out_dir, update, link, previous)
        else:
            previous = read_state(out_dir / task_dir_name(state.task)).raw.get("state_sha256")
    atomic_write_json(out_dir / "provenance.json", provenance(plan.seed_dir, plan.sources, plan.cfg))
    new = plan.sources[-1]["class_names"]
    log(f"continuing {plan.seed_dir} ({plan.last.config.num_tasks} tasks, {plan.last.config.num_classes} classes) "
        f"in {out_dir}: task {plan.cfg.num_tasks} learns {len(new)} new classes from {plan.new_folder} "
        f"({', '.join(new[:8])}{', ...' if len(new) > 8 else ''})")


def class_names_of(state: TaskState) -> List[str]:
    from .predict import class_names
    return class_names(state)


def provenance(seed_dir: Path, sources: List[Dict[str, Any]], cfg: RunConfig) -> Dict[str, Any]:
    return {"continued_from": str(seed_dir.resolve()), "task_sizes": list(cfg.task_sizes),
            "tasks": [{"task": t, "source": i, "from": s.get("path") or f"{s['dataset']} ({s['data_root']})",
                       "file_list_sha256": s["file_list_sha256"], "content_sha256": s.get("content_sha256"),
                       "test_images_scored": s["scored"]}
                      for i, s in enumerate(sources) for t in s["tasks"]]}
