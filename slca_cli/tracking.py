"""Where a run's scalars go: TensorBoard event files in ``events/`` (always, TensorBoard's own writer) and the
experiment trackers of ``--log-with`` through accelerate's tracker API (W&B, MLflow, Aim, Comet, ClearML, DVCLive).

Scalars are logged once per finished task (losses by global epoch, accuracies, time and memory by task), so a
resumed run appends what comes after its last finished task and never logs a step twice. Each tracker's run
id is kept in the seed folder's ``trackers.json``; a resume continues the same tracker run.
"""
from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import SlcaError

EVENTS_DIR = "events"
IDS_FILE = "trackers.json"
# --log-with name -> (module it needs, the pip extra that installs it). tensorboard is a core dependency.
TRACKERS: Dict[str, Tuple[str, Optional[str]]] = {
    "tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
    "aim": ("aim", "aim"), "comet_ml": ("comet_ml", "comet-ml"), "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive")}
# The x axis of each series: the global stage-1 epoch, the global alignment epoch, else the task.
AXES = {"loss/train": "epoch", "loss/alignment": "alignment_epoch"}
_OPEN: List["RunTrackers"] = []  # not yet closed: a seed that stopped part-way (close_open_trackers)


def resolve_log_with(names: Sequence[str]) -> Tuple[str, ...]:
    """``--log-with`` values (repeatable, ``all`` for every tracker) -> tracker names, each checked installed."""
    chosen: List[str] = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip().lower()
            if part == "all":
                chosen += list(TRACKERS)
            elif part in TRACKERS:
                chosen.append(part)
            elif part:
                raise SlcaError(f"--log-with must be one of {', '.join(TRACKERS)} or all, got '{part}'")
    chosen = list(dict.fromkeys(chosen))
    for name in chosen:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            how = f"pip install 'slca[{extra}]'" if extra else "pip install tensorboard"
            raise SlcaError(f"--log-with {name} needs the {module} package, which is not installed: {how}")
    return tuple(chosen)


def accelerate_trackers(log_with: Sequence[str]) -> Optional[List[str]]:
    """What ``Accelerator(log_with=...)`` gets: every tracker but tensorboard, which is events/ (written always)."""
    return [name for name in log_with if name != "tensorboard"] or None


def hyperparameters(config: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """The resolved config as flat hyperparameters (lists as text: every tracker takes str, int, float, bool)."""
    flat = {k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in config.items()}
    flat["seed"] = seed
    return {k: ("None" if v is None else v) for k, v in flat.items()}


class RunTrackers:
    """The scalars of one seed folder: ``add(step, scalars)`` and ``add_series(tag, points)`` write to events/
    and to every tracker; ``close()`` finishes the tracker runs. Only the main process writes."""

    def __init__(self, run_dir: Path, accelerator, config: Dict[str, Any], seed: int):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.writer = None
        if not accelerator.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.run_dir / EVENTS_DIR))  # a new file per process start
        _OPEN.append(self)
        if accelerator.log_with:
            self._start_trackers(config, seed)

    def _start_trackers(self, config: Dict[str, Any], seed: int) -> None:
        accelerator = self.accelerator
        for tracker in accelerator.trackers:  # a previous seed's runs, if it ended without close()
            tracker.finish()
        accelerator.trackers = []
        accelerator.project_configuration.set_directories(str(self.run_dir))
        ids_path = self.run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        names = {str(t) for t in accelerator.log_with}
        if "wandb" in names:
            ids.setdefault("wandb", uuid.uuid4().hex[:12])
        project, name = self.run_dir.parent.name or "slca", self.run_dir.name
        init_kwargs = {"wandb": {"name": f"{project}/{name}", "dir": str(self.run_dir), "id": ids.get("wandb"),
                                 "resume": "allow"},
                       "mlflow": {"run_name": name, "run_id": ids.get("mlflow")},
                       "dvclive": {"dir": str(self.run_dir / "dvclive"), "resume": "dvclive" in ids}}
        try:
            accelerator.init_trackers(project, config=hyperparameters(config, seed),
                                      init_kwargs={k: v for k, v in init_kwargs.items() if k in names})
        except SlcaError:
            raise
        except Exception as exc:  # a tracker's own configuration problem (no API key, unreachable server, ...)
            raise SlcaError(f"--log-with: starting the trackers failed ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); fix that tracker's configuration "
                            f"or leave it out of --log-with") from None
        if "wandb" in names:
            run = accelerator.get_tracker("wandb", unwrap=True)
            for axis in ("epoch", "alignment_epoch", "task"):
                run.define_metric(axis)
            for tag, axis in AXES.items():
                run.define_metric(tag, step_metric=axis)
            run.define_metric("accuracy/*", step_metric="task")
            run.define_metric("task/*", step_metric="task")
        if "mlflow" in names:
            ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        ids.update({n: True for n in names if n not in ("wandb", "mlflow")})
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")

    def add(self, step: int, scalars: Dict[str, float]) -> None:
        if self.writer is None or not scalars:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()
        axis = AXES.get(next(iter(scalars)), "task")
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":  # W&B wants one increasing step: each series has its own axis instead
                tracker.log({**scalars, axis: step})
            else:
                tracker.log(dict(scalars), step=step)

    def add_series(self, tag: str, points: Iterable[Tuple[int, float]]) -> None:
        for step, value in points:
            self.add(step, {tag: value})

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        _OPEN.remove(self)
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []


def close_open_trackers() -> None:
    """Finish the tracker runs of seeds that stopped part-way (an error, Ctrl-C), so that a resume in the same
    process (a notebook, the tests) can continue them; the CLI calls it after its seeds. This is clean-up after
    the error that stopped the seed was reported: a failure here (the disk that filled up, still full) is not
    reported again."""
    for trackers in list(_OPEN):
        try:
            trackers.close()
        except Exception:
            trackers.writer = None
            if trackers in _OPEN:
                _OPEN.remove(trackers)
