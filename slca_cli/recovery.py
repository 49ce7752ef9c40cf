"""After a crash: finish or undo the folder writes it interrupted, and remove its temporary files. Runs with the
run folder's lock held, so every leftover belongs to a process that is gone.

``checkpoint.write_folder`` writes ``.NAME.partial/`` and renames it to ``NAME/``; when ``NAME/`` already exists it is
first moved to ``.NAME.stale/``. A kill between those two renames leaves no ``NAME/``: the complete partial folder
(or else the stale one) is put back in its place."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import List

from .checkpoint import STATE_FILE, remove_path, sha256_file

LEFTOVER = re.compile(r"^\.(task-\d+|in-progress)\.(partial|stale)$")
TEMPORARY = re.compile(r"^\..+\.tmp$|^\.slca\.lock\.stale\..+$")
TENSOR_FILES = {"model.safetensors", "stats.safetensors", "optimizer.safetensors"}


def folder_intact(folder: Path) -> bool:
    """Whether ``folder`` holds a state.json whose recorded tensor files are all present with their sha256."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        recorded = state["sha256"]
        if not isinstance(recorded, dict) or not recorded or not set(recorded) <= TENSOR_FILES:
            return False
        return all(not (folder / name).is_symlink() and (folder / name).is_file()
                   and sha256_file(folder / name) == sha for name, sha in recorded.items())
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False


def tidy_run_folder(run_dir: Path, min_age: float = 60.0) -> List[str]:
    """Recover interrupted folder writes in ``run_dir`` and delete leftovers; returns what was recovered."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    messages = []
    leftovers = sorted(p for p in run_dir.iterdir() if LEFTOVER.match(p.name))
    for name in sorted({LEFTOVER.match(p.name).group(1) for p in leftovers}):
        final = run_dir / name
        if not final.exists() and not final.is_symlink():
            for kind in ("partial", "stale"):
                candidate = run_dir / f".{name}.{kind}"
                if folder_intact(candidate):
                    candidate.rename(final)
                    messages.append(f"recovered {final} from a write that was interrupted")
                    break
    for path in leftovers:
        remove_path(path)
    now = time.time()
    for path in run_dir.iterdir():
        if not TEMPORARY.match(path.name):
            continue
        if path.name.startswith(".slca.lock.") and now - path.lstat().st_mtime < min_age:
            continue  # another process may be trying to take the lock right now
        remove_path(path)
    return messages
