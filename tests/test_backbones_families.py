"""Every backbone family from a fake checkpoint in its real on-disk layout (Google .npz, MoCo v3 .pth.tar,
iBOT / DINO teacher checkpoints), through the real key remapping: no unexpected keys, the right tensors in the
right places, a forward pass; offline errors name the file and the folder."""
import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import slca_cli.backbones as backbones
from slca_cli.backbones import selfsup
from slca_cli.backbones.google_npz import google_vit_state, read_google_npz
from slca_cli.backbones.hub import load_local_weights
from slca_cli.errors import SlcaError
from slca_cli.presets import resolve_config

from conftest import assert_one_line_error

SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True)
SELF_SUPERVISED = ["mocov3-vit-b16", "ibot-vit-b16-in21k", "ibot-vit-b16-in1k", "dino-vit-b16"]


def small_vit(seed=0, **overrides):
    torch.manual_seed(seed)
    return VisionTransformer(num_classes=0, **{**SMALL_VIT, **overrides})


def assert_same_weights(model, reference_state):
    state = model.state_dict()
    assert set(state) == set(reference_state)
    for key, value in reference_state.items():
        assert torch.equal(state[key], value), key


def prefixed(state, prefix):
    return {prefix + k: v.clone() for k, v in state.items()}


@pytest.fixture
def small_selfsup(monkeypatch, tmp_path):
    """The self-supervised builders at a small ViT size, with an empty weights folder and no network."""
    monkeypatch.setattr(selfsup, "VIT_B16", SMALL_VIT)
    monkeypatch.setenv("SLCA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("SLCA_OFFLINE", "1")
    return tmp_path


# ---------------------------------------------------------------- Google .npz (the supervised ViTs)

def write_google_npz(state, path, num_heads, num_classes=7):
    """A timm ViT state dict in Google's .npz layout (Flax names, (in, out) kernels, split q/k/v)."""
    a = {k: v.detach().numpy() for k, v in state.items()}
    dim = a["cls_token"].shape[-1]
    out = {"cls": a["cls_token"], "embedding/kernel": a["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": a["patch_embed.proj.bias"], "Transformer/posembed_input/pos_embedding": a["pos_embed"],
           "Transformer/encoder_norm/scale": a["norm.weight"], "Transformer/encoder_norm/bias": a["norm.bias"],
           "head/kernel": np.ones((dim, num_classes), np.float32), "head/bias": np.zeros(num_classes, np.float32)}
    depth = 1 + max(int(k.split(".")[1]) for k in a if k.startswith("blocks."))
    for i in range(depth):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for norm, google in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[g + google + "/scale"], out[g + google + "/bias"] = a[b + norm + ".weight"], a[b + norm + ".bias"]
        for r in (0, 1):
            out[g + f"MlpBlock_3/Dense_{r}/kernel"] = a[b + f"mlp.fc{r + 1}.weight"].T
            out[g + f"MlpBlock_3/Dense_{r}/bias"] = a[b + f"mlp.fc{r + 1}.bias"]
        qkv_w, qkv_b = np.split(a[b + "attn.qkv.weight"], 3), np.split(a[b + "attn.qkv.bias"], 3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[g + f"MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(dim, num_heads, -1)
            out[g + f"MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(num_heads, -1)
        out[g + "MultiHeadDotProductAttention_1/out/kernel"] = a[b + "attn.proj.weight"].T.reshape(num_heads, -1, dim)
        out[g + "MultiHeadDotProductAttention_1/out/bias"] = a[b + "attn.proj.bias"]
    np.savez(path, **out)
    return path


def test_google_npz_loads_exactly_and_agrees_with_timms_own_reader(tmp_path):
    source = small_vit(seed=1)
    path = write_google_npz(source.state_dict(), tmp_path / "ViT-small.npz", num_heads=SMALL_VIT["num_heads"])
    ours = small_vit(seed=2)
    load_local_weights(ours, str(path))  # the path `--weights FILE.npz` takes
    assert_same_weights(ours, source.state_dict())
    timms = small_vit(seed=3)
    timms.load_pretrained(str(path))
    assert_same_weights(timms, source.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(images), source.eval()(images), atol=1e-6)


def test_google_npz_with_unknown_or_missing_arrays_is_refused(tmp_path):
    source = small_vit(seed=1)
    path = write_google_npz(source.state_dict(), tmp_path / "v.npz", num_heads=2)
    arrays = read_google_npz(path)
    arrays["Transformer/encoderblock_0/Extra/kernel"] = np.zeros(3, np.float32)
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SlcaError, match=r"missing \(1\): blocks.1.norm2.weight; unexpected \(1\): "
                                        r"Transformer/encoderblock_0/Extra/kernel"):
        load_local_weights(small_vit(), str(tmp_path / "bad.npz"))
    assert "head.weight" in google_vit_state(arrays)  # the classifier converts, and is dropped by the loader


@pytest.fixture(scope="module")
def vit_b16_state():
    """One real-size ViT-B/16 (timm's architecture), shared by the full-size tests of this module."""
    return small_vit(seed=5, **selfsup.VIT_B16).state_dict()


def test_vit_b16_in1k_from_a_full_size_google_npz(tmp_path, vit_b16_state):
    path = write_google_npz(vit_b16_state, tmp_path / "B_16-i21k-300ep-imagenet2012.npz", num_heads=12,
                            num_classes=1000)
    model = backbones.get_backbone("in1k").build(str(path), True)
    assert_same_weights(model, vit_b16_state)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 768)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 768)  # --image-size 32: position embeddings resampled


# ---------------------------------------------------------------- MoCo v3

def mocov3_checkpoint(encoder_state, dim):
    """The layout of the official vit-b-300ep.pth.tar: base and momentum encoders (each with its projection
    MLP as `head`), the predictor, optimizer and AMP scaler state."""
    mlp = {"head.0.weight": torch.randn(64, dim), "head.1.weight": torch.ones(64), "head.1.bias": torch.zeros(64),
           "head.1.running_mean": torch.zeros(64), "head.1.running_var": torch.ones(64),
           "head.1.num_batches_tracked": torch.tensor(7), "head.3.weight": torch.randn(16, 64)}
    state = {**prefixed(encoder_state, "module.base_encoder."), **prefixed(mlp, "module.base_encoder."),
             **{k: v + 1 for k, v in prefixed(encoder_state, "module.momentum_encoder.").items()},
             **prefixed(mlp, "module.momentum_encoder."),
             "module.predictor.0.weight": torch.randn(64, 16), "module.predictor.3.weight": torch.randn(16, 64)}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "betas": (0.9, 0.95), "params": [0, 1]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 11}}


