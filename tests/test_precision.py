"""Mixed precision (bf16, fp16 with loss scaling), fused attention and torch.compile on CPU."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from slca_cli.backbones import get_backbone
from slca_cli.presets import RunConfig
from slca_cli.resolve import resolve_run
from slca_cli.restore import build_model
from slca_cli.speed import enable_fused_attention, resolve_precision

from conftest import REPO, TINY, read_json, run_subprocess

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 8, "--test-per-class", 3,
         "--batch-size", 8]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu_without_nans(tmp_path, precision):
    # A fresh interpreter: accelerate keeps one precision per process.
    proc = run_subprocess("train", *TINY, *SMALL, "--precision", precision, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"x1 {precision}" in proc.stdout
    run = tmp_path / "seed-1993"
    metrics = read_json(run / "metrics.json")
    assert all(math.isfinite(a) for a in metrics["task_accuracy"])
    assert read_json(run / "config.json")["config"]["precision"] == precision
    for task in ("task-01", "task-02"):
        stats = load_file(str(run / task / "stats.safetensors"))
        assert stats["means"].dtype == stats["chol"].dtype == torch.float64
        assert all(torch.isfinite(t).all() for t in stats.values())
        model = load_file(str(run / task / "model.safetensors"))
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in model.values())


def test_fp16_on_cpu_autocasts_and_scales_the_loss():
    """accelerate alone would silently train fp16 in fp32 on CPU; ours autocasts and uses a GradScaler."""
    script = textwrap.dedent("""
        import torch
        from slca_cli.speed import make_accelerator
        acc = make_accelerator("cpu", "fp16")
        assert acc.mixed_precision == "fp16" and isinstance(acc.scaler, torch.amp.GradScaler)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        x = torch.randn(5, 4)
        reference = torch.autograd.grad(model(x).pow(2).mean(), model.weight)[0]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = acc.prepare(model, opt)
        with acc.autocast():
            assert torch.nn.Linear(4, 3)(x).dtype == torch.float16
        out = model(x)  # prepare wraps forward in the autocast, outputs back in float32
        acc.backward(out.pow(2).mean())
        scale = acc.scaler.get_scale()
        ratio = (model.weight.grad.norm() / reference.norm()).item()
        assert scale > 1 and abs(ratio / scale - 1) < 0.01, (scale, ratio)  # backward saw the scaled loss
        before = model.weight.detach().clone()
        opt.step()  # unscales: the update is lr * the true gradient
        torch.testing.assert_close(before - model.weight.detach(), 0.1 * reference, rtol=0.01, atol=1e-4)
        print("ok", scale)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_auto_precision_follows_the_device_and_an_accelerate_config(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision("auto", on_gpu=False) == "fp32"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=False) == "fp32"
    assert resolve_precision("fp16", on_gpu=False) == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "fp16"
    assert resolve_precision("fp32", on_gpu=True) == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch sets when nothing is configured
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"


def tiny_config(**changes):
    cfg, _ = resolve_run("synthetic", "vit-tiny-test", "slca", {"tasks": 2, "num_classes": 4,
                                                                "train_per_class": 2, "test_per_class": 1})
    return cfg.replace(**changes)


def test_attention_runs_through_the_fused_kernel(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model = build_model(tiny_config(), get_backbone("vit-tiny-test"), pretrained=False, seed=0)
    model.features(torch.randn(2, 3, 32, 32))
    assert len(calls) == 2  # one per block of the 2-block tiny ViT
    # Even where timm was told to use the explicit softmax (TIMM_FUSED_ATTN=0), the blocks are switched back.
    for block in model.backbone.blocks:
        block.attn.fused_attn = False
    explicit = model.features(torch.ones(1, 3, 32, 32))
    assert enable_fused_attention(model.backbone) == 2
    calls.clear()
    torch.testing.assert_close(model.features(torch.ones(1, 3, 32, 32)), explicit, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2


def test_compile_flag_compiles_the_backbone_and_keeps_checkpoint_keys(tmp_path, cli, monkeypatch):
    import torch._dynamo
    monkeypatch.setenv("SLCA_COMPILE_BACKEND", "eager")  # graph capture without inductor's slow codegen
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flags = [*TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 4, "--test-per-class", 2,
             "--out", tmp_path]
    code, _, stderr = cli("train", *flags, "--compile")
    assert code == 0, stderr
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    run = tmp_path / "seed-1993"
    assert read_json(run / "config.json")["config"]["compile"] is True
    keys = load_file(str(run / "task-02" / "model.safetensors")).keys()
    assert not any("_orig_mod" in k for k in keys) and "backbone.cls_token" in keys
    # compile is how a run executes, not what it computes: resuming without it is the same experiment.
    code, stdout, stderr = cli("train", *flags, "--resume")
    assert code == 0 and "2/2 tasks done" in stdout, stderr
    assert RunConfig.from_dict(read_json(run / "config.json")["config"]).compile is False
