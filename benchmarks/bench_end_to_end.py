"""Projected wall time of the full Split CIFAR-100 recipe (one seed) from rates measured on this machine.

The recipe (spec sections 2, 4, 5): 10 tasks of 10 classes, 5,000 training images per task, 20 epochs at batch
128 -> 1.0M training image passes; a statistics pass over every training image once (50k forwards + the
accumulator + one Cholesky per class); evaluation after every task on all seen test classes (55k forwards);
alignment after tasks 2-10 (5 epochs, 256 samples per seen class). Measured here: the training step and the
forward pass of the backbone (bench_train_step's code), the accumulator on 5,000 features of 10 classes, and
the alignment stage of every task. Not modelled: input pipeline stalls (on-device augmentation keeps CIFAR
off the host), checkpoint writes, start-up. The authors' class of method: about 145 images/s, 2 GPU-hours.

    python -m benchmarks.bench_end_to_end                       # GPU: vit-b16-in21k bf16-sdpa
    python -m benchmarks.bench_end_to_end --tiny                # CPU smoke projection with the tiny ViT
    python -m benchmarks.bench_end_to_end --backbone vit-b16-in21k --mode fp32-sdpa --batch 8 --steps 2  # CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from slca_cli.backbones import get_backbone
from benchmarks.bench_statistics import make_features, make_heads
from benchmarks.bench_train_step import MODES, measure
from benchmarks.common import (add_backbone_flags, add_threads_flag, apply_threads, clock_name, device_info,
                               pick_device, resolve_backbone, table, timed, write_result)
from slca_cli.alignment import AlignmentRecipe, align_classifier
from slca_cli.statistics import ClassStatistics, cholesky_factors

TASKS, CLASSES_PER_TASK, TRAIN_PER_CLASS, TEST_PER_CLASS, EPOCHS = 10, 10, 500, 100, 20
AUTHORS_IMAGES_PER_S, AUTHORS_HOURS = 145.0, 2.0


def statistics_seconds(dim: int, device: torch.device) -> float:
    """One task's accumulator (5,000 features of 10 classes in batches of 128) + its Cholesky factors."""
    features, labels = make_features(CLASSES_PER_TASK, TRAIN_PER_CLASS, dim, device)
    times: Dict[str, float] = {}
    with timed(device, times, "statistics"):
        acc = ClassStatistics(CLASSES_PER_TASK, dim, device=device)
        for i in range(0, len(labels), 128):
            acc.update(features[i:i + 128], labels[i:i + 128])
        cholesky_factors(acc.finalize()[1])
    return times["statistics"]


def alignment_seconds(dim: int, device: torch.device, task: int) -> float:
    """The alignment stage after task ``task`` (0-based): all 10 * (task + 1) seen classes, 5 epochs."""
    classes = CLASSES_PER_TASK * (task + 1)
    gen = torch.Generator(device="cpu").manual_seed(task)
    means = torch.randn(classes, dim, generator=gen, dtype=torch.float64).to(device)
    factor = torch.randn(classes, dim, dim, generator=gen, dtype=torch.float32).to(device) / dim ** 0.5
    chol = torch.linalg.cholesky(factor @ factor.transpose(1, 2) + 0.1 * torch.eye(dim, device=device))
    heads = make_heads([CLASSES_PER_TASK] * (task + 1), dim, device)
    times: Dict[str, float] = {}
    with timed(device, times, "align"):
        align_classifier(heads, means, chol, [CLASSES_PER_TASK] * (task + 1), AlignmentRecipe(),
                         generator=torch.Generator(device=device).manual_seed(0))
    return times["align"]


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    add_backbone_flags(parser)
    parser.add_argument("--mode", default=None, choices=list(MODES),
                        help="default bf16-sdpa on GPUs, fp32-sdpa on CPUs (what --precision auto picks)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    apply_threads(args.threads, device)
    _, backbone = resolve_backbone(args, device)
    mode = args.mode or ("bf16-sdpa" if device.type == "cuda" else "fp32-sdpa")
    spec = get_backbone(backbone)
    steps = args.steps or (5 if device.type == "cpu" else 30)
    rates = measure(backbone, mode, device, args.batch, spec.image_size, warmup=max(1, steps // 3), steps=steps)
    dim = int(spec.build(None, False).num_features)

    train_images = TASKS * CLASSES_PER_TASK * TRAIN_PER_CLASS * EPOCHS
    stats_images = TASKS * CLASSES_PER_TASK * TRAIN_PER_CLASS
    eval_images = sum(CLASSES_PER_TASK * TEST_PER_CLASS * (t + 1) for t in range(TASKS))
    per_task_stats = statistics_seconds(dim, device)
    align = [alignment_seconds(dim, device, t) for t in range(1, TASKS)]
    parts = {
        "stage 1 training": train_images / rates["images_per_s"],
        "statistics forward": stats_images / rates["forward_images_per_s"],
        "statistics accumulate + cholesky": TASKS * per_task_stats,
        "alignment (tasks 2-10)": sum(align),
        "evaluation forward": eval_images / rates["forward_images_per_s"],
    }
    total = sum(parts.values())
    rows = [[name, seconds, seconds / 60, 100 * seconds / total] for name, seconds in parts.items()]
    rows.append(["total", total, total / 60, 100.0])
    machine = device_info(device)
    print(f"Split CIFAR-100 recipe, {backbone} {mode}, batch {args.batch}, on {machine.get('gpu') or 'CPU'} "
          f"({torch.get_num_threads()} thread(s), {clock_name(device)}): {rates['images_per_s']:.1f} train img/s, "
          f"{rates['forward_images_per_s']:.1f} forward img/s")
    print(table(["part", "seconds", "minutes", "%"], rows))
    authors_seconds = train_images / AUTHORS_IMAGES_PER_S
    print(f"authors' class of method at {AUTHORS_IMAGES_PER_S:.0f} img/s: {authors_seconds / 3600:.1f} h of training "
          f"alone; projected here: {total / 3600:.2f} h")
    payload = {"machine": machine, "clock": clock_name(device), "backbone": backbone, "mode": mode, "batch": args.batch,
               "recipe": {"train_image_passes": train_images, "statistics_images": stats_images,
                          "evaluation_images": eval_images, "alignment_tasks": TASKS - 1},
               "measured": {"train_images_per_s": rates["images_per_s"],
                            "forward_images_per_s": rates["forward_images_per_s"],
                            "train_peak_memory_mb": rates["peak_memory_mb"],
                            "statistics_seconds_per_task": per_task_stats,
                            "alignment_seconds_per_task": dict(zip(range(2, TASKS + 1), align))},
               "projection_seconds": parts, "projected_total_seconds": total,
               "projected_total_minutes": total / 60,
               "reference": {"authors_class_images_per_s": AUTHORS_IMAGES_PER_S,
                             "authors_class_gpu_hours": AUTHORS_HOURS, "target_minutes_on_h100": 10},
               "not_modelled": ["input pipeline stalls", "checkpoint writes", "process start-up"]}
    path = write_result(f"bench_end_to_end-{backbone}", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
