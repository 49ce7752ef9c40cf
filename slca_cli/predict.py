"""`slca predict`: a finished task's model on new images: the top-k class names with probabilities and the task
that introduced each class, through the run's own test transform, precision and scoring path (as `slca eval`)."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .checkpoint import TaskState, complete_tasks, task_dir_name
from .data import dataset_transform_style
from .data.base import IMAGE_EXTENSIONS
from .data.loaders import DeviceNormalize
from .data.transforms import build_test_transform
from .errors import SlcaError
from .model import ContinualModel
from .protocol import task_of_class

LIST_SUFFIXES = (".txt", ".lst")
FORMATS = ("table", "csv", "json", "jsonl")


def resolve_task_dir(path: Path) -> Path:
    """A ``task-NN/`` folder as given, or a seed folder's last intact task."""
    path = Path(path)
    if not path.exists():
        raise SlcaError(f"checkpoint {path} does not exist; give a run's task-NN/ folder or its seed-*/ folder")
    if not path.is_dir():
        raise SlcaError(f"checkpoint {path} is not a folder; give a run's task-NN/ folder or its seed-*/ folder")
    if (path / "state.json").exists():
        return path
    done, warnings = complete_tasks(path)
    if done == 0:
        why = f" ({warnings[0]})" if warnings else ""
        raise SlcaError(f"{path} holds no finished task{why}; give a run's task-NN/ folder or a seed-*/ folder with "
                        f"at least one finished task")
    return path / task_dir_name(done - 1)


def class_names(state: TaskState) -> List[str]:
    """Names in class-order position (the model's output order): state.json's, else the run's config.json (runs
    written before names were stored per task), else ``class <dataset id>``."""
    order = state.class_order
    names = state.raw.get("class_names")
    if names is None:
        try:
            header = json.loads((state.task_dir.parent / "config.json").read_text(encoding="utf-8"))
            names = header.get("class_names") if header.get("class_order") == order else None
        except (OSError, ValueError, AttributeError):
            names = None
    if not (isinstance(names, list) and len(names) == len(order) and all(isinstance(n, str) for n in names)):
        names = [f"class {c}" for c in order]
    return list(names)


