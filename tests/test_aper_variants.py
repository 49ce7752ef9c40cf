"""APER's adaptation variants (issue 22): --aper-variant adapter / ssf / vpt. SSF's and VPT's math, which parameters
each variant trains, its presets and report label; each through the whole CLI: train, `slca eval`, `slca predict`,
`slca export --format onnx` (and the plain export refused in one line), a SIGKILL + --resume, bad values in one line.
The fine-tuning variant (the default) is tests/test_later_methods.py's `aper`."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from conftest import TINY, assert_one_line_error, read_json
from procs import Running, assert_kill_and_resume_match

from slca_cli.methods.aper import DeepPrompts
from slca_cli.methods.ssf import ScaleShift, inject_ssf

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 6, "--train-per-class", 8, "--test-per-class", 6,
         "--batch-size", 8]
VARIANTS = ("adapter", "ssf", "vpt")
# What each variant trains, as a part of its checkpoint keys under backbone.adapted.
TRAINED = {"adapter": ".adapters.0.", "ssf": ".ssf_", "vpt": "backbone.adapted.prompts"}
RESULT_KEYS = ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc", "counts", "train_loss")


def tiny_vit():
    from slca_cli.backbones import get_backbone
    torch.manual_seed(0)
    return get_backbone("vit-tiny-test").build(None, False).eval()


# ---- math ----

def test_scale_shift_scales_and_shifts_each_output_channel():
    torch.manual_seed(0)
    linear, conv = nn.Linear(5, 3), nn.Conv2d(2, 4, 3)
    x, images = torch.randn(2, 7, 5), torch.randn(2, 2, 6, 6)
    for layer, inputs, view in ((linear, x, (1, 1, -1)), (conv, images, (1, -1, 1, 1))):
        wrapped = ScaleShift(layer, layer.weight.shape[0])
        want = layer(inputs) * wrapped.ssf_scale.view(view) + wrapped.ssf_shift.view(view)
        torch.testing.assert_close(wrapped(inputs), want)
        scale, shift = wrapped.ssf_scale.detach(), wrapped.ssf_shift.detach()
        assert abs(float(scale.mean()) - 1) < 0.1 and abs(float(shift.mean())) < 0.1  # N(1, 0.02), N(0, 0.02)


def test_ssf_goes_after_the_patch_embedding_each_blocks_six_layers_and_the_final_norm():
    vit = tiny_vit()
    added = inject_ssf(vit)
    assert len(added) == 2 + 6 * len(vit.blocks)
    assert isinstance(vit.patch_embed.proj, ScaleShift) and isinstance(vit.norm, ScaleShift)
    block = vit.blocks[0]
    assert all(isinstance(m, ScaleShift) for m in (block.norm1, block.attn.qkv, block.attn.proj, block.norm2,
                                                   block.mlp.fc1, block.mlp.fc2))
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_deep_prompts_are_appended_before_every_block_and_dropped_after_it():
    vit = tiny_vit()
    prompted = DeepPrompts(vit, 3)
    assert prompted.prompts.shape == (len(vit.blocks), 3, 64) and not prompted.prompts.any()  # zeros at first
    with torch.no_grad():
        prompted.prompts.normal_()
    images = torch.randn(2, 3, 32, 32)
    x = vit._pos_embed(vit.patch_embed(images))
    for block, prompt in zip(vit.blocks, prompted.prompts):
        x = block(torch.cat([x, prompt.expand(2, -1, -1)], dim=1))[:, :x.shape[1]]
    torch.testing.assert_close(prompted(images), vit.norm(x)[:, 0])
    (prompted(images) * torch.randn(64)).sum().backward()
    assert prompted.prompts.grad is not None and prompted.prompts.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ("finetune",) + VARIANTS)
def test_each_variant_trains_only_its_own_parameters_and_the_cosine_head_on_the_first_task(variant):
    from slca_cli.methods import get_method
    from slca_cli.model import ContinualModel
    from slca_cli.presets import DEFAULTS, RunConfig
    cfg = RunConfig(**dict(DEFAULTS, dataset="synthetic", backbone="vit-tiny-test", method="aper", num_classes=5,
                           task_sizes=(2, 3), aper_variant=variant))
    method = get_method("aper")
    backbone = method.wrap_backbone(tiny_vit(), cfg)
    model = ContinualModel(backbone, int(backbone.num_features))
    model.add_head(2)
    method.start_task(model, 0, cfg)
    recipe = method.recipe(model, 0, cfg)
    recipe.mark_trainable(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {"task_heads.0.weight", "task_heads.0.sigma"}
    adapted = {f"backbone.adapted.{n}" for n, _ in backbone.adapted.named_parameters()}
    if variant == "finetune":
        assert trained == adapted | head
    else:
        assert trained == {n for n in adapted if TRAINED[variant] in f"backbone.adapted.{n}" or TRAINED[variant]
                           in n} | head
        assert len(trained) > len(head)
    assert not method.trains(1, cfg)


def test_each_variant_has_its_configs_presets_and_report_label():
    from slca_cli.presets import resolve_config
    from slca_cli.report import method_label

    def resolved(dataset, variant, **flags):
        cfg = resolve_config(dataset, "vit-b16-in21k", "aper", backbone_family="supervised", backbone_image_size=224,
                             backbone_mean=(0.5,) * 3, backbone_std=(0.5,) * 3, num_classes=100,
                             task_sizes=[10] * 10, overrides=dict(flags, aper_variant=variant))
        return cfg.to_dict()

    keys = ("epochs", "batch_size", "lr_backbone", "lr_head", "weight_decay")
    want = {("cifar100", "finetune"): (6, 128, 0.01, 0.01, 0.05),  # LAMDA-PILOT exps/aper_finetune.json
            ("imagenet-r", "finetune"): (5, 144, 0.01, 0.01, 0.005),  # ... aper_finetune_inr.json
            ("cifar100", "adapter"): (20, 48, 0.01, 0.01, 5e-4),  # aper_aperpter.json
            ("imagenet-r", "adapter"): (10, 16, 0.05, 0.05, 0.005),  # aper_aperpter_inr.json
            ("cifar100", "ssf"): (20, 48, 0.01, 0.01, 5e-4), ("imagenet-r", "ssf"): (20, 48, 0.01, 0.01, 5e-4),
            ("cifar100", "vpt"): (20, 48, 0.01, 0.01, 5e-4),  # aper_vpt_deep.json
            ("imagenet-r", "vpt"): (20, 24, 0.05, 0.05, 5e-4)}  # aper_vpt_deep_inr.json
    for (dataset, variant), values in want.items():
        config = resolved(dataset, variant)
        assert tuple(config[k] for k in keys) == values, (dataset, variant)
        assert config["schedule"] == "cosine" and config["min_lr"] == 0 and config["optimizer"] == "sgd"
        assert method_label(config) == f"APER ({variant})"
    assert resolved("cifar100", "vpt")["prompt_length"] == 5 and resolved("imagenet-r", "vpt")["prompt_length"] == 30
    assert resolved("cifar100", "adapter")["adapter_bottleneck"] == 64
    assert resolved("imagenet-r", "vpt", epochs=3, prompt_length=7)["epochs"] == 3  # a flag beats the preset
    assert resolved("imagenet-r", "vpt", epochs=3, prompt_length=7)["prompt_length"] == 7


# ---- whole CLI ----

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run per variant (ssf's in its own process, as the resumed run it is compared with)."""
    from conftest import Cli
    root = tmp_path_factory.mktemp("aper-variants")
    for variant in VARIANTS:
        args = ["train", *TINY, *SMALL, "--method", "aper", "--aper-variant", variant, "--out", root / variant]
        if variant == "ssf":
            run = Running(args)
            assert run.finish() == 0, "\n".join(run.lines[-20:])
        else:
            code, _, stderr = Cli()(*args)
            assert code == 0, stderr
    return root


