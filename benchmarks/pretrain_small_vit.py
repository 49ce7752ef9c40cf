"""Pre-train a small ViT on the first classes of real CIFAR-100, for CPU-scale comparisons of the ViT-only methods.

No real ViT weights are available on CPU-only machines, and prompt or adapter methods compared on a random ViT say
nothing. This script trains the `vit-tiny-test` architecture (32 px, patch 4, 64-d, 2 blocks) from scratch on the
first ``--classes`` classes (ids 0-49 of the sorted class names) of shared/data/cifar100-png.tar.gz, so that
class-incremental runs on the other classes start from a real (if small) pre-trained representation:

    python benchmarks/pretrain_small_vit.py                 # 17-25 min on 2 cores, then cached
    slca train --dataset cifar100 --data-root ... --backbone vit-tiny-test --weights <printed path> ...

Deterministic from ``--seed`` (one process, no loader workers). The weights (the backbone without its head, a
safetensors file that `--weights` loads) and a JSON record beside them (settings, accuracy on the pre-training
classes' test images, seconds) are cached under ``~/.cache/slca/small-vit/`` (``--cache-dir``); a second call with
the same settings prints the cached path. ``--smoke``: generated images, a few steps, for the test suite.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import CIFAR100_ARCHIVE  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

# The backbone `--backbone vit-tiny-test --weights FILE` rebuilds (backbones/vit.py).
ARCH = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
MEAN = STD = (0.5, 0.5, 0.5)


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("SLCA_CIFAR100_PNG", str(CIFAR100_ARCHIVE)),
                        help="CIFAR-100 as train/<class>/*.png, test/<class>/*.png (folder or .tar.gz)")
    parser.add_argument("--classes", type=int, default=50, help="pre-train on class ids 0 .. N-1")
    parser.add_argument("--epochs", type=int, default=45,
                        help="45: 44.9%% test accuracy on the 50 classes; 22 s per epoch (196 steps of 128 images) on 2 idle cores, 25 min in all on one thread of a loaded machine")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, cosine schedule with 2 warm-up epochs")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "slca" / "small-vit"))
    parser.add_argument("--force", action="store_true", help="train again even if the weights are cached")
    parser.add_argument("--smoke", action="store_true", help="generated images, 1 epoch: checks the script runs")
    return parser.parse_args(argv)


def load_splits(args: argparse.Namespace):
    """(train, test) datasets of the pre-training classes under the CIFAR transforms at 32 px."""
    from slca_cli.data import attach_transforms, load_dataset
    if args.smoke:
        data = load_dataset("synthetic", None, args.classes, 8, 4)
    else:
        data = load_dataset("cifar100", args.data_root)
    attach_transforms(data, ARCH["img_size"], MEAN, STD)
    keep = lambda split: [i for i, y in enumerate(split.labels) if y < args.classes]  # noqa: E731
    return Subset(data.train, keep(data.train)), Subset(data.test, keep(data.test))


def build_model(classes: int) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**ARCH, num_classes=classes)


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def cache_paths(args: argparse.Namespace):
    stem = (f"{'smoke' if args.smoke else 'cifar100'}-first{args.classes}-e{args.epochs}-b{args.batch_size}"
            f"-lr{args.lr:g}-wd{args.weight_decay:g}-seed{args.seed}")
    folder = Path(args.cache_dir).expanduser()
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def pretrain(args: argparse.Namespace) -> Dict[str, Any]:
    """Train, save the backbone's weights and the record atomically; return the record."""
    from safetensors.torch import save_file
    torch.manual_seed(args.seed)
    train, test = load_splits(args)
    model = build_model(args.classes)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=len(train) > args.batch_size,
                        generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total, warmup = args.epochs * len(loader), min(2, args.epochs) * len(loader)
    started, step, losses = time.perf_counter(), 0, []
    for epoch in range(args.epochs):
        model.train()
        running, seen = 0.0, 0
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, warmup, args.lr)
            loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, seen, step = running + float(loss.detach()) * len(labels), seen + len(labels), step + 1
        losses.append(round(running / max(seen, 1), 4))
        print(f"epoch {epoch + 1}/{args.epochs}: loss {losses[-1]:.3f} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    test_loader = DataLoader(test, batch_size=256)
    record = {"architecture": ARCH, "backbone": "vit-tiny-test", "classes": list(range(args.classes)),
              "dataset": "synthetic" if args.smoke else "cifar100",
              "data_root": None if args.smoke else str(args.data_root), "train_images": len(train),
              "test_images": len(test), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "weight_decay": args.weight_decay, "seed": args.seed, "train_loss": losses,
              "test_accuracy": round(accuracy(model, test_loader), 2),
              "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__}
    weights, sidecar = cache_paths(args)
    weights.parent.mkdir(parents=True, exist_ok=True)
    backbone = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    partial = weights.with_suffix(".partial")
    save_file(backbone, str(partial))
    os.replace(partial, weights)
    sidecar.write_text(json.dumps(record, indent=1))
    return record


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if args.smoke:
        args.classes, args.epochs, args.batch_size = min(args.classes, 4), 1, 8
    weights, sidecar = cache_paths(args)
    if weights.exists() and sidecar.exists() and not args.force:
        print(f"cached: {weights}")
        return 0
    if not args.smoke and not Path(args.data_root).exists():
        print(f"error: {args.data_root} does not exist; pass --data-root (CIFAR-100 as train/<class>/*.png, "
              f"test/<class>/*.png, a folder or .tar.gz)", file=sys.stderr)
        return 2
    record = pretrain(args)
    print(f"test accuracy on classes 0-{args.classes - 1}: {record['test_accuracy']:.2f}% after "
          f"{record['seconds']:.0f} s")
    print(f"weights: {weights}\n  slca train ... --backbone vit-tiny-test --weights {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
