"""``slca demo``: a real, offline continual-learning experiment in minutes on a CPU. scikit-learn's handwritten
digits (real images, shipped inside scikit-learn) in 5 tasks of 2 classes, one pre-trained backbone, and the
paper's comparison: sequential fine-tuning vs slow learner vs SLCA, with the report and its plots."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .errors import SlcaError

DEMO_METHODS = ("seqft", "sl", "slca")
DEFAULT_BACKBONE = "efficientnet-lite0-in1k"  # real ImageNet-1k weights, shipped in a pip package
# Small digits need few pixels; a CNN runs at any size (a ViT needs its own).
CNN_IMAGE_SIZE = 64


def demo_flags(epochs: int, batch_size: int, image_size: Optional[int], train_per_class: Optional[int],
               test_per_class: Optional[int]) -> Dict[str, Any]:
    return dict(tasks=5, epochs=epochs, batch_size=batch_size, image_size=image_size,
                train_per_class=train_per_class, test_per_class=test_per_class)


def default_image_size(backbone: str) -> Optional[int]:
    from slca_cli.backbones import get_backbone
    spec = get_backbone(backbone)
    return CNN_IMAGE_SIZE if spec.family == "cnn" and spec.image_size > CNN_IMAGE_SIZE else None


def run_demo(out: Path, *, backbone: str = DEFAULT_BACKBONE, epochs: int = 3, batch_size: int = 32,
             image_size: Optional[int] = None, train_per_class: Optional[int] = 60,
             test_per_class: Optional[int] = None, seed: int = 1993, device: str = "auto",
             methods=DEMO_METHODS, log: Callable[[str], None] = print, show_progress: bool = True) -> Dict[str, Any]:
    """Train each method (continuing a finished or interrupted demo in ``out``), then write ``out/report``."""
    from .report import build_report
    from .resolve import resolve_run
    from .runner import run_seed
    from .speed import make_accelerator

    out = Path(out)
    if image_size is None:
        image_size = default_image_size(backbone)
    records: Dict[str, Dict[str, Any]] = {}
    seconds: Dict[str, float] = {}
    for method in methods:
        cfg, data = resolve_run("digits", backbone, method,
                                demo_flags(epochs, batch_size, image_size, train_per_class, test_per_class))
        accelerator = make_accelerator(device, cfg.precision)
        log(f"== {method}: digits ({len(data.train)} train / {len(data.test)} test images, tasks "
            f"{list(cfg.task_sizes)}) | {cfg.backbone} at {cfg.image_size} px | {cfg.epochs} epochs, lr backbone "
            f"{cfg.lr_backbone:g} head {cfg.lr_head:g}{' + alignment' if cfg.align else ''}")
        started = time.perf_counter()
        try:
            records[method] = run_seed(cfg, seed, out / method / f"seed-{seed}", accelerator, data, resume=True,
                                       log=log, show_progress=show_progress)
        except SlcaError as exc:
            if "another experiment" in str(exc):
                raise SlcaError(f"{out} holds a demo with other settings ({exc}); pass another --out") from None
            raise
        seconds[method] = time.perf_counter() - started
    report = build_report([out / m for m in methods], out / "report", figures=True, warn=log)
    return {"records": records, "seconds": seconds, "report": report, "out": str(out)}


def comparison_table(outcome: Dict[str, Any]) -> str:
    """Last-Acc, Inc-Acc, forgetting and time per method, then SLCA's gain over sequential fine-tuning."""
    from .methods import method_spec
    lines = [f"{'method':<8} {'Last-Acc':>9} {'Inc-Acc':>8} {'forgetting':>11} {'seconds':>8}"]
    records = outcome["records"]
    for method, r in records.items():
        lines.append(f"{method_spec(method).label:<8} {r['last_acc']:>9.2f} {r['inc_acc']:>8.2f} "
                     f"{r['forgetting']:>11.2f} {outcome['seconds'][method]:>8.0f}")
    if "slca" in records and "seqft" in records:
        gain = records["slca"]["last_acc"] - records["seqft"]["last_acc"]
        lines.append(f"SLCA - Seq FT: {gain:+.2f} points of Last-Acc "
                     + ("(the paper's effect: the slow learner and classifier alignment prevent most forgetting)"
                        if gain > 10 else "(no clear effect in this run)"))
    return "\n".join(lines)


def written_files(outcome: Dict[str, Any]) -> List[str]:
    report = Path(outcome["out"]) / "report"
    return [str(report / name) for name in ("results.md", "results.csv", "results.json")] + \
        [str(report / f) for f in outcome["report"]["figures"] if f.endswith(".png")][:1]
