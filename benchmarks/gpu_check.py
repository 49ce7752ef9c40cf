"""The GPU check: what a GPU user runs by default, run once on a lent H100/H200 in at most 8 minutes, offline.

Stages, in order of value (each is timed and recorded even when it fails; the JSON is rewritten after every stage):
  environment     torch, CUDA, NCCL, Triton versions; fused SGD available
  end_to_end      Split CIFAR-100-shaped PNG tree, ViT-B/16 (random init, saved as --weights): 2 short tasks with
                  mid-task checkpoints, SIGKILL in task 2, --resume, then `slca eval`; per-stage seconds of the run
  imagenet_r      ImageNet-R-shaped JPEG tree on the device path, --drift-compensation linear --precision fp16
  cub_ranpac      CUB-shaped JPEG tree on the host path, --method ranpac
  train_step      the bf16 ViT-B/16 training step, eager and --compile: images/s, % of the bf16 dense peak, compile
                  seconds, recompiles
  data_supply     decoded-cache build images/s, upload GB/s, device augmentation images/s, the host loader with the
                  default workers
  alignment       alignment stage seconds at 100 and 200 classes (768-d)
  host_syncs      host syncs per stage-1 step on the device path (torch.cuda.set_sync_debug_mode)

    python benchmarks/gpu_check.py              # on the GPU: benchmarks/results/gpu_check-<gpu>.json + a table
    python benchmarks/gpu_check.py --smoke      # every stage on the CPU at toy sizes (the test suite runs this)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch
from PIL import Image

from benchmarks.common import REPO, device_info, peak_flops, table, write_result

BUDGET_S = 450  # the whole check, H100: stages that would start after this are skipped (recorded as such)


class Sizes:
    """How big each stage is: the real thing on a GPU, toy sizes for --smoke on a CPU."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.backbone = "vit-tiny-test" if smoke else "vit-b16-in21k"
        self.cifar_per_class = (1, 1) if smoke else (8, 4)  # train, test images per class (100 classes)
        self.jpeg_per_class = 3 if smoke else 5  # ImageNet-R and CUB trees (200 classes; ImageNet-R split 80/20)
        self.subset = ["--train-per-class", 1, "--test-per-class", 1] if smoke else []
        self.jpeg_size = (40, 56) if smoke else (300, 400)  # smallest, largest side
        self.batch = 16 if smoke else 64
        self.step_batch = 4 if smoke else 128
        self.steps = 2 if smoke else 20
        self.warmup = 1 if smoke else 5
        self.align = dict(dim=16, per_class=8, epochs=1) if smoke else dict(dim=768, per_class=256, epochs=5)
        self.align_classes = (10, 20) if smoke else (100, 200)
        self.ranpac_dim = 64 if smoke else 10000
        self.timeout = 300 if smoke else 240  # one `slca` command


# -- data in the real layouts ------------------------------------------------------------------------------------

