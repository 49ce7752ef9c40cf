"""The backbone registry, entry-point plugins and local weight files."""
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import slca_cli.backbones as backbones
from slca_cli.errors import SlcaError

from conftest import REPO, TINY, assert_one_line_error


def test_builtin_backbones_and_aliases(cli):
    names = [spec.name for spec in backbones.list_backbones()]
    assert {"vit-b16-in21k", "vit-tiny-test"} <= set(names)
    assert backbones.get_backbone("in21k").name == "vit-b16-in21k"
    code, out, _ = cli("backbones")
    assert code == 0 and "vit-b16-in21k (aliases: in21k)" in out and "weights" in out


def test_tiny_vit_features():
    model = backbones.get_backbone("vit-tiny-test").build(None, True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_entry_point_plugin_is_listed_and_trainable(tmp_path):
    """A third-party package adds a backbone through the `slca.backbones` entry-point group."""
    site = tmp_path / "site"
    (site / "my_backbones").mkdir(parents=True)
    (site / "my_backbones" / "__init__.py").write_text(textwrap.dedent("""
        from timm.models.vision_transformer import VisionTransformer
        from slca_cli.backbones import BackboneSpec

        def build(weights=None, pretrained=True):
            return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)

        SPEC = BackboneSpec(name="my-vit", build=build, description="a plugin ViT", family="test", image_size=32,
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    """))
    dist = site / "my_backbones-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-backbones\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[slca.backbones]\nmy-vit = my_backbones:SPEC\n")
    env = {"PYTHONPATH": f"{site}:{REPO}"}
    import os
    full_env = dict(os.environ, **env)
    listed = subprocess.run([sys.executable, "-m", "slca_cli", "backbones"], capture_output=True, text=True,
                            env=full_env, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "my-vit" in listed.stdout and "a plugin ViT" in listed.stdout
    args = ["train", "--dataset", "synthetic", "--backbone", "my-vit", "--device", "cpu", "--no-progress",
            "--num-classes", 4, "--tasks", 2, "--epochs", 1, "--train-per-class", 4, "--test-per-class", 2,
            "--out", tmp_path / "run"]
    run = subprocess.run([sys.executable, "-m", "slca_cli", *map(str, args)], capture_output=True, text=True,
                         env=full_env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "seed-1993" / "task-02" / "model.safetensors").exists()


def tiny_state(prefix=""):
    model = backbones.get_backbone("vit-tiny-test").build(None, True)
    return model, {prefix + k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_with_prefixes_stripped(tmp_path, suffix):
    source, state = tiny_state("module.backbone.")
    state["module.backbone.head.weight"] = torch.zeros(10, 64)  # classifier heads are dropped
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = backbones.get_backbone("vit-tiny-test").build(str(path), True)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_weights_that_do_not_fit_list_the_keys(tmp_path):
    _, state = tiny_state()
    del state["blocks.1.mlp.fc2.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(SlcaError, match=r"missing \(1\): blocks.1.mlp.fc2.weight; unexpected \(1\): extra.weight"):
        backbones.get_backbone("vit-tiny-test").build(str(tmp_path / "w.safetensors"), True)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, cli):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Payload()}, fh)
    code, out, err = cli("train", *TINY, "--weights", path, "--num-classes", 2, "--tasks", 1, "--out", tmp_path)
    assert_one_line_error(code, err, "refused")
    assert "this must never run" not in out


def test_vit_b16_from_a_local_file_offline(tmp_path):
    """The paper's backbone from --weights: a timm-format state dict with a classifier head and a prefix."""
    import timm
    reference = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=False, num_classes=0)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    state["module.head.weight"] = torch.zeros(21843, 768)
    state["module.head.bias"] = torch.zeros(21843)
    save_file(state, str(tmp_path / "in21k.safetensors"))
    model = backbones.get_backbone("in21k").build(str(tmp_path / "in21k.safetensors"), True)
    assert torch.equal(model.pos_embed, reference.pos_embed)
    assert model.num_features == 768


def test_missing_hub_weights_offline_is_one_line(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = cli("train", "--dataset", "synthetic", "--backbone", "vit-b16-in21k", "--device", "cpu",
                       "--num-classes", 2, "--tasks", 1, "--out", tmp_path)
    assert_one_line_error(code, err, "--weights FILE", "vit_base_patch16_224.augreg_in21k")