def test_mocov3_official_checkpoint_full_size(tmp_path, vit_b16_state):
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save(mocov3_checkpoint(vit_b16_state, 768), path)
    model = backbones.get_backbone("moco").build(str(path), True)
    assert_same_weights(model, vit_b16_state)  # base encoder only; momentum encoder and heads dropped
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 768)


def test_mocov3_converted_file_and_the_weights_folder(small_selfsup, tmp_path):
    source = small_vit(seed=1).state_dict()
    torch.save({"model": source}, tmp_path / "mocov3-vit-base-300ep.pth")  # the authors' convert_to_deit.py output
    assert_same_weights(backbones.get_backbone("mocov3-vit-b16").build(str(tmp_path / "mocov3-vit-base-300ep.pth")),
                        source)
    spec = backbones.get_backbone("moco")
    assert spec.weights_present() is False
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(mocov3_checkpoint(source, SMALL_VIT["embed_dim"]), folder / "vit-b-300ep.pth.tar")
    assert spec.weights_present() is True
    model = spec.build(None, True)  # no --weights: the file in the weights folder, no network
    assert_same_weights(model, source)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_mocov3_keys_that_do_not_belong_are_listed(small_selfsup, tmp_path):
    source = small_vit().state_dict()
    ckpt = mocov3_checkpoint(source, 32)
    ckpt["state_dict"]["module.base_encoder.blocks.0.attn.extra"] = torch.zeros(1)
    del ckpt["state_dict"]["module.base_encoder.blocks.1.mlp.fc1.bias"]
    torch.save(ckpt, tmp_path / "a.pth.tar")
    with pytest.raises(SlcaError, match=r"missing \(1\): blocks.1.mlp.fc1.bias; unexpected \(1\): "
                                        r"blocks.0.attn.extra"):
        backbones.get_backbone("moco").build(str(tmp_path / "a.pth.tar"))
    ckpt = mocov3_checkpoint(source, 32)
    ckpt["state_dict"]["module.queue"] = torch.zeros(4)
    torch.save(ckpt, tmp_path / "b.pth.tar")
    with pytest.raises(SlcaError, match=r"outside 'module.base_encoder.'.*module.queue"):
        backbones.get_backbone("moco").build(str(tmp_path / "b.pth.tar"))