def _pixels(rng, height: int, width: int, shade: int) -> np.ndarray:
    base = np.full((height, width, 3), (shade * 37 % 256, shade * 91 % 256, shade * 53 % 256), dtype=np.int16)
    return np.clip(base + rng.integers(-30, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def write_cifar_tree(root: Path, per_class) -> Path:
    """``train/<class>/*.png`` and ``test/<class>/*.png``, 100 classes of 32 x 32 PNGs (the CIFAR-100 layout)."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class):
        for c in range(100):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_pixels(rng, 32, 32, c)).save(folder / f"{i}.png")
    return root


def _jpeg(path: Path, rng, shade: int, sizes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
    Image.fromarray(_pixels(rng, height, width, shade)).save(path, quality=90)


def write_imagenet_r_tree(root: Path, per_class: int, sizes) -> Path:
    """``imagenet-r/<wnid>/*.jpg``, 200 classes of JPEGs of different sizes (slca splits it 80/20)."""
    rng = np.random.default_rng(1)
    for c in range(200):
        for j in range(per_class):
            _jpeg(root / "imagenet-r" / f"n{1000 + 7 * c:08d}" / f"art_{j}.jpg", rng, c, sizes)
    return root


def write_cub_tree(root: Path, per_class: int, sizes) -> Path:
    """``CUB_200_2011/`` with images/ and its metadata files; the last image of each class is a test image."""
    rng = np.random.default_rng(2)
    folder, image_id = root / "CUB_200_2011", 0
    images, split, labels, names = [], [], [], []
    for c in range(200):
        name = f"{c + 1:03d}.Bird_{c + 1}"
        names.append(f"{c + 1} {name}")
        for j in range(per_class):
            image_id += 1
            relative = f"{name}/Bird_{c + 1}_{j:04d}.jpg"
            _jpeg(folder / "images" / relative, rng, c, sizes)
            images.append(f"{image_id} {relative}")
            split.append(f"{image_id} {int(j < per_class - 1)}")
            labels.append(f"{image_id} {c + 1}")
    for file, lines in (("images.txt", images), ("train_test_split.txt", split), ("image_class_labels.txt", labels),
                        ("classes.txt", names)):
        (folder / file).write_text("\n".join(lines) + "\n")
    return root


def random_weights(backbone: str, path: Path) -> Path:
    """The backbone with random weights as a local ``--weights`` file: no network, no pre-trained download."""
    from safetensors.torch import save_file
    from slca_cli.backbones import get_backbone
    torch.manual_seed(0)
    net = get_backbone(backbone).build(None, False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


# -- `slca` as a user runs it ------------------------------------------------------------------------------------

class Command:
    """``python -m slca_cli ARGS`` with its stderr lines time-stamped as they arrive (stage seconds)."""

    def __init__(self, args: List[Any], env: Dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "slca_cli", *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self.lines: List[tuple] = []
        self.out: List[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read(self, pipe, stamped: bool) -> None:
        for line in pipe:
            if stamped:
                self.lines.append((time.perf_counter(), line.rstrip("\n")))
            else:
                self.out.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for _, line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"`slca` did not reach {text!r}: {self.tail()}")
            time.sleep(0.05)

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError(f"`slca` ran past {timeout} s: {self.tail()}") from None
        for reader in self.readers:
            reader.join(10)
        return code

    def tail(self) -> str:
        return " | ".join(line for _, line in self.lines[-6:] if not line.startswith("slca-trace:"))[-800:]

    def stage_seconds(self) -> Dict[str, float]:
        """Seconds between a trace mark and the next, summed by stage name (fit, statistics, align, ...)."""
        marks = [(t, line.split()[1]) for t, line in self.lines if line.startswith("slca-trace: ")
                 and len(line.split()) > 1 and line.split()[1] != "stalled"]
        seconds: Dict[str, float] = {}
        for (t, stage), (t_next, _) in zip(marks, marks[1:] + [(self.lines[-1][0], "")]):
            seconds[stage] = round(seconds.get(stage, 0.0) + t_next - t, 3)
        return seconds


def slca(args: List[Any], env: Dict[str, str], timeout: float) -> Command:
    command = Command(args, env)
    code = command.finish(timeout)
    if code != 0:
        raise RuntimeError(f"`slca {' '.join(map(str, args[:3]))} ...` exited {code}: {command.tail()}")
    return command


# -- the stages ---------------------------------------------------------------------------------------------------

def stage_environment(ctx: "Check") -> Dict[str, Any]:
    from slca_cli.recipe import fused_optimizer_supported
    info: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None  # a tuple, an int in older torch
    info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    info["bf16_supported"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    info["fused_sgd"] = fused_optimizer_supported("sgd", ctx.device)
    info["fused_adam"] = fused_optimizer_supported("adam", ctx.device)
    return info


def stage_end_to_end(ctx: "Check") -> Dict[str, Any]:
    tree = write_cifar_tree(ctx.work / "cifar100", ctx.sizes.cifar_per_class)
    out = ctx.work / "runs" / "cifar100"
    args = ["train", "--dataset", "cifar100", "--data-root", tree, "--backbone", ctx.sizes.backbone, "--weights",
            ctx.weights, "--device", ctx.device.type, "--progress", "off", "--tasks", 2, "--epochs", 2,
            "--checkpoint-every", 1, "--batch-size", ctx.sizes.batch, "--ca-epochs", 2, "--out", out]
    kill_at = "fit task=2 epoch=2 batch=1"  # after task 2's first epoch was saved (in-progress/)
    first = Command(args, {**ctx.env, "SLCA_TRACE": "1", "SLCA_STALL_AT": kill_at})
    first.wait_for(f"stalled at {kill_at}", ctx.sizes.timeout)
    first.proc.send_signal(signal.SIGKILL)
    first.finish(30)
    resumed = slca([*args, "--resume"], {**ctx.env, "SLCA_TRACE": "1"}, ctx.sizes.timeout)
    resumed_text = "\n".join(line for _, line in resumed.lines) + "\n".join(resumed.out)
    evaluated = slca(["eval", out / "seed-1993" / "task-02", "--device", ctx.device.type, "--progress", "off",
                      "--json"], ctx.env, ctx.sizes.timeout)
    result = json.loads("\n".join(evaluated.out))
    metrics = json.loads((out / "seed-1993" / "metrics.json").read_text())
    seconds = first.stage_seconds()
    for stage, value in resumed.stage_seconds().items():
        seconds[stage] = round(seconds.get(stage, 0.0) + value, 3)
    ok = result["matches_stored"] and "after epoch 1" in resumed_text
    return {"ok": bool(ok), "killed_at": kill_at, "resumed_mid_task": "after epoch 1" in resumed_text,
            "eval_matches_stored": result["matches_stored"], "last_acc": metrics["last_acc"],
            "task_seconds": metrics["seconds"], "peak_memory_mb": metrics["peak_memory_mb"],
            "stage_seconds": seconds}


def stage_imagenet_r(ctx: "Check") -> Dict[str, Any]:
    tree = write_imagenet_r_tree(ctx.work / "imagenet-r", ctx.sizes.jpeg_per_class, ctx.sizes.jpeg_size)
    out = ctx.work / "runs" / "imagenet-r"
    started = time.perf_counter()
    run = slca(["train", "--dataset", "imagenet-r", "--data-root", tree, "--backbone", ctx.sizes.backbone,
                "--weights", ctx.weights, "--device", ctx.device.type, "--progress", "off", "--tasks", 2,
                "--epochs", 1, "--batch-size", ctx.sizes.batch, "--ca-epochs", 1, "--augment-on-device",
                "--drift-compensation", "linear", "--drift-views", 2, "--precision", "fp16", *ctx.sizes.subset,
                "--out", out],
               {**ctx.env, "SLCA_TRACE": "1"}, ctx.sizes.timeout)
    seconds = time.perf_counter() - started
    seed = out / "seed-1993"
    config = json.loads((seed / "config.json").read_text())["config"]
    metrics = json.loads((seed / "metrics.json").read_text())
    from safetensors.torch import load_file
    drift = load_file(str(seed / "task-02" / "stats.safetensors")).get("drift")
    return {"ok": bool(config["device_augment"] and drift is not None and bool(torch.isfinite(drift).all())),
            "device_augment": config["device_augment"], "precision": config["precision"],
            "drift_stored": drift is not None, "last_acc": metrics["last_acc"], "seconds": round(seconds, 2),
            "stage_seconds": run.stage_seconds()}


def stage_cub_ranpac(ctx: "Check") -> Dict[str, Any]:
    tree = write_cub_tree(ctx.work / "cub", ctx.sizes.jpeg_per_class, ctx.sizes.jpeg_size)
    out = ctx.work / "runs" / "cub"
    started = time.perf_counter()
    run = slca(["train", "--dataset", "cub200", "--data-root", tree, "--backbone", ctx.sizes.backbone, "--weights",
                ctx.weights, "--device", ctx.device.type, "--progress", "off", "--tasks", 2,
                "--batch-size", ctx.sizes.batch, "--method", "ranpac", "--ranpac-dim", ctx.sizes.ranpac_dim,
                "--augment-on-host", *ctx.sizes.subset, "--out", out], {**ctx.env, "SLCA_TRACE": "1"}, ctx.sizes.timeout)
    seed = out / "seed-1993"
    config = json.loads((seed / "config.json").read_text())["config"]
    metrics = json.loads((seed / "metrics.json").read_text())
    return {"ok": not config["device_augment"] and metrics["tasks_done"] == 2, "last_acc": metrics["last_acc"],
            "seconds": round(time.perf_counter() - started, 2), "stage_seconds": run.stage_seconds()}


def stage_train_step(ctx: "Check") -> Dict[str, Any]:
    from benchmarks.bench_train_step import build, count_flops, measure
    from torch._dynamo.utils import counters
    size = 32 if ctx.sizes.smoke else 224
    model = build(ctx.sizes.backbone, {"fused": True, "compile": False}, ctx.device)
    images = torch.randn(2, 3, size, size, device=ctx.device)
    flops = count_flops(model, images, torch.zeros(2, dtype=torch.long, device=ctx.device))
    del model
    peak = peak_flops(ctx.device, "bf16")
    result: Dict[str, Any] = {"gflop_per_image": round(flops / 1e9, 2), "bf16_peak_tflops": peak and peak / 1e12}
    counters.clear()
    for mode in ("bf16-sdpa", "bf16-compile"):
        numbers = measure(ctx.sizes.backbone, mode, ctx.device, ctx.sizes.step_batch, size, ctx.sizes.warmup,
                          ctx.sizes.steps)
        result[mode] = {"images_per_s": round(numbers["images_per_s"], 1),
                        "percent_of_bf16_peak": round(100 * numbers["images_per_s"] * flops / peak, 1) if peak
                        else None, "warmup_wall_seconds": round(numbers["warmup_wall_seconds"], 2),
                        "peak_memory_mb": round(numbers["peak_memory_mb"], 1)}
    result["compile_seconds"] = round(result["bf16-compile"]["warmup_wall_seconds"]
                                      - result["bf16-sdpa"]["warmup_wall_seconds"], 2)
    result["recompiles"] = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    result["unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    result["ok"] = all(result[m]["images_per_s"] > 0 for m in ("bf16-sdpa", "bf16-compile"))
    return result


def stage_data_supply(ctx: "Check") -> Dict[str, Any]:
    from slca_cli.data import attach_transforms, load_dataset
    from slca_cli.data.decoded import Geometry, build_cache
    from slca_cli.data.device_crops import crop_train_batch
    from slca_cli.data.loaders import PassLoaders, _upload, default_workers
    from benchmarks.common import synchronize
    tree = ctx.work / "imagenet-r-supply"
    write_imagenet_r_tree(tree, ctx.sizes.jpeg_per_class, ctx.sizes.jpeg_size)
    data = load_dataset("imagenet-r", str(tree))
    size = 32 if ctx.sizes.smoke else 224
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    attach_transforms(data, size, mean, std)
    workers = default_workers(None, data)
    started = time.perf_counter()
    cache = build_cache(data.train, Geometry("bounded", round(size * 288 / 224)), workers)
    build_s = time.perf_counter() - started
    host = torch.from_numpy(cache.images)
    synchronize(ctx.device)
    started = time.perf_counter()
    on_device = _upload(host, ctx.device) if ctx.device.type == "cuda" else host.clone()
    synchronize(ctx.device)
    upload_s = time.perf_counter() - started
    sizes = torch.from_numpy(cache.sizes).to(ctx.device)
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    batch, n = ctx.sizes.step_batch, len(on_device)
    crop_train_batch(on_device[:batch], sizes[:batch], size, mean, std, generator)  # warm-up
    synchronize(ctx.device)
    started, done = time.perf_counter(), 0
    for start in range(0, n, batch):
        crop_train_batch(on_device[start:start + batch], sizes[start:start + batch], size, mean, std, generator)
        done += min(batch, n - start)
    synchronize(ctx.device)
    augment_s = time.perf_counter() - started
    loaders = PassLoaders(data, list(range(data.num_classes)), batch_size=batch, image_size=size, mean=mean, std=std,
                          device=ctx.device, workers=workers, on_device=False)
    loader = loaders.train(list(range(data.num_classes)), 0)
    from slca_cli.data.loaders import finish_batch
    finish = finish_batch(loader)
    started, seen = time.perf_counter(), 0
    for images, labels in loader:
        finish(images.to(ctx.device, non_blocking=True))
        seen += len(labels)
    synchronize(ctx.device)
    host_s = time.perf_counter() - started
    return {"ok": seen == len(data.train) and done == n, "images": n, "host_workers": workers,
            "cache_build_images_per_s": round(n / build_s, 1),
            "upload_gb_per_s": round(host.numel() / upload_s / 1e9, 3),
            "device_augment_images_per_s": round(done / augment_s, 1),
            "host_loader_images_per_s": round(seen / host_s, 1)}


def stage_alignment(ctx: "Check") -> Dict[str, Any]:
    from benchmarks.bench_statistics import run_case
    result: Dict[str, Any] = {}
    for classes in ctx.sizes.align_classes:
        case = run_case(classes, ctx.sizes.align["dim"], ctx.sizes.align["per_class"], ctx.sizes.align["epochs"],
                        ctx.device, baseline=False)
        result[f"{classes}_classes"] = {"align_wall_seconds": round(case["alignment"]["wall_seconds_ours"], 3),
                                        "statistics_seconds": round(case["statistics"]["seconds_accumulator"], 3),
                                        "held_out_accuracy": round(case["alignment"]["held_out_accuracy_ours"], 4)}
    result["ok"] = all(v["align_wall_seconds"] > 0 for v in result.values())
    return result


def stage_host_syncs(ctx: "Check") -> Dict[str, Any]:
    """Stage 1 on the device path through the real loop (fit_task, a TrainingRecipe), syncs counted per step."""
    from slca_cli.backbones import get_backbone
    from slca_cli.data import attach_transforms, load_dataset
    from slca_cli.data.loaders import PassLoaders
    from slca_cli.learner import fit_task
    from slca_cli.model import ContinualModel
    from slca_cli.recipe import TrainingRecipe
    from slca_cli.speed import make_accelerator
    tree = ctx.work / "cifar100"
    if not tree.exists():
        write_cifar_tree(tree, ctx.sizes.cifar_per_class)
    size = 32 if ctx.sizes.smoke else 224
    data = load_dataset("cifar100", str(tree))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    attach_transforms(data, size, mean, std)
    accelerator = make_accelerator(ctx.device.type, "bf16" if ctx.device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    net = get_backbone(ctx.sizes.backbone).build(None, False)
    model = ContinualModel(net, int(net.num_features)).to(accelerator.device)
    model.add_head(50)
    loaders = PassLoaders(data, list(range(100)), batch_size=ctx.sizes.batch, image_size=size, mean=mean, std=std,
                          device=accelerator.device, workers=0, on_device=True)
    loader = loaders.train(list(range(50)), 0)
    recipe = TrainingRecipe(groups=[{"params": list(model.backbone.parameters()), "lr": 1e-4},
                                    {"params": list(model.task_heads[0].parameters()), "lr": 1e-2}], epochs=1)
    steps = len(loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ctx.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            losses = fit_task(model, loader, accelerator, recipe, task=0, label_offset=0, show_progress=False)
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where: Dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    measured = ctx.device.type == "cuda"
    return {"ok": len(losses) == 1 and np.isfinite(losses[0]), "steps": steps,
            "syncs_per_step": round(len(syncs) / steps, 2) if measured else None,
            "sync_sites": dict(sorted(where.items(), key=lambda kv: -kv[1])[:8]) if measured else None,
            "note": None if measured else "no CUDA: the loop ran, syncs are not counted on a CPU"}


STAGES: Dict[str, Callable[["Check"], Dict[str, Any]]] = {
    "environment": stage_environment, "end_to_end": stage_end_to_end, "imagenet_r": stage_imagenet_r,
    "cub_ranpac": stage_cub_ranpac, "train_step": stage_train_step, "data_supply": stage_data_supply,
    "alignment": stage_alignment, "host_syncs": stage_host_syncs}


class Check:
    """One run of the check: device, sizes, the working folder and the result written after every stage."""

    def __init__(self, smoke: bool, work: Path, out: Optional[Path], budget_s: float):
        self.sizes = Sizes(smoke)
        self.device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
        self.work, self.out, self.budget_s = work, out, budget_s
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "SLCA_DATA_ROOT": str(work / "data-root"),
                    "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
        if smoke:  # inductor's code generation alone takes minutes on a small CPU
            self.env.update(SLCA_COMPILE_BACKEND="eager", OMP_NUM_THREADS="1")
            os.environ["SLCA_COMPILE_BACKEND"] = "eager"
        self.result: Dict[str, Any] = {"machine": device_info(self.device), "smoke": smoke,
                                       "backbone": f"{self.sizes.backbone} (random init)", "stages": {}}
        self.weights = random_weights(self.sizes.backbone, work / "random-weights.safetensors")

    def run(self, names: List[str]) -> bool:
        started = time.perf_counter()
        for name in names:
            elapsed = time.perf_counter() - started
            if elapsed > self.budget_s:
                record = {"status": "skipped", "error": f"time budget of {self.budget_s:.0f} s spent"}
            else:
                stage_start = time.perf_counter()
                try:
                    record = {"status": "ok", **STAGES[name](self)}
                    if record.pop("ok", True) is False:
                        record["status"] = "failed"
                except Exception as exc:  # a stage that breaks is the finding: record it and go on
                    record = {"status": "error", "error": f"{exc.__class__.__name__}: {str(exc)[:600]}",
                              "where": traceback.format_exc().strip().splitlines()[-3:]}
                record["seconds"] = round(time.perf_counter() - stage_start, 2)
            self.result["stages"][name] = record
            self.result["total_seconds"] = round(time.perf_counter() - started, 2)
            path = write_result("gpu_check", self.result, self.out)
            print(f"[{name}] {record['status']} in {record.get('seconds', 0):.1f} s -> {path}", flush=True)
        print(summary_table(self.result["stages"]))
        return all(r["status"] == "ok" for r in self.result["stages"].values())


def summary_table(stages: Dict[str, Dict[str, Any]]) -> str:
    """One row per stage: status, seconds and its headline numbers."""
    def headline(name: str, r: Dict[str, Any]) -> str:
        if r["status"] != "ok":
            return r.get("error", "")[:90]
        if name == "environment":
            return f"torch {r['torch']}, CUDA {r['cuda']}, NCCL {r['nccl']}, Triton {r['triton']}, fused SGD " \
                   f"{r['fused_sgd']}"
        if name == "end_to_end":
            return (f"Last-Acc {r['last_acc']:.2f}, eval matches {r['eval_matches_stored']}, stages "
                    + ", ".join(f"{k} {v:.1f}s" for k, v in r["stage_seconds"].items()))
        if name in ("imagenet_r", "cub_ranpac"):
            return f"Last-Acc {r['last_acc']:.2f}, {r['seconds']:.1f} s"
        if name == "train_step":
            return (f"eager {r['bf16-sdpa']['images_per_s']} img/s ({r['bf16-sdpa']['percent_of_bf16_peak']}% peak),"
                    f" compiled {r['bf16-compile']['images_per_s']} img/s ({r['bf16-compile']['percent_of_bf16_peak']}"
                    f"% peak), compile {r['compile_seconds']} s, recompiles {r['recompiles']}")
        if name == "data_supply":
            return (f"cache {r['cache_build_images_per_s']} img/s, upload {r['upload_gb_per_s']} GB/s, device aug "
                    f"{r['device_augment_images_per_s']} img/s, host ({r['host_workers']} workers) "
                    f"{r['host_loader_images_per_s']} img/s")
        if name == "alignment":
            return ", ".join(f"{k.replace('_classes', '')} classes {v['align_wall_seconds']} s" for k, v in r.items()
                             if isinstance(v, dict))
        if name == "host_syncs":
            return f"{r['syncs_per_step']} syncs/step over {r['steps']} steps" if r["syncs_per_step"] is not None \
                else r["note"]
        return ""
    rows = [[name, r["status"], r.get("seconds"), headline(name, r)] for name, r in stages.items()]
    return table(["stage", "status", "seconds", "numbers"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU at toy sizes (tens of seconds)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results; with --smoke the working folder)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="stages that would start after this many seconds are skipped")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slca-gpu-check-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.smoke:
            torch.set_num_threads(1)
        out = args.out or (work if args.smoke else None)
        check = Check(args.smoke, work, out, args.budget_s)
        ok = check.run(args.stages)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
