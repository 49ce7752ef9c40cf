"""Images delivered per CPU core: the PIL host path against the decoded-image cache, on a CUB-like tree of
real JPEGs (500 x 375, made from scikit-image's photographs and the CIFAR-100 PNGs in ../shared/data).

Measured in one run, single-threaded, process CPU seconds:
1. host path: PIL decode + the fine-grained train transform (Resize((300, 300)), RandomCrop(224), flip, ToTensor,
   Normalize) per image, as a loader worker does it; the test transform likewise;
2. the cache's one-time build (decode + Resize((300, 300)) into uint8, decoded.py);
3. decoded path: batches gathered from the cache (what the host still does when augmentation runs on the GPU),
   and the same plus RandomCrop + flip + normalization as tensor ops on CPU tensors (device_crops.py);
4. the ImageNet-R style (RandomResizedCrop) for reference: PIL against the bounded cache + one batched bicubic
   grid_sample on the CPU (on a GPU this op is what runs; on a CPU it is the expensive part).
Target: the decoded path >= 5x the PIL path's images/s per core.

    python -m benchmarks.bench_data                  # 400 images, about a minute
    python -m benchmarks.bench_data --images 64 --out /tmp/x
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch
from PIL import Image

from benchmarks.common import REPO, apply_threads, device_info, table, write_result
from slca_cli.data.base import FileSplit
from slca_cli.data.decoded import Geometry, build_cache
from slca_cli.data.device_crops import cached_eval_batch, crop_train_batch, fine_grained_train_batch
from slca_cli.data.transforms import build_transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def source_photos():
    from skimage import data as skdata
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    archive = REPO.parent / "shared/data/cifar100-png.tar.gz"
    if archive.is_file():
        import io
        import tarfile
        with tarfile.open(archive, "r:gz") as source:
            for member in source:
                if member.isfile() and member.name.endswith(".png"):
                    photos.append(np.array(Image.open(io.BytesIO(source.extractfile(member).read())).convert("RGB")))
                    if len(photos) >= 12:
                        break
    return photos


def write_tree(root: Path, count: int, classes: int = 20, size=(500, 375)) -> FileSplit:
    """``count`` JPEGs (quality 90) under ``root/<class>/``: random crops of real photos, resized to ``size``."""
    rng = np.random.default_rng(0)
    photos = source_photos()
    files, labels = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(photo[top:top + ch, left:left + cw]).resize(size, Image.BICUBIC)
        path = root / f"{i % classes:03d}.class" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        files.append(path)
        labels.append(i % classes)
    return FileSplit(root, files, labels)


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def pil_pass(split: FileSplit, transform) -> None:
    for i in range(len(split)):
        transform(split.load(i))


def batched(total: int, batch: int, fn) -> None:
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    for indices in order.split(batch):
        fn(indices)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    apply_threads(None, device)
    size, n = args.size, args.images
    big = round(size * 300 / 224)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SLCA_DATA_ROOT"] = str(Path(tmp) / "data-home")
        split = write_tree(Path(tmp) / "cub-like", n)
        disk_mb = sum(f.stat().st_size for f in split.files) / 2**20
        train, test = build_transforms("fine-grained", size, MEAN, STD)
        crop_train, _ = build_transforms("crop", size, MEAN, STD)
        torch.manual_seed(0)
        seconds = {
            "pil_train": cpu_seconds(lambda: pil_pass(split, train)),
            "pil_test": cpu_seconds(lambda: pil_pass(split, test)),
            "pil_crop_train": cpu_seconds(lambda: pil_pass(split, crop_train)),
        }
        caches = {}
        for name, geometry in (("square", Geometry("square", big)), ("center", Geometry("center", size)),
                               ("bounded", Geometry("bounded", round(size * 288 / 224)))):
            seconds[f"build_{name}"] = cpu_seconds(lambda: caches.__setitem__(name, build_cache(split, geometry)))
        square = torch.from_numpy(caches["square"].images)
        center = torch.from_numpy(caches["center"].images)
        bounded = torch.from_numpy(caches["bounded"].images)
        hw = torch.from_numpy(caches["bounded"].sizes)
        gen = torch.Generator().manual_seed(0)
        seconds["decoded_gather"] = cpu_seconds(lambda: batched(n, args.batch, lambda i: square[i].contiguous()))
        seconds["decoded_test_gather"] = cpu_seconds(lambda: batched(n, args.batch, lambda i: center[i].contiguous()))
        seconds["decoded_bounded_gather"] = cpu_seconds(lambda: batched(n, args.batch,
                                                                        lambda i: bounded[i].contiguous()))
        seconds["decoded_train"] = cpu_seconds(lambda: batched(
            n, args.batch, lambda i: fine_grained_train_batch(square[i], size, MEAN, STD, gen)))
        seconds["decoded_test"] = cpu_seconds(lambda: batched(
            n, args.batch, lambda i: cached_eval_batch(center[i], MEAN, STD)))
        seconds["decoded_crop_train"] = cpu_seconds(lambda: batched(
            n, args.batch, lambda i: crop_train_batch(bounded[i], hw[i], size, MEAN, STD, gen)))
    rate = {k: n / max(v, 1e-9) for k, v in seconds.items()}
    rows = [[label, rate[pil], rate[gather], rate[augmented], rate[gather] / rate[pil], rate[augmented] / rate[pil]]
            for label, pil, gather, augmented in (
                ("fine-grained train (CUB/Cars)", "pil_train", "decoded_gather", "decoded_train"),
                ("test (all JPEG datasets)", "pil_test", "decoded_test_gather", "decoded_test"),
                ("crop train (ImageNet-R)", "pil_crop_train", "decoded_bounded_gather", "decoded_crop_train"))]
    print(f"{n} JPEGs of 500 x 375 ({disk_mb:.1f} MB), {size} px, 1 thread, images/s per core (CPU time)")
    print(table(["transform", "PIL host path", "cache: uint8 batches", "cache + augmentation on CPU",
                 "x (batches)", "x (augmented on CPU)"], rows))
    build = {k[6:]: n / seconds[k] for k in seconds if k.startswith("build_")}
    print("cache build, images/s per core (once per dataset, reused by every run and seed): "
          + ", ".join(f"{k} {v:.0f}" for k, v in build.items()))
    gained = 1 / rate["pil_train"] - 1 / rate["decoded_train"]
    print(f"the square cache pays for itself after {(1 / build['square']) / gained:.2f} epochs of training")
    payload = {"machine": device_info(device), "images": n, "image_size": size, "source_size": [500, 375],
               "disk_mb": round(disk_mb, 2), "cpu_seconds": seconds, "images_per_s_per_core": rate,
               "build_images_per_s_per_core": build,
               "speedup_delivered_fine_grained": rate["decoded_gather"] / rate["pil_train"],
               "speedup_delivered_test": rate["decoded_test_gather"] / rate["pil_test"],
               "speedup_train_fine_grained_cpu": rate["decoded_train"] / rate["pil_train"],
               "speedup_test": rate["decoded_test"] / rate["pil_test"],
               "speedup_train_crop_cpu": rate["decoded_crop_train"] / rate["pil_crop_train"],
               "target_speedup": 5.0}
    print(f"wrote {write_result('bench_data', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