# ---------------------------------------------------------------- iBOT and DINO

def ibot_dino_full_checkpoint(teacher_state, student_state, loss_key, masked_embed=True):
    """Layout of iBOT's / DINO's full checkpoints: the teacher's backbone and projection head under 'teacher',
    the DDP-wrapped student (with iBOT's mask token) under 'student', training arguments as a Namespace."""
    head = {"head.mlp.0.weight": torch.randn(48, 32), "head.mlp.0.bias": torch.zeros(48),
            "head.last_layer.weight_g": torch.ones(100, 1), "head.last_layer.weight_v": torch.randn(100, 48)}
    student = {**prefixed(student_state, "module.backbone."), **prefixed(head, "module.")}
    if masked_embed:
        student["module.backbone.masked_embed"] = torch.zeros(1, 32)
    return {"student": student, "teacher": {**prefixed(teacher_state, "backbone."), **head},
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0]}]}, "epoch": 80,
            "args": argparse.Namespace(arch="vit_base", patch_size=16, out_dim=8192, lr=0.0005),
            loss_key: {"center": torch.zeros(1, 100)}}


@pytest.mark.parametrize("name,loss_key", [("ibot-vit-b16-in21k", "ibot_loss"), ("ibot-vit-b16-in1k", "ibot_loss"),
                                           ("dino-vit-b16", "dino_loss")])
def test_full_checkpoint_gives_the_teacher(small_selfsup, tmp_path, name, loss_key):
    teacher, student = small_vit(seed=1).state_dict(), small_vit(seed=2).state_dict()
    torch.save(ibot_dino_full_checkpoint(teacher, student, loss_key, masked_embed=loss_key == "ibot_loss"),
               tmp_path / "checkpoint.pth")
    model = backbones.get_backbone(name).build(str(tmp_path / "checkpoint.pth"), True)
    assert_same_weights(model, teacher)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 32)  # another --image-size


@pytest.mark.parametrize("layout", ["bare", "state_dict", "state_dict+backbone.", "student+masked_embed"])
@pytest.mark.parametrize("name", ["ibot-vit-b16-in21k", "ibot-vit-b16-in1k", "dino-vit-b16"])
def test_backbone_only_files(small_selfsup, tmp_path, name, layout):
    """The published backbone files: DINO's bare teacher keys, iBOT's teacher (t) or student (s) backbones."""
    source = small_vit(seed=3).state_dict()
    state = dict(source)
    if layout == "student+masked_embed":
        state["masked_embed"] = torch.zeros(1, 32)
    obj = {"bare": state, "student+masked_embed": state, "state_dict": {"state_dict": state},
           "state_dict+backbone.": {"state_dict": prefixed(state, "backbone.")}}[layout]
    torch.save(obj, tmp_path / "checkpoint_teacher.pth")
    if layout == "student+masked_embed" and name.startswith("dino"):
        with pytest.raises(SlcaError, match=r"unexpected \(1\): masked_embed"):  # DINO has no mask token
            backbones.get_backbone(name).build(str(tmp_path / "checkpoint_teacher.pth"))
        return
    assert_same_weights(backbones.get_backbone(name).build(str(tmp_path / "checkpoint_teacher.pth")), source)


