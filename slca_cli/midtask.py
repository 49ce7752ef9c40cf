"""Mid-task checkpoints (``--checkpoint-every N``): the stage-1 state at epoch boundaries of the task being trained,
in ``<run>/in-progress/``, so that a long task killed part-way resumes at its last saved epoch, not its first.

At an epoch boundary the rest of stage 1 is decided by: the weights, the optimizer (SGD momentum buffers, learning
rates), the scheduler, the global RNGs (Python, NumPy, torch CPU and CUDA: random augmentations in the main
process) and the data loader's generator (it draws each epoch's shuffle and the workers' base seed when the
epoch's iterator is created). All of it is saved, so on CPU a resumed task ends bit-for-bit where a straight one
does. The main process's states are saved; under several processes they are every rank's (the same seeds, the
same draws; the device path's augmentation generator is shared by all ranks, loaders.DeviceLoader). The folder is written atomically like a task folder and removed once the task's own folder is saved."""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import STATE_FILE, remove_path, rng_state, seal_problem, set_rng_state, sha256_file, write_folder
from .data.loaders import shuffle_generator
from .errors import SlcaError
from .finite import ADVICE, first_non_finite
from .records import RunIdentity
from .signals import uninterruptible
from .validation import check_rng

FOLDER = "in-progress"
MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.safetensors"


def _to_json(value: Any) -> Any:
    """Scheduler / optimizer state as JSON: Counters (MultiStepLR milestones) keep their integer keys."""
    if isinstance(value, Counter):
        return {"__counter__": [[k, v] for k, v in value.items()]}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__counter__"}:
            return Counter({k: v for k, v in value["__counter__"]})
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def refuse_leftover(run_dir: Path) -> None:
    """A fresh run must not silently drop (or later pick up) the mid-task state of an interrupted one."""
    folder = Path(run_dir) / FOLDER
    if folder.exists() or folder.is_symlink():
        raise SlcaError(f"{run_dir} holds an interrupted task ({FOLDER}/); pass --resume to continue it or choose "
                        f"another --out")


class EpochCheckpoints:
    """The run's ``in-progress/`` folder: written every ``every`` epochs, adopted on --resume."""

    def __init__(self, run_dir: Path, every: int, run: RunIdentity, log: Callable[[str], None] = print,
                 is_main_process: bool = True):
        if every < 0:
            raise SlcaError(f"--checkpoint-every must be 0 (off) or a number of epochs, got {every}")
        self.run_dir, self.every, self.log = Path(run_dir), int(every), log
        self.folder = self.run_dir / FOLDER
        self.identity = run.record()  # stored in every state.json and compared on --resume
        self.is_main_process = is_main_process
        self.pending: Optional[Dict[str, Any]] = None

    def adopt(self, start_task: int) -> None:
        """On --resume: use ``in-progress/`` if it is intact and continues ``start_task``; drop it otherwise."""
        if not (self.folder.exists() or self.folder.is_symlink()):
            return
        state, problem = self._read()
        if problem is None and state["identity"] != self.identity:
            raise SlcaError(f"--resume: {self.folder} belongs to another experiment (different flags, seed or data); "
                            f"pass the same flags as that run or delete {self.folder}")
        if problem is None and state["task"] < start_task:  # its task finished; a kill came before the clean-up
            if self.is_main_process:
                remove_path(self.folder)
            return
        if problem is None and state["task"] != start_task:
            problem = (f"it continues task {state['task'] + 1}, but the run resumes at task {start_task + 1}")
        if problem is not None:
            self.log(f"warning: {self.folder} is not used ({problem}); task {start_task + 1} starts from its "
                     f"first epoch")
            if self.is_main_process:
                remove_path(self.folder)
            return
        self.pending = state
        self.log(f"resuming task {start_task + 1} after epoch {state['epoch']} from {self.folder}")

    def _read(self) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        """(state, None) when the folder is intact, else (None, why not)."""
        if self.folder.is_symlink():
            return None, "it is a link"
        path = self.folder / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            return None, f"{STATE_FILE} unreadable: {exc.__class__.__name__}"
        if seal_problem(state) is not None:
            return None, f"{STATE_FILE} {seal_problem(state)}"
        fields = ("identity", "task", "epoch", "losses", "sha256", "optimizer", "scheduler", "rng", "generator")
        if not isinstance(state, dict) or any(f not in state for f in fields):
            return None, f"{STATE_FILE} is not a mid-task state"
        if not (isinstance(state["task"], int) and isinstance(state["epoch"], int) and state["epoch"] >= 1
                and isinstance(state["sha256"], dict) and check_rng(state["rng"])
                and isinstance(state["generator"], str) and isinstance(state["losses"], list)):
            return None, f"{STATE_FILE} is malformed"
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            file = self.folder / name
            if file.is_symlink() or not file.is_file() or sha256_file(file) != state["sha256"].get(name):
                return None, f"{name} is missing or damaged (sha256 differs from {STATE_FILE})"
        return state, None

    def for_task(self, task: int) -> Optional["TaskEpochs"]:
        """The hooks ``learner.fit_task`` calls for ``task``; None when there is nothing to save or restore."""
        resume = self.pending if self.pending is not None and self.pending["task"] == task else None
        if self.every == 0 and resume is None:
            return None
        return TaskEpochs(self, task, resume)

    def discard(self) -> None:
        """The task's own folder is saved: its mid-task state is no longer needed."""
        self.pending = None
        if self.is_main_process:
            remove_path(self.folder)