def adapted_as_pretrained(key):
    """The pre-trained branch's key for a key of the adapted branch (the variant's wrappers left out)."""
    for wrapper in (".block.", ".base.", ".vit."):
        key = key.replace(wrapper, ".")
    return key.replace("backbone.adapted.", "backbone.pretrained.")


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_adapts_only_its_own_parameters_on_task_one_and_nothing_on_task_two(straight, cli, variant):
    run = straight / variant / "seed-1993"
    assert [len(x) for x in read_json(run / "metrics.json")["train_loss"]] == [1, 0]
    assert read_json(run / "config.json")["config"]["aper_variant"] == variant
    first, second = (load_file(str(run / f"task-0{t}" / "model.safetensors")) for t in (1, 2))
    adapted = [k for k in first if k.startswith("backbone.adapted.")]
    own = [k for k in adapted if TRAINED[variant] in k]
    frozen = [k for k in adapted if k not in own]
    assert own and frozen and all(adapted_as_pretrained(k) in first for k in frozen)
    assert all(torch.equal(first[k], first[adapted_as_pretrained(k)]) for k in frozen)  # the rest stays pre-trained
    assert len(frozen) == len([k for k in first if k.startswith("backbone.pretrained.")])
    if variant in ("adapter", "vpt"):  # they start at zero (the adapters' up-projections, the prompts)
        assert any(first[k].abs().sum() > 0 for k in own if not k.endswith("down.weight"))
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith("backbone."))
    stats = load_file(str(run / "task-02" / "stats.safetensors"))
    assert stats["means"].shape[1] == 2 * 64 == second["task_heads.1.weight"].shape[1]  # [pre-trained, adapted]
    # The folder alone rebuilds it: `slca eval` scores as stored.
    code, stdout, stderr = cli("eval", run / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["matches_stored"] is True, stderr


def test_predict_and_onnx_export_of_the_ssf_variant_give_the_models_outputs(straight, cli, tmp_path):
    import onnxruntime
    from slca_cli.restore import restore_model
    task = straight / "ssf" / "seed-1993" / "task-02"
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 30, 90)).save(image)
    code, stdout, stderr = cli("predict", task, image, "--format", "jsonl", "--device", "cpu", "--no-progress")
    assert code == 0, stderr
    assert len([json.loads(line) for line in stdout.splitlines() if line.strip()]) == 1
    code, _, stderr = cli("export", task, "--out", tmp_path / "plain")
    assert_one_line_error(code, stderr, "--method aper", "--format onnx")
    code, stdout, stderr = cli("export", task, "--format", "onnx", "--out", tmp_path / "onnx")
    assert code == 0, stderr
    model, _ = restore_model(task)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.float().eval()(images)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), want,
                               atol=1e-4, rtol=1e-4)