def test_a_checkpoint_of_another_architecture_is_refused(small_selfsup, tmp_path):
    """A ViT of another size (here: 3 blocks, 48-d) fits no tensor: every one is listed as the wrong shape."""
    other = small_vit(embed_dim=48, depth=3, num_heads=3).state_dict()
    torch.save(ibot_dino_full_checkpoint(other, other, "ibot_loss"), tmp_path / "vit-other.pth")
    with pytest.raises(SlcaError, match=r"do not fit the backbone: unexpected \(\d+\): blocks.2.*wrong shape"):
        backbones.get_backbone("ibot").build(str(tmp_path / "vit-other.pth"))


def test_eval_rebuild_needs_no_checkpoint(small_selfsup):
    """`slca eval` builds with weights=None, pretrained=False and loads the run's own tensors."""
    for name in SELF_SUPERVISED:
        model = backbones.get_backbone(name).build(None, False)
        assert model.num_features == 32


def test_missing_checkpoint_offline_is_one_line_naming_file_and_folder(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("SLCA_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("SLCA_OFFLINE", "1")
    for alias, filename in (("moco", "vit-b-300ep.pth.tar"), ("ibot", "ibot_vitb16_in22k_checkpoint.pth"),
                            ("dino", "dino_vitbase16_pretrain.pth")):
        code, _, err = cli("train", "--dataset", "synthetic", "--backbone", alias, "--device", "cpu", "--no-progress",
                           "--num-classes", 2, "--tasks", 1, "--out", tmp_path / alias)
        assert_one_line_error(code, err, filename, str(tmp_path / "w"), "--weights FILE", "https://")


# ---------------------------------------------------------------- names, aliases, presets

def test_aliases_and_listing(cli):
    expected = {"in21k": "vit-b16-in21k", "in1k": "vit-b16-in1k", "moco": "mocov3-vit-b16",
                "ibot": "ibot-vit-b16-in21k", "ibot-in1k": "ibot-vit-b16-in1k", "dino": "dino-vit-b16",
                "lite0": "efficientnet-lite0-in1k"}
    for alias, name in expected.items():
        assert backbones.get_backbone(alias).name == name
    code, out, _ = cli("backbones")
    assert code == 0
    for line in ("mocov3-vit-b16 (aliases: moco, mocov3)", "ibot-vit-b16-in21k (aliases: ibot, ibot-in21k)",
                 "dino-vit-b16 (aliases: dino", "vit-b16-in1k (aliases: in1k)", "efficientnet-lite0-in1k",
                 "timm:<model name>", "weights folder"):
        assert line in out, line


SSL_SCHEDULE, FOLDER_SCHEDULE, CUB_SCHEDULE = (90, 80), (20, 18), (50, 40)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name,folder,cub,fresh_norm,mean", [
    ("mocov3-vit-b16", SSL_SCHEDULE, SSL_SCHEDULE, True, IMAGENET_MEAN),
    ("ibot", SSL_SCHEDULE, SSL_SCHEDULE, True, IMAGENET_MEAN),
    ("ibot-in1k", SSL_SCHEDULE, SSL_SCHEDULE, True, IMAGENET_MEAN),
    ("dino", SSL_SCHEDULE, SSL_SCHEDULE, True, IMAGENET_MEAN),
    ("in1k", FOLDER_SCHEDULE, CUB_SCHEDULE, True, (0.5, 0.5, 0.5)),
    ("efficientnet-lite0-in1k", FOLDER_SCHEDULE, CUB_SCHEDULE, False, (0.5, 0.5, 0.5))])