class TaskEpochs:
    """Restore at the start of stage 1 and save after every ``every``-th epoch of one task."""

    def __init__(self, owner: EpochCheckpoints, task: int, resume: Optional[Dict[str, Any]]):
        self.owner, self.task, self.resume = owner, task, resume

    def restore(self, accelerator, model, optimizer, schedule, loader, train_loader) -> Tuple[int, List[float]]:
        """Load the adopted state into the model and the prepared optimizer, scheduler and loader; (first epoch to
        run, losses of the epochs done)."""
        if self.resume is None:
            return 0, []
        state, folder = self.resume, self.owner.folder
        try:
            weights = load_file(str(folder / MODEL_FILE))
            tensors = load_file(str(folder / OPTIMIZER_FILE))
            model.load_state_dict(weights)
            per_param: Dict[int, Dict[str, Any]] = {}
            for key, value in state["optimizer"]["state"].items():
                per_param[int(key)] = dict(value)
            for key, tensor in tensors.items():
                if key.startswith("optimizer/"):
                    _, index, name = key.split("/", 2)
                    per_param.setdefault(int(index), {})[name] = tensor
            optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
            schedule.load_state_dict(_from_json(state["scheduler"]))
            set_rng_state(state["rng"])
            shuffle_generator(loader).set_state(_from_b64(state["generator"]))
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            losses = [float(v) for v in state["losses"]]
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise SlcaError(f"{folder} does not fit this run ({exc.__class__.__name__}: {str(exc)[:160]}); delete "
                            f"it to restart task {self.task + 1} from its first epoch") from None
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state["epoch"])
        self.owner.pending = None
        return int(state["epoch"]), losses

    def epoch_done(self, epoch: int, accelerator, model, optimizer, schedule, loader, losses: List[float]) -> None:
        """After epoch ``epoch`` (0-based) and its scheduler step: save when it is an ``every``-th epoch."""
        every = self.owner.every
        if every == 0 or (epoch + 1) % every != 0:
            return
        bad = first_non_finite(model.state_dict())  # every process: they hold the same weights
        if bad is not None:
            raise SlcaError(f"task {self.task + 1}, epoch {epoch + 1}: the weights hold NaN or infinite values ({bad}), "
                            f"so the mid-task checkpoint is not saved; finished tasks are kept. Fix: {ADVICE}")
        if accelerator.is_main_process:
            optimizer_state = optimizer.state_dict()
            tensors: Dict[str, torch.Tensor] = {}
            plain: Dict[str, Dict[str, Any]] = {}
            for index, values in optimizer_state["state"].items():
                plain[str(index)] = {}
                for name, value in values.items():
                    if torch.is_tensor(value):
                        tensors[f"optimizer/{index}/{name}"] = value
                    else:
                        plain[str(index)][name] = value
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                    tensors[f"rng/cuda/{i:03d}"] = cuda_state
            weights = dict(model.state_dict())
            state = {"format": "slca-epoch", "version": 1, "identity": self.owner.identity, "task": self.task,
                     "epoch": epoch + 1, "losses": list(losses),
                     "optimizer": {"state": plain, "param_groups": _to_json(optimizer_state["param_groups"])},
                     "scheduler": _to_json(schedule.state_dict()), "rng": rng_state(),
                     "generator": _b64(shuffle_generator(loader).get_state())}
            with uninterruptible():
                write_folder(self.owner.run_dir, FOLDER, {MODEL_FILE: (weights, "slca-model"),
                                                          OPTIMIZER_FILE: (tensors, "slca-optimizer")}, state)
        accelerator.wait_for_everyone()