def test_ssf_resumes_after_a_kill_to_the_straight_runs_numbers_and_tensors(straight, tmp_path):
    args = ["train", *TINY, *SMALL, "--method", "aper", "--aper-variant", "ssf", "--out", tmp_path / "ssf"]
    assert_kill_and_resume_match(straight / "ssf" / "seed-1993", args, "evaluate task=2", RESULT_KEYS)


def test_a_bad_variant_and_a_backbone_without_blocks_are_one_line_errors(cli, tmp_path, monkeypatch):
    code, _, stderr = cli("train", *TINY, *SMALL, "--method", "aper", "--aper-variant", "lora", "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, "--aper-variant must be one of finetune, adapter, ssf, vpt", "'lora'")
    from slca_cli.backbones import BackboneSpec
    from slca_cli.backbones.registry import _REGISTRY

    def build(weights=None, pretrained=True):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model.num_features = 8
        return model

    monkeypatch.setitem(_REGISTRY, "tiny-cnn-test", BackboneSpec(
        name="tiny-cnn-test", build=build, description="test CNN", family="test", image_size=32,
        mean=(0.5,) * 3, std=(0.5,) * 3))
    code, _, stderr = cli("train", "--dataset", "synthetic", "--backbone", "tiny-cnn-test", "--method", "aper",
                          "--aper-variant", "vpt", "--device", "cpu", "--keep-norm", "--tasks", 2, "--num-classes", 4,
                          "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, "--aper-variant vpt changes transformer blocks", "tiny-cnn-test")
    assert not (tmp_path / "x").exists()