def test_presets_follow_the_backbone(name, folder, cub, fresh_norm, mean):
    """Self-supervised families train 90 epochs (drop after 80); the CNN keeps its final layers; on --dataset
    folder the features are normalized as the checkpoint was trained."""
    spec = backbones.get_backbone(name)

    def resolve(dataset, overrides):
        return resolve_config(dataset, spec.name, "slca", backbone_family=spec.family,
                              backbone_image_size=spec.image_size, backbone_mean=spec.mean, backbone_std=spec.std,
                              num_classes=20, task_sizes=[10, 10], overrides=overrides,
                              backbone_defaults=dict(spec.defaults))
    cfg = resolve("folder", {})
    assert (cfg.epochs, cfg.lr_drop_epoch) == folder
    assert cfg.fresh_norm is fresh_norm and cfg.mean == mean and cfg.freeze_bn is True
    assert (resolve("cub200", {}).epochs, resolve("cub200", {}).lr_drop_epoch) == cub
    flagged = resolve("folder", {"fresh_norm": not fresh_norm})
    assert flagged.fresh_norm is (not fresh_norm)  # a flag beats the backbone's default


# ---------------------------------------------------------------- timm:<model name>

def test_timm_model_by_name_with_local_weights(tmp_path, cli):
    import timm
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=10)  # its classifier `fc` is dropped on load
    save_file(source.state_dict(), str(tmp_path / "test_resnet.safetensors"))
    spec = backbones.get_backbone("timm:test_resnet")
    assert spec.defaults == {"fresh_norm": False, "freeze_bn": True} and spec.image_size == 160
    model = spec.build(str(tmp_path / "test_resnet.safetensors"), True)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert_same_weights(model, expected)
    run = tmp_path / "run"
    code, out, err = cli("train", "--dataset", "synthetic", "--backbone", "timm:test_resnet", "--weights",
                         tmp_path / "test_resnet.safetensors", "--image-size", 32, "--device", "cpu", "--no-progress",
                         "--num-classes", 4, "--tasks", 2, "--epochs", 1, "--train-per-class", 4,
                         "--test-per-class", 2, "--out", run)
    assert code == 0, err
    code, out, err = cli("eval", run / "seed-1993" / "task-02", "--no-progress", "--device", "cpu")
    assert code == 0 and "matches the stored" in out, (out, err)


def test_timm_vit_by_name_gets_the_fresh_norm_default_and_any_image_size():
    spec = backbones.get_backbone("timm:test_vit")
    assert spec.defaults["fresh_norm"] is True and spec.family == "timm" and spec.image_size == 160
    model = spec.build(None, False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == model(torch.randn(1, 3, 160, 160)).shape == (1, 64)


def test_timm_unknown_model_and_offline_hub(cli, monkeypatch, tmp_path):
    with pytest.raises(SlcaError, match="timm has no model 'no_such_net'"):
        backbones.get_backbone("timm:no_such_net")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = cli("train", "--dataset", "synthetic", "--backbone", "timm:test_resnet", "--device", "cpu",
                       "--num-classes", 2, "--tasks", 1, "--out", tmp_path / "r")
    assert_one_line_error(code, err, "--weights FILE", "timm/test_resnet")


def test_fetch_downloads_into_the_weights_folder_once(monkeypatch, tmp_path):
    """Online, a missing checkpoint is downloaded to the weights folder under its published name (here from a
    file:// address), then found there without the network."""
    from slca_cli.backbones import cache
    published = tmp_path / "published" / "vit-b-300ep.pth.tar"
    published.parent.mkdir()
    published.write_bytes(b"checkpoint bytes")
    monkeypatch.setenv("SLCA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(cache, "reachable", lambda url: True)
    path = cache.fetch(published.as_uri(), "vit-b-300ep.pth.tar", "mocov3-vit-b16")
    assert path == tmp_path / "weights" / "vit-b-300ep.pth.tar" and path.read_bytes() == b"checkpoint bytes"
    assert not list((tmp_path / "weights").glob("*.part"))
    monkeypatch.setattr(cache, "reachable", lambda url: False)
    assert cache.fetch(published.as_uri(), "vit-b-300ep.pth.tar", "mocov3-vit-b16") == path
    monkeypatch.setattr(cache, "reachable", lambda url: True)
    with pytest.raises(SlcaError, match=r"download failed.*put gone.pth from .* at .*weights/gone.pth"):
        cache.fetch((tmp_path / "nowhere.pth").as_uri(), "gone.pth", "dino-vit-b16")
