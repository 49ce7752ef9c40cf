"""Run state <-> safetensors + JSON: atomic writes, sha256 integrity, finding the last complete task."""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensor_bytes
from safetensors.torch import save_file

from .errors import SlcaError
from .presets import RunConfig
from .stages import mark
from .validation import check_task_state

_UMASK = os.umask(0)
os.umask(_UMASK)

MODEL_FILE, STATS_FILE, STATE_FILE = "model.safetensors", "stats.safetensors", "state.json"


def task_dir_name(task: int) -> str:
    """Folder of the task with 0-based index ``task``: task-01, task-02, ..."""
    return f"task-{task + 1:02d}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def writer_os_error(exc: SafetensorError, path: Path) -> OSError:
    """safetensors reports a failed write (disk full, read-only file system) as SafetensorError, not OSError; the
    errno inside its message ("... (os error 28)", older versions "IoError(Os { code: 28, ... })") makes it the
    OSError the run's guard turns into a one-line message naming the file."""
    found = re.search(r"os error (\d+)|code:\s*(\d+)", str(exc))
    code = int(found.group(1) or found.group(2)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def _save_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> str:
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise writer_os_error(exc, path) from None
    os.chmod(path, 0o666 & ~_UMASK)  # safetensors creates 0600; every file of a run gets the umask's mode
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return sha256_file(path)


def rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch RNG states as JSON-safe values."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))


def remove_path(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def state_digest(state: Dict[str, Any]) -> str:
    """sha256 of a state.json's canonical JSON (sorted keys, no spaces), its own ``state_sha256`` left out: the
    JSON state gets the integrity the tensor files get from their recorded sha256."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def seal_problem(state: Any) -> Optional[str]:
    """Why a parsed state.json fails its own checksum (edited by hand, damaged), else None. A state written before
    slca recorded ``state_sha256`` has nothing to check and passes (old run folders stay usable)."""
    if not isinstance(state, dict) or "state_sha256" not in state:
        return None
    if state["state_sha256"] != state_digest(state):
        return "was edited or damaged (its content no longer matches its recorded state_sha256)"
    return None


def write_folder(parent: Path, name: str, tensor_files: Dict[str, Tuple[Dict[str, torch.Tensor], str]],
                 state: Dict[str, Any]) -> Path:
    """Write ``parent/name/`` as a whole: tensor files (sha256 recorded in state.json) and state.json go to a
    hidden partial folder that is renamed into place last, so the folder is either complete or absent."""
    final = Path(parent) / name
    partial = Path(parent) / f".{name}.partial"
    mark("save", folder=name, file="start")
    remove_path(partial)
    partial.mkdir(parents=True)
    state = json.loads(json.dumps(state))  # as it will read back (tuples as lists, keys as text)
    state["sha256"] = {}
    for file_name, (tensors, fmt) in tensor_files.items():
        state["sha256"][file_name] = _save_tensors(partial / file_name, tensors, {"format": fmt})
        mark("save", folder=name, file=file_name)
    state["state_sha256"] = state_digest(state)
    atomic_write_json(partial / STATE_FILE, state)
    _fsync_dir(partial)
    mark("save", folder=name, file="rename")
    if final.exists() or final.is_symlink():
        stale = Path(parent) / f".{name}.stale"
        remove_path(stale)
        os.replace(final, stale)
        mark("save", folder=name, file="swap")  # the one moment without NAME/: recovery.py repairs a kill here
        os.replace(partial, final)
        remove_path(stale)
    else:
        os.replace(partial, final)
    _fsync_dir(Path(parent))
    return final


def save_task(run_dir: Path, task: int, model_tensors: Dict[str, torch.Tensor],
              stats_tensors: Dict[str, torch.Tensor], state: Dict[str, Any]) -> Path:
    """Write ``task-NN/`` atomically: model.safetensors, stats.safetensors and state.json."""
    return write_folder(run_dir, task_dir_name(task), {MODEL_FILE: (model_tensors, "slca-model"),
                                                       STATS_FILE: (stats_tensors, "slca-stats")}, state)


@dataclass(frozen=True)
class TaskState:
    """A finished task's state.json, validated field by field (validation.check_task_state), with its RunConfig."""

    task_dir: Path
    task: int
    config: RunConfig
    raw: Dict[str, Any]

    seed = property(lambda self: self.raw["seed"])
    class_order = property(lambda self: list(self.raw["class_order"]))
    counts = property(lambda self: self.raw["counts"])
    seconds = property(lambda self: self.raw["seconds"])
    peak_memory_mb = property(lambda self: self.raw["peak_memory_mb"])
    train_loss = property(lambda self: self.raw.get("train_loss", [[] for _ in range(self.task + 1)]))
    metrics = property(lambda self: self.raw["metrics"])
    rng = property(lambda self: self.raw["rng"])
    data_fingerprint = property(lambda self: self.raw["data_fingerprint"])
    sha256 = property(lambda self: self.raw["sha256"])

    @property
    def seen_sizes(self) -> List[int]:
        """Classes per task up to and including this one."""
        return list(self.config.task_sizes[: self.task + 1])


def read_state(task_dir: Path) -> TaskState:
    """The validated state of a task folder; a damaged or foreign state.json is a one-line SlcaError."""
    path = Path(task_dir) / STATE_FILE
    if path.is_symlink():
        raise SlcaError(f"{path} is a link; slca reads only regular files inside a task folder")
    if not path.is_file():
        raise SlcaError(f"{task_dir} is not a finished task folder (no {STATE_FILE}); give a task-NN/ folder "
                        f"of a run")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlcaError(f"{path} is damaged ({exc.__class__.__name__}); resume from an earlier task") from None
    problem = seal_problem(state)
    if problem is not None:
        raise SlcaError(f"{path} {problem}; restore it, or remove {Path(task_dir).name}/ and re-run that task with "
                        f"--resume")
    cfg = check_task_state(state, path)
    return TaskState(Path(task_dir), int(state["task"]), cfg, state)


def _verified_bytes(path: Path, expected: Optional[str]) -> Optional[bytes]:
    """The file's bytes when it is a regular file whose sha256 is ``expected``, else None (read once)."""
    if path.is_symlink() or not path.is_file() or expected is None:
        return None
    data = path.read_bytes()
    return data if hashlib.sha256(data).hexdigest() == expected else None


def _deserialize(path: Path, data: bytes) -> Dict[str, torch.Tensor]:
    try:
        return load_tensor_bytes(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SlcaError(f"{path} is not a readable safetensors file ({exc})") from None


def load_tensors(task_dir: Path, name: str, state: TaskState) -> Dict[str, torch.Tensor]:
    """Load one tensor file of a task folder after checking its recorded sha256 (the file is read once)."""
    return _deserialize(Path(task_dir) / name, check_tensor_file(task_dir, name, state))


def check_tensor_file(task_dir: Path, name: str, state: TaskState) -> bytes:
    """The bytes of one tensor file of a task folder, or a one-line SlcaError when it is missing or damaged."""
    if name not in (MODEL_FILE, STATS_FILE):
        raise SlcaError(f"unknown tensor file {name!r} in {task_dir}")
    path = Path(task_dir) / name
    if path.is_symlink():
        raise SlcaError(f"{path} is a link; slca reads only regular files inside a task folder (copy the file "
                        f"in place of the link)")
    if not path.is_file():
        raise SlcaError(f"{path} is missing; the task folder is incomplete, resume from an earlier task")
    data = _verified_bytes(path, state.sha256.get(name))
    if data is None:
        raise SlcaError(f"{path} is damaged (sha256 differs from state.json: truncated or modified); "
                        f"re-run that task with --resume after removing {Path(task_dir).name}/")
    return data


def open_task(task_dir: Path, load: Tuple[str, ...] = ()) -> Tuple[TaskState, Dict[str, Dict[str, torch.Tensor]]]:
    """A finished task folder checked whole: its state and both tensor files (each read and hashed once); the
    files named in ``load`` are also deserialized, from the bytes that were hashed. SlcaError naming the
    problem when the folder is not complete and intact."""
    state = read_state(task_dir)
    tensors = {}
    for name in (MODEL_FILE, STATS_FILE):
        path = Path(task_dir) / name
        data = _verified_bytes(path, state.sha256.get(name))
        if data is None:
            raise SlcaError(f"{name} missing or damaged")
        if name in load:
            tensors[name] = _deserialize(path, data)
    return state, tensors


def verify_task(task_dir: Path) -> Optional[str]:
    """None when the folder is complete and intact, else the reason it is not."""
    try:
        open_task(task_dir)
    except SlcaError as exc:
        return str(exc)
    return None


def intact_tasks(run_dir: Path, warnings: List[str], load: Tuple[str, ...] = ()
                 ) -> Iterator[Tuple[TaskState, Dict[str, Dict[str, torch.Tensor]]]]:
    """The leading intact task folders (task-01 ... task-K) in order, as ``open_task`` gives them; a damaged
    folder after them ends the walk with a warning appended to ``warnings``."""
    count, previous = 0, None
    while True:
        folder = Path(run_dir) / task_dir_name(count)
        if not folder.exists() and not folder.is_symlink():
            return
        try:
            if folder.is_symlink():
                raise SlcaError("it is a link; task folders inside a run are never links")
            opened = open_task(folder, load)
            chain_problem(opened[0].raw, previous)
        except SlcaError as exc:
            then = "resuming from the task before it" if count else "starting again from task 1"
            warnings.append(f"{folder} is damaged ({exc}); {then}")
            return
        yield opened
        previous = opened[0].raw
        count += 1


def chain_problem(state: Dict[str, Any], previous: Optional[Dict[str, Any]]) -> None:
    """A task's state names the checksum of the state it continued (``previous_state_sha256``): a task folder
    swapped in from another run, or an earlier state.json edited and re-sealed, breaks the chain."""
    link, before = state.get("previous_state_sha256"), (previous or {}).get("state_sha256")
    if link is not None and before is not None and link != before:
        raise SlcaError(f"its state.json does not continue {task_dir_name(int(state['task']) - 1)}/state.json "
                        f"(previous_state_sha256 differs): a task folder was replaced or edited")


def complete_tasks(run_dir: Path) -> Tuple[int, List[str]]:
    """Number of leading intact task folders (task-01 ... task-K), and warnings for damaged ones after them."""
    warnings: List[str] = []
    count = sum(1 for _ in intact_tasks(run_dir, warnings))
    return count, warnings
