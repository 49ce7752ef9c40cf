"""How the backbone runs fast: mixed precision through accelerate, fused attention, torch.compile."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .errors import SlcaError
from .presets import check_choice

DEVICES = ("auto", "cpu", "cuda")
_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(precision: str, on_gpu: bool, bf16_supported: Optional[bool] = None) -> str:
    """fp32, bf16 or fp16. ``auto``: the accelerate config's mixed precision when ``accelerate launch`` set bf16
    or fp16, else bf16 on a GPU that supports it, else fp32 (CPU bf16 is slower than fp32 without AMX). The
    launcher's ``no`` is its default whenever nothing was configured, so it does not force fp32 (--precision
    fp32 does)."""
    if check_choice("precision", precision) != "auto":
        return precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched in ("fp16", "bf16"):
        return launched
    if bf16_supported is None:
        bf16_supported = on_gpu and torch.cuda.is_bf16_supported()
    return "bf16" if on_gpu and bf16_supported else "fp32"


def make_accelerator(device: str, precision: str, log_with=(), project_dir=None):
    """The Accelerator owns devices, precision and gradient sync (see ``resolve_precision`` for ``auto``), and
    the ``--log-with`` trackers (tracking.py; ``project_dir``: the run folder).

    ``--batch-size`` stays the global batch under several processes (``split_batches``): each process trains on
    its slice, so the optimization matches a one-process run.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from .tracking import accelerate_trackers
    if device not in DEVICES:
        raise SlcaError(f"--device must be one of {', '.join(DEVICES)}, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise SlcaError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    launched_on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    on_gpu = device != "cpu" and not launched_on_cpu and torch.cuda.is_available()
    precision = resolve_precision(precision, on_gpu)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=accelerate_mixed_precision(precision),
                              dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
                              log_with=accelerate_trackers(log_with), project_dir=project_dir)
    enable_fp16_on_cpu(accelerator)
    return accelerator


def accelerate_mixed_precision(precision: str) -> str:
    """accelerate's name for a resolved precision (fp32 -> ``no``)."""
    return _TO_ACCELERATE[precision]


def enable_fp16_on_cpu(accelerator) -> None:
    """accelerate ignores fp16 on CPU (no autocast, no loss scaling); turn both on with torch's CPU GradScaler,
    so ``--precision fp16`` means the same computation on every device.

    Must run before ``accelerator.prepare``: prepared optimizers take the scaler then. ``accelerator.backward``
    scales the loss, the prepared optimizer unscales, skips steps with non-finite gradients and updates the scale.
    """
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")


def enable_fused_attention(module: nn.Module) -> int:
    """Route every timm attention block through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPUs); returns how many blocks were switched or already on. Same math as the explicit softmax."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = True
            count += 1
    return count


def compile_backbone(backbone: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """``torch.compile`` the backbone's forward for full batches only: the first batch size seen in training
    mode and the first in evaluation mode run the compiled graph, any other (a partial last batch) runs eagerly,
    so no task, seed or resume recompiles for its odd last batch. Parameter names and state-dict keys stay as
    they are (only ``forward`` is wrapped), so checkpoints of compiled and eager runs are interchangeable.
    Compilation happens lazily at the first forward; inductor's cache lives in ``~/.cache/slca/inductor``
    (``TORCHINDUCTOR_CACHE_DIR`` to move it), so later runs load the compiled code instead of compiling again.
    ``SLCA_COMPILE_BACKEND`` picks another backend than inductor (``eager`` to debug graph breaks, or in tests,
    where inductor's code generation takes a minute on a small CPU)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser("~/.cache/slca/inductor"))
    eager = backbone.forward
    compiled = torch.compile(eager, backend=backend or os.environ.get("SLCA_COMPILE_BACKEND", "inductor"),
                             dynamic=False)
    full: dict = {}

    def forward(images, *args, **kwargs):
        size = full.setdefault(backbone.training, images.shape[0])
        return (compiled if images.shape[0] == size else eager)(images, *args, **kwargs)

    forward.slca_compiled = compiled  # what runs full batches (tests look at it)
    backbone.forward = forward
    return backbone
