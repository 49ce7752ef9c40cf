"""Every method end to end through the CLI on generated data and the tiny ViT; what each one trains."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY, assert_one_line_error, read_json
from slca_cli.methods import method_names
from slca_cli.methods.catalog import CATALOG

SMALL = ["--tasks", 2, "--epochs", 1, "--num-classes", 4, "--train-per-class", 8, "--test-per-class", 4]
METHODS = method_names()
# RanPAC's default M = 10000 would make a 381 MiB Gram matrix per task; the tiny runs use a small projection.
EXTRA = {"ranpac": ["--ranpac-dim", 64]}


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """One small run per method, shared by the tests that read them."""
    from conftest import Cli
    root = tmp_path_factory.mktemp("methods")
    for method in METHODS:
        code, stdout, stderr = Cli()("train", *TINY, *SMALL, *EXTRA.get(method, []), "--method", method,
                                     "--out", root / method)
        assert code == 0, (method, stderr)
        assert "Last-Acc" in stdout
    return root


def tensors(root, method, task):
    return load_file(str(root / method / "seed-1993" / f"task-{task:02d}" / "model.safetensors"))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_and_its_checkpoint_rebuilds_from_the_folder(method_runs, cli, method):
    run = method_runs / method / "seed-1993"
    metrics = read_json(run / "metrics.json")
    tasks = 1 if method == "joint" else 2
    assert metrics["method"] == method and len(metrics["task_accuracy"]) == tasks
    assert all(0 <= a <= 100 for a in metrics["task_accuracy"])
    code, stdout, stderr = cli("eval", run / f"task-{tasks:02d}", "--device", "cpu", "--no-progress", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["matches_stored"] is True


def test_joint_trains_every_class_in_one_task(method_runs):
    config = read_json(method_runs / "joint" / "seed-1993" / "config.json")["config"]
    assert config["task_sizes"] == [4] and config["lr_backbone"] == 1e-4
    assert not (method_runs / "joint" / "seed-1993" / "task-02").exists()


def test_linear_keeps_the_backbone_frozen(method_runs):
    first, second = tensors(method_runs, "linear", 1), tensors(method_runs, "linear", 2)
    backbone = [k for k in first if k.startswith("backbone.")]
    assert backbone and all(torch.equal(first[k], second[k]) for k in backbone)
    config = read_json(method_runs / "linear" / "seed-1993" / "config.json")["config"]
    assert config["lr_backbone"] == 0 and config["fresh_norm"] is False


@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_prompt_methods_train_prompts_and_keys_on_a_frozen_vit(method_runs, method):
    first, second = tensors(method_runs, method, 1), tensors(method_runs, method, 2)
    vit = [k for k in first if k.startswith("backbone.vit.")]
    assert vit and all(torch.equal(first[k], second[k]) for k in vit)
    assert not torch.equal(first["backbone.prompt_keys"], second["backbone.prompt_keys"])
    prompts = "backbone.prompts" if method == "l2p" else "backbone.e_prompts"
    assert not torch.equal(first[prompts], second[prompts])
    config = read_json(method_runs / method / "seed-1993" / "config.json")["config"]
    assert config["optimizer"] == "adam" and config["schedule"] == "constant" and config["grad_clip"] == 1.0
    if method == "dualprompt":
        assert config["prompt_pool"] == 2  # one E-prompt per task
        # task 2 trains E-prompt 1 only: E-prompt 0 keeps its task-1 values
        assert torch.equal(first["backbone.e_prompts"][:, 0], second["backbone.e_prompts"][:, 0])
    else:
        assert (config["prompt_pool"], config["prompt_length"], config["prompt_top_k"]) == (10, 5, 5)


def test_slcapp_trains_lora_norms_biases_and_cls_token_only(method_runs):
    first, second = tensors(method_runs, "slca++", 1), tensors(method_runs, "slca++", 2)
    changed = {k for k in first if k.startswith("backbone.") and not torch.equal(first[k], second[k])}
    assert any(".lora_B" in k for k in changed) and "backbone.cls_token" in changed
    assert any("norm1" in k for k in changed) and any(k.endswith(".bias") for k in changed)
    allowed = ("lora_", "norm", "bias", "cls_token")
    assert all(any(a in k for a in allowed) for k in changed), sorted(changed)
    assert "backbone.pos_embed" not in changed and "backbone.blocks.0.attn.qkv.base.weight" not in changed
    config = read_json(method_runs / "slca++" / "seed-1993" / "config.json")["config"]
    assert (config["lora_rank"], config["lora_scale"], config["sce_a"], config["sce_b"]) == (4, 0.8, 1.0, 0.1)
    assert config["schedule"] == "cosine" and config["mean_scaling"] == "off" and config["align"] is True


def test_align_changes_the_heads_of_any_method(tmp_path, cli, method_runs):
    code, _, stderr = cli("train", *TINY, *SMALL, "--method", "l2p", "--align", "--out", tmp_path / "l2p-ca")
    assert code == 0, stderr
    aligned = load_file(str(tmp_path / "l2p-ca" / "seed-1993" / "task-02" / "model.safetensors"))
    plain = tensors(method_runs, "l2p", 2)
    assert not torch.equal(aligned["task_heads.0.weight"], aligned["stage1_heads.0.weight"])
    assert torch.equal(plain["task_heads.0.weight"], plain["stage1_heads.0.weight"])
    # stage 1 is identical with and without --align: only the heads used for evaluation differ
    assert torch.equal(aligned["stage1_heads.1.weight"], plain["stage1_heads.1.weight"])


def test_ablation_rows_are_three_commands(tmp_path, cli):
    runs = {"SL": ["--method", "sl"], "SL+CA": ["--method", "sl", "--align", "--no-logit-norm"],
            "SL+CA+LN": ["--method", "sl", "--align"]}
    heads = {}
    for name, flags in runs.items():
        code, _, stderr = cli("train", *TINY, *SMALL, *flags, "--out", tmp_path / name)
        assert code == 0, stderr
        config = read_json(tmp_path / name / "seed-1993" / "config.json")["config"]
        assert (config["align"], config["logit_norm"]) == {"SL": (False, True), "SL+CA": (True, False),
                                                            "SL+CA+LN": (True, True)}[name]
        heads[name] = load_file(str(tmp_path / name / "seed-1993" / "task-02" / "model.safetensors"))
    for name in runs:
        assert torch.equal(heads[name]["stage1_heads.0.weight"], heads["SL"]["stage1_heads.0.weight"])
    assert not torch.equal(heads["SL+CA"]["task_heads.0.weight"], heads["SL+CA+LN"]["task_heads.0.weight"])


def test_resume_of_a_prompt_method_gives_the_same_metrics(method_runs, tmp_path, cli):
    copy = tmp_path / "run" / "seed-1993"
    shutil.copytree(method_runs / "dualprompt" / "seed-1993", copy)
    shutil.rmtree(copy / "task-02")
    code, stdout, stderr = cli("train", *TINY, *SMALL, "--method", "dualprompt", "--out", tmp_path / "run",
                               "--resume")
    assert code == 0, stderr
    assert "resuming" in stdout
    straight = read_json(method_runs / "dualprompt" / "seed-1993" / "metrics.json")
    assert read_json(copy / "metrics.json")["counts"] == straight["counts"]


def test_vit_methods_refuse_a_backbone_that_is_not_a_vit(cli, monkeypatch):
    from slca_cli.backbones import BackboneSpec
    from slca_cli.backbones.registry import _REGISTRY

    def build(weights=None, pretrained=True):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model.num_features = 8
        return model

    monkeypatch.setitem(_REGISTRY, "tiny-cnn-test", BackboneSpec(
        name="tiny-cnn-test", build=build, description="test CNN", family="test", image_size=32,
        mean=(0.5,) * 3, std=(0.5,) * 3))
    for method in [spec.name for spec in CATALOG if spec.needs_vit]:
        code, _, err = cli("train", "--dataset", "synthetic", "--backbone", "tiny-cnn-test", "--method", method,
                           "--device", "cpu", "--keep-norm", "--tasks", 2, "--num-classes", 4)
        assert_one_line_error(code, err, f"--method {method} needs a ViT backbone", "tiny-cnn-test")


def test_bad_method_settings_are_one_line_errors(cli):
    code, _, err = cli("train", *TINY, "--method", "l2p", "--prompt-top-k", 11)
    assert_one_line_error(code, err, "--prompt-top-k 11", "--prompt-pool 10")
    code, _, err = cli("train", *TINY, "--method", "dualprompt", "--tasks", 3, "--num-classes", 6,
                       "--prompt-pool", 2)
    assert code == 2 and "one E-prompt per task" in err
    code, _, err = cli("train", *TINY, "--optimizer", "lion")
    assert_one_line_error(code, err, "--optimizer must be one of sgd, adam")
    code, _, err = cli("train", *TINY, "--method", "nope")
    assert_one_line_error(code, err, "unknown method 'nope'", "l2p", "slca++")
