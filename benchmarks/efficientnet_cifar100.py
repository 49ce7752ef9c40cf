"""Accuracy benchmark on real data and real weights: Split CIFAR-100 (10 tasks) as an image folder with the
EfficientNet-Lite0 ImageNet-1k backbone, through the `slca train` command line.

Baseline measured in the same run: nearest class mean on the frozen pre-trained features over all 100 classes
(what the backbone gives with no training at all). Each `slca train` variant is a row: its Last-Acc, Inc-Acc,
wall time and peak memory. Prints a table and writes benchmarks/results/efficientnet_cifar100-<device>.json.

    python benchmarks/efficientnet_cifar100.py --variant freeze-bn --variant update-bn   # CPU-sized
    python benchmarks/efficientnet_cifar100.py --image-size 224 --epochs 20 --batch-size 128 --device cuda

The defaults (20 train / 10 test images per class, 64 px, 5 epochs, batch 32) fit a CPU; the second line is the
protocol's image size and schedule on the same subset.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"freeze-bn": ["--freeze-bn"], "update-bn": ["--update-bn"], "sl-freeze-bn": ["--method", "sl"]}


def extract_subset(archive: Path, dest: Path, train: int, test: int) -> Path:
    """train/<class>/*.png and test/<class>/*.png, the first ``train`` / ``test`` files of every class in
    archive order (deterministic); reused when already there."""
    done = dest / ".complete"
    if done.exists():
        return dest
    limit, taken = {"train": train, "test": test}, Counter()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 3 and member.isfile() and taken[parts[0], parts[1]] < limit.get(parts[0], 0):
                taken[parts[0], parts[1]] += 1
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    done.write_text(json.dumps({"train": train, "test": test}))
    return dest


@torch.no_grad()
def nearest_mean_baseline(root: Path, image_size: int, train: int, test: int) -> float:
    """Top-1 (%) of nearest class mean (cosine) on frozen pre-trained features, all classes at once."""
    import slca_cli.backbones as backbones
    from slca_cli.data import attach_transforms, load_dataset
    spec = backbones.get_backbone("efficientnet-lite0-in1k")
    data = load_dataset("folder", str(root), None, train, test)
    attach_transforms(data, image_size, spec.mean, spec.std)
    data.train.transform = data.test.transform  # class means from un-augmented images, as SLCA's statistics
    model = spec.build(None, True).eval()

    def features(split):
        loader = torch.utils.data.DataLoader(split, batch_size=64, num_workers=min(4, os.cpu_count() or 1))
        feats, labels = zip(*[(model(x), y) for x, y in loader])
        return torch.nn.functional.normalize(torch.cat(feats), dim=1), torch.cat(labels)

    train_f, train_y = features(data.train)
    test_f, test_y = features(data.test)
    means = torch.stack([train_f[train_y == c].mean(0) for c in range(data.num_classes)])
    predicted = (test_f @ torch.nn.functional.normalize(means, dim=1).T).argmax(1)
    return float((predicted == test_y).float().mean() * 100)


def run_variant(name: str, root: Path, out: Path, args) -> dict:
    """One `slca train` run of the variant, or its finished run folder when given with --reuse."""
    reused = dict(item.split("=", 1) for item in args.reuse or []).get(name)
    command = [sys.executable, "-m", "slca_cli", "train", "--dataset", "folder", "--data-root", str(root),
               "--backbone", "efficientnet-lite0-in1k", "--tasks", "10", "--epochs", str(args.epochs),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--device", args.device,
               "--no-progress", "--out", str(out),
               *VARIANTS[name]]
    started = time.perf_counter()
    if reused:
        out = Path(reused)
        command[command.index("--out") + 1] = str(out)
    else:
        subprocess.run(command, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    metrics = json.loads((out / "seed-1993" / "metrics.json").read_text())
    seconds = sum(metrics["seconds"]) if reused else time.perf_counter() - started
    return {"variant": name, "last_acc": metrics["last_acc"], "inc_acc": metrics["inc_acc"],
            "task_accuracy": metrics["task_accuracy"], "seconds": seconds, "reused": bool(reused),
            "peak_memory_mb": max(metrics["peak_memory_mb"]), "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=next(
        (Path(p) for p in (os.environ.get("SLCA_CIFAR100_PNG", ""), REPO.parent / "shared/data/cifar100-png.tar.gz",
                           REPO.parent.parent / "shared/data/cifar100-png.tar.gz") if p and Path(p).is_file()),
        REPO.parent / "shared/data/cifar100-png.tar.gz"), help="cifar100-png.tar.gz (default: ../shared/data/)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "slca" / "bench")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--reuse", action="append", metavar="VARIANT=RUN_DIR",
                        help="Tabulate a finished run folder of that variant instead of training it again.")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/efficientnet_cifar100-<device>.json")
    args = parser.parse_args()
    variants = args.variant or ["freeze-bn"]
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    label = torch.cuda.get_device_name(0).replace(" ", "_") if on_gpu else "cpu"
    args.out = args.out or REPO / "benchmarks" / "results" / f"efficientnet_cifar100-{label}.json"

    root = extract_subset(args.archive, args.cache / f"cifar100-{args.train_per_class}-{args.test_per_class}",
                          args.train_per_class, args.test_per_class)
    baseline = nearest_mean_baseline(root, args.image_size, args.train_per_class, args.test_per_class)
    stamp = f"{args.image_size}px-{args.epochs}ep-{time.time():.0f}"
    runs = [run_variant(v, root, args.cache / "runs" / f"{v}-{stamp}", args) for v in variants]

    print(f"\nSplit CIFAR-100 (10 tasks), {args.train_per_class} train / {args.test_per_class} test images per "
          f"class, {args.image_size} px, {args.epochs} epoch(s), batch {args.batch_size}, EfficientNet-Lite0 "
          f"ImageNet-1k")
    print(f"{'row':<34}{'Last-Acc':>10}{'Inc-Acc':>10}{'time s':>10}{'peak MB':>10}")
    print(f"{'frozen features, nearest mean':<34}{baseline:>10.2f}{'':>10}{'':>10}{'':>10}")
    for r in runs:
        print(f"{'slca train ' + r['variant']:<34}{r['last_acc']:>10.2f}{r['inc_acc']:>10.2f}{r['seconds']:>10.0f}"
              f"{r['peak_memory_mb']:>10.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "efficientnet_cifar100", "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class, "image_size": args.image_size, "epochs": args.epochs,
        "batch_size": args.batch_size,
        "baseline_nearest_mean_acc": baseline, "runs": runs, "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "platform": platform.platform()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