def collect_inputs(inputs: Iterable[Path]) -> List[Path]:
    """Image paths in the order given: files as they are, folders recursively (image extensions, sorted, hidden
    entries skipped), ``.txt``/``.lst`` files as lists of paths (one per line, relative to the list's folder;
    blank lines and ``#`` comments skipped). A path that does not exist is kept: it is reported as unreadable."""
    found: List[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found.extend(_images_under(path))
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise SlcaError(f"cannot read the list of images {path} ({exc.__class__.__name__}); give a UTF-8 "
                                f"text file with one image path per line") from None
            entries = [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
            found.extend(collect_inputs(e if e.is_absolute() else path.parent / e for e in entries))
        else:
            found.append(path)
    return found


def _images_under(folder: Path) -> List[Path]:
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(parent) / name)
    return found


def read_image(path: Path) -> Image.Image:
    """An RGB image, or OSError/ValueError-like failures as ``SlcaError`` naming the file."""
    if not path.exists():
        raise SlcaError(f"{path}: no such file")
    if not path.is_file():
        raise SlcaError(f"{path}: not a regular file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many kinds of errors for damaged or non-image files
        raise SlcaError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None


class InputImages(Dataset):
    """Images under the test transform with their index as the label; an unreadable one yields a blank image
    and the label ``-(index + 1)``, so a worker never stops the pass (its error is read again in the main
    process)."""

    def __init__(self, paths: Sequence[Path], transform, blank_size: int):
        self.paths, self.transform, self.blank_size = list(paths), transform, blank_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = self.transform(read_image(self.paths[index]))
            return image, index
        except Exception:
            return torch.zeros(3, self.blank_size, self.blank_size, dtype=torch.uint8), -(index + 1)


@dataclass
class Prediction:
    path: str
    top: List[Tuple[str, float, int]] = field(default_factory=list)  # (class name, probability, task)
    error: Optional[str] = None


def preprocessing(state: TaskState):
    """The run's test transform as uint8 tensors plus its normalization on the device (eval's host path)."""
    cfg = state.config
    style = dataset_transform_style(cfg.dataset)
    return build_test_transform(style, cfg.image_size, cfg.mean, cfg.std, uint8=True), \
        DeviceNormalize(cfg.mean, cfg.std)


def predict_images(task_dir: Path, inputs: Sequence[Path], *, top_k: int = 5, device: str = "auto",
                   batch_size: Optional[int] = None, workers: Optional[int] = None,
                   show_progress: bool = True) -> Tuple[TaskState, List[Prediction]]:
    """Predictions for ``inputs`` (already collected) in their order; unreadable ones carry ``error``."""
    from .distributed import workers_per_process
    from .learner import feature_batches
    from .restore import restore_model
    from .speed import make_accelerator

    if top_k < 1:
        raise SlcaError(f"--top-k must be at least 1, got {top_k}")
    if batch_size is not None and batch_size < 1:
        raise SlcaError(f"--batch-size must be at least 1, got {batch_size}")
    if not inputs:
        raise SlcaError("no images to predict: the inputs hold no image files (" + ", ".join(IMAGE_EXTENSIONS)
                        + "); give image files, folders or a .txt list of paths")
    model, state = restore_model(task_dir)
    cfg = state.config
    accelerator = make_accelerator(device, cfg.precision)
    model.to(accelerator.device)
    transform, finish = preprocessing(state)
    loader = DataLoader(InputImages(inputs, transform, cfg.image_size), shuffle=False,
                        batch_size=batch_size or cfg.batch_size * 2,
                        num_workers=workers if workers is not None else workers_per_process(False),
                        pin_memory=accelerator.device.type == "cuda")
    loader.finish_batch = finish
    names = class_names(state)
    tasks = (task_of_class(state.seen_sizes) + 1).tolist()  # 1-based task that introduced each output
    k = min(top_k, len(tasks))
    results: List[Prediction] = [Prediction(str(p)) for p in inputs]
    for features, labels in feature_batches(model, loader, accelerator, "predict", show_progress,
                                            logits=model.scores_images):
        probabilities, positions = class_probabilities(model, features).topk(k, dim=1)
        for index, probs, tops in zip(labels.tolist(), probabilities.cpu().tolist(), positions.cpu().tolist()):
            if index < 0:
                continue
            results[index].top = [(names[p], prob, tasks[p]) for prob, p in zip(probs, tops)]
    for result, path in zip(results, inputs):
        if not result.top:
            try:
                read_image(Path(path))
                result.error = f"{path}: could not be predicted"
            except SlcaError as exc:
                result.error = str(exc)
    return state, results


def class_probabilities(model: ContinualModel, features: torch.Tensor) -> torch.Tensor:
    """Softmax over all seen classes of the logits `slca eval` takes its argmax of (same dtype, same heads; the
    features are those logits already when the backbone scores images itself)."""
    logits = features if model.scores_images else model.logits(features.to(model.task_heads[0].weight.dtype))
    return torch.softmax(logits.float(), dim=1)


def format_predictions(results: Sequence[Prediction], fmt: str, header: Dict[str, Any]) -> str:
    """The predictions as a terminal table, CSV (one row per path and rank), JSON or JSON lines."""
    if fmt not in FORMATS:
        raise SlcaError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if fmt == "json":
        return json.dumps({**header, "predictions": [as_record(r) for r in results]}, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(as_record(r)) + "\n" for r in results)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "probability", "task", "error"])
        for r in results:
            if r.error:
                writer.writerow([r.path, "", "", "", "", r.error])
            for rank, (name, prob, task) in enumerate(r.top, 1):
                writer.writerow([r.path, rank, name, f"{prob:.6f}", task, ""])
        return out.getvalue()
    return table(results)


def as_record(result: Prediction) -> Dict[str, Any]:
    if result.error:
        return {"path": result.path, "error": result.error}
    return {"path": result.path, "top_k": [{"class": n, "probability": round(p, 6), "task": t}
                                            for n, p, t in result.top]}


def table(results: Sequence[Prediction]) -> str:
    """path | top-1 class, probability, task | the other top-k classes."""
    width = min(max([len("image")] + [len(r.path) for r in results]), 60)
    name_width = max([len("class")] + [len(r.top[0][0]) for r in results if r.top])
    lines = [f"{'image':<{width}}  {'class':<{name_width}} {'prob':>6} {'task':>4}  next"]
    for r in results:
        path = r.path if len(r.path) <= width else "..." + r.path[-(width - 3):]
        if r.error:
            lines.append(f"{path:<{width}}  unreadable: {r.error}")
            continue
        name, prob, task = r.top[0]
        rest = ", ".join(f"{n} {100 * p:.1f}%" for n, p, _ in r.top[1:])
        lines.append(f"{path:<{width}}  {name:<{name_width}} {100 * prob:>5.1f}% {task:>4}  {rest}")
    return "\n".join(lines) + "\n"
