"""Images/s and peak memory of the stage-1 training step: the authors' setting against ours, same run.

Modes (each the real step: backbone + task head, cross-entropy on the head, SGD with two learning rates):
  fp32-eager    fp32, attention as explicit softmax(QK^T)V (the authors' setting: fp32, pre-SDPA timm)
  fp32-sdpa     fp32, fused scaled-dot-product attention
  bf16-sdpa     bf16 autocast + fused attention (our default on GPUs)
  bf16-compile  bf16 autocast + fused attention + torch.compile of the backbone (--compile)
Targets on an H100 (ViT-B/16, 224 px, batch 128): bf16 modes >= 3x fp32-eager, >= 40% of the bf16 peak FLOP/s
(a ViT-B/16 training step is about 105 GFLOP per image; the script also counts the FLOPs of the step itself).
Forward-only (evaluation / statistics) throughput is measured too, for bench_end_to_end.

    python -m benchmarks.bench_train_step                 # GPU: vit-b16-in21k at 224 px; CPU: --tiny
    python -m benchmarks.bench_train_step --tiny          # the 2-block test ViT at 32 px (CI, CPU)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from slca_cli.backbones import get_backbone
from benchmarks.common import (PeakMemory, add_backbone_flags, add_threads_flag, apply_threads, clock_name,
                               device_info, peak_flops, pick_device, resolve_backbone, synchronize, table, timed,
                               write_result)
from slca_cli.model import ContinualModel
from slca_cli.speed import compile_backbone, enable_fused_attention

MODES = {
    "fp32-eager": dict(dtype=None, fused=False, compile=False),
    "fp32-sdpa": dict(dtype=None, fused=True, compile=False),
    "bf16-sdpa": dict(dtype=torch.bfloat16, fused=True, compile=False),
    "bf16-compile": dict(dtype=torch.bfloat16, fused=True, compile=True),
}
ISSUE_GFLOP_PER_IMAGE = {"vit-b16-in21k": 105.0}


def build(backbone: str, mode: dict, device: torch.device, classes: int = 10) -> ContinualModel:
    torch.manual_seed(0)
    net = get_backbone(backbone).build(None, False)  # random weights: speed does not depend on them
    for sub in net.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = mode["fused"]
    if mode["fused"]:
        enable_fused_attention(net)
    model = ContinualModel(net, int(net.num_features)).to(device)
    model.add_head(classes)
    if mode["compile"]:
        compile_backbone(model.backbone)
    return model


def make_step(model: ContinualModel, device: torch.device, dtype: Optional[torch.dtype]):
    groups = [{"params": list(model.backbone.parameters()), "lr": 1e-4},
              {"params": list(model.task_heads[0].parameters()), "lr": 1e-2}]
    optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9, weight_decay=5e-4)

    def step(images, labels):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images, head=0)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def count_flops(model: ContinualModel, images, labels) -> float:
    """FLOPs of one forward + backward (matmuls, convolutions, attention), per image."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images, head=0), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def measure(backbone: str, mode_name: str, device: torch.device, batch: int, size: int, warmup: int,
            steps: int) -> Dict:
    mode = MODES[mode_name]
    model = build(backbone, mode, device)
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    step = make_step(model, device, mode["dtype"])
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):  # includes compilation for the compiled mode
        loss = step(images, labels)
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    times: Dict[str, float] = {}
    with PeakMemory(device) as memory, timed(device, times, "train"):
        for _ in range(steps):
            loss = step(images, labels)
    seconds = times["train"]
    assert torch.isfinite(loss), f"{mode_name}: loss {loss}"
    model.eval()
    with torch.no_grad():
        with torch.autocast(device.type, dtype=mode["dtype"] or torch.float32, enabled=mode["dtype"] is not None):
            for _ in range(max(1, warmup // 2)):
                model.features(images)
            with timed(device, times, "forward"):
                for _ in range(steps):
                    model.features(images)
            forward_seconds = times["forward"]
    return {"mode": mode_name, "images_per_s": batch * steps / seconds, "step_ms": 1000 * seconds / steps,
            "forward_images_per_s": batch * steps / forward_seconds, "peak_memory_mb": memory.mb,
            "warmup_wall_seconds": warmup_seconds, "train_wall_seconds": times["train_wall"],
            "final_loss": float(loss)}


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    add_backbone_flags(parser)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    apply_threads(args.threads, device)
    tiny, backbone = resolve_backbone(args, device)
    size = get_backbone(backbone).image_size
    batch = args.batch or (32 if tiny else 128)
    steps = args.steps or (10 if device.type == "cpu" else 30)
    warmup = args.warmup or (3 if device.type == "cpu" else 10)

    first = build(backbone, MODES["fp32-eager"], device)
    sample = torch.randn(2, 3, size, size, device=device), torch.zeros(2, dtype=torch.long, device=device)
    flops_per_image = count_flops(first, *sample)
    del first
    results: List[Dict] = []
    for name in args.modes:
        r = measure(backbone, name, device, batch, size, warmup, steps)
        dtype = "bf16" if name.startswith("bf16") else "fp32"
        peak = peak_flops(device, dtype)
        r["achieved_tflops"] = flops_per_image * r["images_per_s"] / 1e12
        r["peak_tflops"] = peak / 1e12 if peak else None
        r["fraction_of_peak"] = flops_per_image * r["images_per_s"] / peak if peak else None
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r for r in results if r["mode"] == "fp32-eager"), None)
    for r in results:
        r["speedup_vs_fp32_eager"] = r["images_per_s"] / base["images_per_s"] if base else None
    print(f"{backbone} at {size} px, batch {batch}, {device_info(device).get('gpu') or 'CPU'} "
          f"({torch.get_num_threads()} thread(s)); {flops_per_image / 1e9:.2f} GFLOP per image per training step "
          f"(counted); rates from {clock_name(device)}")
    print(table(["mode", "img/s", "x fp32-eager", "fwd img/s", "peak MB", "TFLOP/s", "% of peak", "warmup s"],
                [[r["mode"], r["images_per_s"], r["speedup_vs_fp32_eager"], r["forward_images_per_s"],
                  r["peak_memory_mb"], r["achieved_tflops"],
                  None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"], r["warmup_wall_seconds"]]
                 for r in results]))
    payload = {"machine": device_info(device), "clock": clock_name(device), "backbone": backbone,
               "image_size": size, "batch": batch, "steps": steps, "warmup_steps": warmup,
               "gflop_per_image_counted": flops_per_image / 1e9,
               "gflop_per_image_issue": ISSUE_GFLOP_PER_IMAGE.get(backbone),
               "targets": {"bf16_speedup_vs_fp32_eager": ">= 3 (H100)", "fraction_of_bf16_peak": ">= 0.4 (H100)"},
               "results": results}
    path = write_result(f"bench_train_step-{backbone}", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
