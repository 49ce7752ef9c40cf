"""Checks on what we read back from a run folder. state.json may be damaged or hand-edited: every field we use is
checked for type and range before use, so a bad file is a one-line error (or, on --resume, a damaged task that is
skipped), never a traceback, and nothing in it can name a file for us to open or write."""
from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union, get_args, get_origin, get_type_hints

from .errors import SlcaError
from .presets import RunConfig

SHA256 = re.compile(r"^[0-9a-f]{64}$")
TASK_FOLDER = re.compile(r"^task-(\d+)$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value matches a RunConfig field annotation (unknown kinds of annotation are accepted)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args)))
    return True


def config_from_state(data: Any, where: Path) -> RunConfig:
    """A RunConfig from the ``config`` of state.json / config.json, with every field's type checked."""
    if not isinstance(data, dict):
        raise SlcaError(f"{where}: 'config' is not an object; the file is damaged")
    hints = get_type_hints(RunConfig)
    required = {f.name for f in dataclasses.fields(RunConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise SlcaError(f"{where}: the run's config lacks {missing[:5]}; it was written by another version of slca")
    wrong = sorted(k for k, v in data.items() if k in hints and not _fits(v, hints[k]))
    if wrong:
        raise SlcaError(f"{where}: config fields {wrong[:5]} have the wrong type; the file is damaged")
    cfg = RunConfig.from_dict(data)
    sizes = cfg.task_sizes
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != cfg.num_classes:
        raise SlcaError(f"{where}: config task_sizes {list(sizes)} do not split num_classes {cfg.num_classes}; "
                        f"the file is damaged")
    if cfg.image_size < 1 or cfg.batch_size < 1:
        raise SlcaError(f"{where}: config image_size / batch_size out of range; the file is damaged")
    return cfg


def _int_list(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(_is_int(v) and v >= 0 for v in value)


def _number_list(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def check_rng(rng: Any) -> bool:
    """The saved Python / NumPy / torch generator states have the shapes set_rng_state expects."""
    try:
        version, internal, gauss = rng["python"]
        name, keys, pos, has_gauss, cached = rng["numpy"]
        torch_state = base64.b64decode(rng["torch"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        return False
    return (_is_int(version) and _int_list(internal, 625) and (gauss is None or isinstance(gauss, float))
            and name == "MT19937" and _int_list(keys, 624) and _is_int(pos) and _is_int(has_gauss)
            and isinstance(cached, (int, float)) and len(torch_state) > 0)


def check_task_state(state: Any, path: Path) -> RunConfig:
    """Validate a task's state.json (already parsed): its RunConfig, or a SlcaError naming the bad field."""
    def bad(field: str) -> SlcaError:
        return SlcaError(f"{path} is damaged (field '{field}' is missing or malformed); resume from an earlier "
                         f"task or re-run this one")

    if not isinstance(state, dict) or "sha256" not in state or "task" not in state:
        raise SlcaError(f"{path} is not an slca task state (fields task and sha256 missing)")
    task = state["task"]
    if not _is_int(task) or task < 0:
        raise bad("task")
    folder = TASK_FOLDER.match(Path(path).parent.name)
    if folder and int(folder.group(1)) != task + 1:
        raise SlcaError(f"{path} says it is task {task + 1}, but its folder is {Path(path).parent.name}; the run "
                        f"folder was rearranged: restore the folder names")
    cfg = config_from_state(state.get("config"), path)
    if task >= cfg.num_tasks:
        raise bad("task")
    if not _is_int(state.get("seed")):
        raise bad("seed")
    sha = state["sha256"]
    if not isinstance(sha, dict) or not all(isinstance(v, str) and SHA256.match(v) for v in sha.values()):
        raise bad("sha256")
    order = state.get("class_order")
    if not isinstance(order, list) or not all(_is_int(c) for c in order) or sorted(order) != list(
            range(cfg.num_classes)):
        raise bad("class_order")
    names = state.get("class_names", [""] * cfg.num_classes)  # absent in runs written before names were stored
    if not isinstance(names, list) or len(names) != cfg.num_classes or not all(isinstance(n, str) for n in names):
        raise bad("class_names")
    if "sources" in state and not sources_fit(state["sources"], cfg):
        raise bad("sources")
    counts = state.get("counts")
    if not isinstance(counts, list) or len(counts) != task + 1:
        raise bad("counts")
    for t, row in enumerate(counts):
        if not isinstance(row, dict) or not _int_list(row.get("correct"), t + 1) or not _int_list(
                row.get("total"), t + 1) or any(c > n for c, n in zip(row["correct"], row["total"])):
            raise bad("counts")
    for field in ("seconds", "peak_memory_mb"):
        if not _number_list(state.get(field), task + 1):
            raise bad(field)
    losses = state.get("train_loss", [[]] * (task + 1))  # absent in runs written before it was recorded
    if not isinstance(losses, list) or len(losses) != task + 1 or not all(
            isinstance(row, list) and _number_list(row, len(row)) for row in losses):
        raise bad("train_loss")
    metrics = state.get("metrics")
    if not isinstance(metrics, dict) or not _number_list(metrics.get("task_accuracy"), task + 1):
        raise bad("metrics")
    if not isinstance(state.get("data_fingerprint"), str):
        raise bad("data_fingerprint")
    if not check_rng(state.get("rng")):
        raise bad("rng")
    return cfg


def _absolute(path: Any) -> bool:
    return isinstance(path, str) and "\x00" not in path and Path(path).is_absolute()


def sources_fit(sources: Any, cfg: RunConfig) -> bool:
    """A continued run's ``sources`` (grow.py): the first one a dataset, then folders, absolute paths only, class
    names adding up to the run's classes."""
    if not isinstance(sources, list) or not sources or not all(isinstance(s, dict) for s in sources):
        return False
    for i, source in enumerate(sources):
        names = source.get("class_names")
        if source.get("kind") != ("dataset" if i == 0 else "folder") or not isinstance(source.get("scored"), bool) \
                or not isinstance(source.get("file_list_sha256"), str) or not isinstance(names, list) \
                or not all(isinstance(n, str) for n in names):
            return False
        if i == 0 and not (isinstance(source.get("dataset"), str) and (source.get("data_root") is None
                                                                        or _absolute(source.get("data_root")))):
            return False
        if i > 0 and not _absolute(source.get("path")):
            return False
    return sum(len(s["class_names"]) for s in sources) == cfg.num_classes


def stored_data_root(cfg: RunConfig, state_path: Path) -> Union[str, None]:
    """The data root recorded at training time, used by ``slca eval`` when --data-root is not given. It is only
    read from (images, checked against the recorded file-list checksum); it must be an absolute path."""
    root = cfg.data_root
    if root is None:
        return None
    if "\x00" in root or not Path(root).is_absolute():
        raise SlcaError(f"{state_path} records the data root {root!r}, which is not an absolute path; pass "
                        f"--data-root DIR")
    return root


# The allowed range of every numeric RunConfig setting, whether it comes from a flag or a preset (checked once, in
# check_bounds). min / max: inclusive bounds; above: an exclusive lower bound. Floats must also be finite; None
# (where the field allows it) means "off" and is not checked; tuples are checked element by element. say: how the
# error words the rule, where the bounds alone would not tell what the number means.
BOUNDS: Dict[str, Dict[str, Any]] = {
    "epochs": {"min": 1},
    "lr_drop_epoch": {"min": 1, "say": "an epoch >= 1 (a drop at or after --epochs never happens; leave the flag "
                                       "out for the preset)"},
    "batch_size": {"min": 1},
    "lr_backbone": {"min": 0.0},
    "lr_head": {"above": 0.0},
    "momentum": {"min": 0.0, "max": 1.0},
    "weight_decay": {"min": 0.0},
    "ca_epochs": {"min": 0},
    "ca_samples": {"min": 1},
    "ca_lr": {"above": 0.0},
    "ca_batch_size": {"min": 1},
    "tau": {"min": 1e-3},  # logits / tau: much smaller temperatures overflow the alignment in float32
    "cov_ridge": {"above": 0.0},
    "image_size": {"min": 1},
    "mean": {},
    "std": {"above": 0.0},
    "train_per_class": {"min": 1},
    "test_per_class": {"min": 1},
    "min_lr": {"min": 0.0},
    "grad_clip": {"above": 0.0},
    "sce_a": {"min": 0.0},
    "sce_b": {"min": 0.0},
    "lora_rank": {"min": 0},
    "lora_scale": {"min": 0.0},
    "lr_lora": {"min": 0.0},
    "lr_lora_first": {"min": 0.0},
    "sample_shrink": {"min": 0.0},
    "prompt_pool": {"min": 1},
    "prompt_length": {"min": 1},
    "prompt_top_k": {"min": 1},
    "g_prompt_length": {"min": 1},
    "matching_weight": {"min": 0.0},
    "drift_views": {"min": 0},
    "drift_ridge": {"above": 0.0},
    "ranpac_dim": {"min": 1},
    "workers": {"min": 0},
    "checkpoint_every": {"min": 0, "say": "0 (off) or a number of epochs"},
}
# Flags of `slca train` that are not RunConfig settings, with the same kind of rule.
SEED_BOUNDS: Dict[str, Any] = {"min": 0, "max": 2 ** 32 - 1}  # NumPy seeds the class order: 0 .. 2^32 - 1


def bound_problem(value: Any, rule: Dict[str, Any]) -> Optional[str]:
    """What is wrong with one number under ``rule`` (None when it fits): 'a finite number >= 1e-3', ..."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "a number"
    parts = [f"{sign} {rule[key]:g}" if isinstance(rule[key], float) else f"{sign} {rule[key]}"
             for key, sign in (("above", ">"), ("min", ">="), ("max", "<=")) if key in rule]
    wanted = rule.get("say") or ("a finite number" if isinstance(value, float) else "an integer") + (
        " " if parts else "") + " and ".join(parts)
    if isinstance(value, float) and not math.isfinite(value):
        return wanted
    if ("above" in rule and not value > rule["above"]) or ("min" in rule and value < rule["min"]) or (
            "max" in rule and value > rule["max"]):
        return wanted
    return None


def check_bounds(values: Dict[str, Any]) -> None:
    """Every numeric setting in ``values`` (RunConfig field -> value) within BOUNDS, else a one-line SlcaError
    naming the flag."""
    for name, rule in BOUNDS.items():
        value = values.get(name)
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if item is None:
                continue
            problem = bound_problem(item, rule)
            if problem is not None:
                raise SlcaError(f"--{name.replace('_', '-')} must be {problem}, got {value}")


def check_seed(seed: int) -> None:
    problem = bound_problem(seed, SEED_BOUNDS)
    if problem is not None:
        raise SlcaError(f"--seed must be {problem}, got {seed}")
