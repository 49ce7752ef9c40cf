"""What a seed writes besides tensors: its identity, config.json's header, the task folders' state, metrics.json /
metrics.csv, the library versions."""
from __future__ import annotations

import csv
import io
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import __version__
from .checkpoint import atomic_write_json, atomic_write_text, rng_state, save_task, sha256_file
from .errors import SlcaError
from .metrics import summarize
from .presets import RunConfig, identity


@dataclass(frozen=True)
class RunIdentity:
    """What makes a seed folder one experiment: the seed, the class order, the data (file-list checksum) and the
    identity fields of its RunConfig. Task folders and mid-task checkpoints are continued only under it."""

    seed: int
    class_order: List[int]
    data_fingerprint: str
    config: RunConfig

    def record(self) -> Dict[str, Any]:
        """The JSON form a mid-task checkpoint stores and compares (``identity`` in in-progress/state.json)."""
        return {"seed": self.seed, "class_order": list(self.class_order), "data_fingerprint": self.data_fingerprint,
                "config": identity(self.config.to_dict())}

    def check_continues(self, state: Dict[str, Any], last_task: Path) -> None:
        """--resume continues only with the seed, class order and data files the finished tasks were trained on
        (the RunConfig's identity fields are compared first, by restore.find_resume_point)."""
        if state.get("seed") != self.seed or state["class_order"] != list(self.class_order):
            raise SlcaError(f"--resume: {last_task} was trained with another seed or class order; the seed folders "
                            f"of {last_task.parent.parent} were rearranged")
        if state["data_fingerprint"] != self.data_fingerprint:
            raise SlcaError(f"--resume: the data differs from the data {last_task} was trained on (file list "
                            f"checksum); point --data-root at the same files, or start a new run with another --out")


def run_header(run: RunIdentity, class_names: List[str]) -> Dict[str, Any]:
    """config.json: the identity, the whole RunConfig, the class names in order, the library versions and the
    sha256 of ``--weights`` (so a later run can tell whether the same file was used)."""
    cfg = run.config
    header = {"seed": run.seed, "config": cfg.to_dict(), "class_order": list(run.class_order),
              "class_names": [class_names[c] for c in run.class_order], "task_sizes": list(cfg.task_sizes),
              "data_fingerprint": run.data_fingerprint, "versions": library_versions()}
    if cfg.weights:
        header["weights_sha256"] = sha256_file(Path(cfg.weights))
    return header


def previous_header(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The config.json a resumed run wrote when it started (None when absent or unreadable)."""
    path = run_dir / "config.json"
    try:
        header = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def run_fingerprint(data, recorded_by: Optional[Dict[str, Any]]) -> str:
    """The data checksum this run records: today's (names in NFC form), or, for a run folder written before names
    were normalized, the legacy one it recorded (``recorded_by``: the last task's state or config.json), as long
    as it is this data's, so the folder stays resumable."""
    recorded = (recorded_by or {}).get("data_fingerprint")
    if isinstance(recorded, str) and recorded != data.fingerprint() and data.matches(recorded):
        return recorded
    return data.fingerprint()


def check_same_weights(previous: Dict[str, Any], header: Dict[str, Any], run_dir: Path) -> None:
    """--resume continues from the weights file the run started with: same content (sha256), wherever it is now."""
    before, now = previous.get("weights_sha256"), header.get("weights_sha256")
    if before == now:
        return
    if before is None:
        raise SlcaError(f"--resume: {run_dir} was started without --weights (the backbone's published weights); "
                        f"drop --weights, or start a new run with another --out")
    where = (previous.get("config") or {}).get("weights") if isinstance(previous.get("config"), dict) else None
    given = f"--weights {header['config']['weights']} has other content" if now else "no --weights was given"
    raise SlcaError(f"--resume: {run_dir} was started from the weights file {where} (sha256 {str(before)[:12]}...), "
                    f"but {given}; pass a file with that content (it may have moved), or start a new run with "
                    f"another --out")


def library_versions() -> Dict[str, str]:
    import accelerate
    import numpy as np
    import safetensors
    import timm
    import torchvision
    return {"slca": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__, "numpy": np.__version__, "platform": platform.platform()}
