"""InfLoRA (issue 22): the designed down-projection, the subspace update and the merge against numpy; through the
whole CLI on the digit folders: train, SIGKILL inside task 2 + --resume (equal to a straight run), `slca eval`,
`slca report`, `slca export` (the merged branch in a plain timm model) and `slca predict`, two processes; bad flags
and a backbone that is not a ViT in one line."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, read_json
from procs import Running, assert_kill_and_resume_match, train_with_two_processes

from slca_cli.methods.base import Stage1Inputs
from slca_cli.methods.inflora import DOWN_SCALE, design_down, update_basis

FLAGS = ["--dataset", "folder", "--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress", "--tasks", 2,
         "--epochs", 1, "--method", "inflora", "--lora-rank", 4]
RESULT_KEYS = ("accuracy_matrix", "task_accuracy", "last_acc", "inc_acc", "counts", "train_loss")


def random_covariance(dim, samples, seed):
    x = np.random.default_rng(seed).standard_normal((samples, dim)) * np.linspace(3.0, 0.1, dim)
    return x.T @ x / samples


def projector(columns):
    return columns @ np.linalg.pinv(columns)


# ---- math ----

def test_the_designed_rows_are_orthogonal_to_the_subspace_and_span_the_projected_inputs():
    dim, rank = 12, 3
    cov = random_covariance(dim, 50, 0)
    basis = np.linalg.qr(np.random.default_rng(1).standard_normal((dim, 4)))[0]
    down = design_down(torch.from_numpy(cov), torch.from_numpy(basis), rank).numpy()
    assert np.abs(down @ basis).max() < 1e-10
    # The authors' construction: the top-rank left singular vectors of (I - U U^T) C, rows scaled by 1/sqrt(3).
    u, _, _ = np.linalg.svd(cov - basis @ basis.T @ cov)
    np.testing.assert_allclose(projector(down.T), projector(u[:, :rank]), atol=1e-8)
    np.testing.assert_allclose(down @ down.T, np.eye(rank) * DOWN_SCALE ** 2, atol=1e-10)
    first = design_down(torch.from_numpy(cov), None, rank).numpy()  # the first task: C itself
    np.testing.assert_allclose(projector(first.T), projector(np.linalg.svd(cov)[0][:, :rank]), atol=1e-8)
    full = np.linalg.qr(np.random.default_rng(2).standard_normal((dim, dim - 2)))[0]  # 2 directions left
    narrow = design_down(torch.from_numpy(cov), torch.from_numpy(full), rank).numpy()
    assert np.abs(narrow @ full).max() < 1e-10 and not narrow[2:].any()


def test_the_subspace_update_keeps_the_energy_threshold_with_the_fewest_directions():
    dim = 16
    first_cov, second_cov = random_covariance(dim, 40, 3), random_covariance(dim, 40, 4)
    first = update_basis(torch.from_numpy(first_cov), None, 0.9).numpy()
    energy = np.linalg.svd(first_cov, compute_uv=False) ** 2
    share = np.cumsum(energy) / energy.sum()
    assert share[first.shape[1] - 1] >= 0.9 > share[first.shape[1] - 2]
    np.testing.assert_allclose(first.T @ first, np.eye(first.shape[1]), atol=1e-10)
    second = update_basis(torch.from_numpy(second_cov), torch.from_numpy(first), 0.95).numpy()
    np.testing.assert_allclose(second[:, :first.shape[1]], first)  # the old basis is kept as it was
    np.testing.assert_allclose(second.T @ second, np.eye(second.shape[1]), atol=1e-10)
    total = (np.linalg.svd(second_cov, compute_uv=False) ** 2).sum()

    def held(columns):  # GPM's criterion: energy of C inside the basis, from the residual's singular values
        residual = np.linalg.svd(second_cov - columns @ columns.T @ second_cov, compute_uv=False) ** 2
        return (total - residual.sum()) / total

    added = second.shape[1] - first.shape[1]
    assert added >= 1
    r = np.linalg.svd(second_cov - first @ first.T @ second_cov, compute_uv=False) ** 2
    assert held(first) + r[:added].sum() / total >= 0.95 > held(first) + r[:added - 1].sum() / total


def tiny_model(rank=3):
    import timm
    from slca_cli.methods import get_method
    from slca_cli.model import ContinualModel
    from slca_cli.presets import DEFAULTS, RunConfig
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    cfg = RunConfig(**dict(DEFAULTS, dataset="synthetic", backbone="x", method="inflora", num_classes=4,
                           task_sizes=(2, 2), lora_rank=rank, lora_scale=0.7))
    method = get_method("inflora")
    model = ContinualModel(method.wrap_backbone(vit, cfg), 32)
    model.add_head(2)
    return model, method, cfg


def test_after_the_task_the_weight_is_w_plus_scale_up_down_and_the_basis_is_returned():
    from slca_cli.methods.lora import lora_layers
    model, method, cfg = tiny_model()
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)
    batches = [(torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 0, 1, 0]))]
    inputs = Stage1Inputs(lambda: batches, accelerator, 0, {}, lambda _: None, False)
    method.before_stage1(model, 0, cfg, inputs)
    layers = list(lora_layers(model.backbone))
    assert all(not l.lora_B.any() and l.rows == (32, 96) for l in layers)
    for layer in layers:  # "stage 1"
        layer.lora_B.data.normal_()
    before = [(l.base.weight.detach().clone().numpy(), l.lora_B.detach().numpy().copy(),
               l.lora_A.detach().numpy().copy()) for l in layers]
    images = batches[0][0]
    features = model.backbone(images).detach()
    state = method.after_stage1(model, 0, cfg, inputs)
    for layer, (w, up, down) in zip(layers, before):
        want = w.copy()
        want[32:] += 0.7 * up @ down  # only the key and value rows
        np.testing.assert_allclose(layer.base.weight.detach().numpy(), want, rtol=1e-5, atol=1e-6)
        assert not layer.lora_B.any()
    torch.testing.assert_close(model.backbone(images), features, rtol=1e-4, atol=1e-5)
    assert sorted(state) == ["basis.0", "basis.1"]
    for basis in state.values():
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
    # The next task's down-projection is orthogonal to the stored subspace.
    method.before_stage1(model, 1, cfg, Stage1Inputs(lambda: batches, accelerator, 2, state, lambda _: None, False))
    for layer, i in zip(layers, range(2)):
        assert float((layer.lora_A.detach() @ state[f"basis.{i}"]).abs().max()) < 1e-5


# ---- whole CLI ----

@pytest.fixture(scope="module")
def straight(digit_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("inflora") / "straight"
    run = Running(["train", *FLAGS, "--data-root", digit_folders[0], "--out", out])
    assert run.finish() == 0, "\n".join(run.lines[-20:])
    return out / "seed-1993"


def test_inflora_trains_resumes_after_a_kill_and_evaluates(straight, digit_folders, tmp_path, cli):
    metrics = read_json(straight / "metrics.json")
    assert len(metrics["task_accuracy"]) == 2 and all(0 <= a <= 100 for a in metrics["task_accuracy"])
    config = read_json(straight / "config.json")["config"]
    assert (config["optimizer"], config["lr_backbone"], config["inflora_threshold"]) == ("adam", 5e-4, 0.95)
    first, second = (load_file(str(straight / f"task-0{t}" / f)) for t in (1, 2) for f in ("stats.safetensors",))
    model_1, model_2 = (load_file(str(straight / f"task-0{t}" / "model.safetensors")) for t in (1, 2))
    for i in range(2):  # the second task's branch lies outside the first task's subspace, which it keeps
        basis, grown = first[f"method.basis.{i}"], second[f"method.basis.{i}"]
        assert torch.equal(grown[:, :basis.shape[1]], basis) and grown.shape[1] >= basis.shape[1] >= 1
        assert float((model_2[f"backbone.blocks.{i}.attn.qkv.lora_A"] @ basis).abs().max()) < 1e-5
        assert not model_2[f"backbone.blocks.{i}.attn.qkv.lora_B"].any()  # merged
        weight = f"backbone.blocks.{i}.attn.qkv.base.weight"
        assert torch.equal(model_1[weight][:64], model_2[weight][:64])  # queries untouched
        assert not torch.equal(model_1[weight][64:], model_2[weight][64:])
    code, stdout, stderr = cli("eval", straight / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["matches_stored"] is True, stderr
    args = ["train", *FLAGS, "--data-root", digit_folders[0], "--out", tmp_path / "resumed"]
    assert_kill_and_resume_match(straight, args, "fit task=2 epoch=1 batch=1", RESULT_KEYS)


def test_inflora_reports_exports_a_plain_timm_model_and_predicts(straight, digit_folders, tmp_path, cli):
    code, stdout, stderr = cli("report", straight.parent, "--out", tmp_path / "r", "--paper", "--no-figures")
    assert code == 0, stderr
    assert any(" | InfLoRA | " in line for line in stdout.splitlines()), stdout
    code, stdout, stderr = cli("export", straight, "--out", tmp_path / "export")
    assert code == 0, stderr
    assert float(stdout.splitlines()[0].rsplit("within ", 1)[1]) <= 1e-4  # export's own logit check
    keys = load_file(tmp_path / "export" / "model.safetensors")
    assert "blocks.0.attn.qkv.weight" in keys and not any("lora" in k or ".base." in k for k in keys)
    image = sorted((digit_folders[0] / "test" / "3").glob("*.png"))[0]
    code, stdout, stderr = cli("predict", straight, image, "--format", "jsonl", "--no-progress")
    assert code == 0, stderr
    assert json.loads(stdout)["top_k"][0]["class"] in read_json(straight / "task-02" / "state.json")["class_names"]


def test_inflora_with_two_processes_designs_the_one_process_branch(straight, digit_folders, tmp_path):
    train_with_two_processes([*FLAGS, "--data-root", digit_folders[0]], tmp_path / "two")
    run = tmp_path / "two" / "seed-1993"
    assert [sum(c["total"]) for c in read_json(run / "metrics.json")["counts"]] == [16, 32]
    # Task 1's down-projection comes from the pre-trained ViT and the task's images alone: with the inputs summed
    # over both processes it is the one-process run's (up to the order of float sums).
    one, two = (load_file(str(r / "task-01" / "model.safetensors")) for r in (straight, run))
    for i in range(2):
        a, b = (m[f"backbone.blocks.{i}.attn.qkv.lora_A"].double() for m in (one, two))
        torch.testing.assert_close(b.T @ b, a.T @ a, rtol=1e-4, atol=1e-6)
    stats = load_file(str(run / "task-02" / "stats.safetensors"))
    model = load_file(str(run / "task-02" / "model.safetensors"))
    first = load_file(str(run / "task-01" / "stats.safetensors"))
    for i in range(2):
        assert float((model[f"backbone.blocks.{i}.attn.qkv.lora_A"] @ first[f"method.basis.{i}"]).abs().max()) < 1e-5
        assert stats[f"method.basis.{i}"].shape[1] >= first[f"method.basis.{i}"].shape[1]


@pytest.mark.parametrize("flags,fragment", [
    (["--inflora-threshold", "1.5"], "--inflora-threshold"),
    (["--inflora-threshold-end", "0"], "--inflora-threshold-end"),
    (["--lora-rank", "0"], "--lora-rank"),
])
def test_bad_inflora_flags_are_one_line_errors(cli, tmp_path, flags, fragment):
    code, _, stderr = cli("train", "--dataset", "synthetic", "--backbone", "vit-tiny-test", "--device", "cpu",
                          "--method", "inflora", *flags, "--out", tmp_path / "x")
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "x").exists()
