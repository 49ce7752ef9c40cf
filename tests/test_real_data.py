"""Whole runs on real CIFAR-100 images (a few per class from ../shared/data/cifar100-png.tar.gz), given as the
archive itself or extracted; skipped where that file is not available."""
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from slca_cli.data import load_dataset
from slca_cli.data.archives import extract_archive

from conftest import REPO, read_json

CANDIDATES = [os.environ.get("SLCA_CIFAR100_PNG", ""), REPO.parent / "shared/data/cifar100-png.tar.gz",
              REPO.parent.parent / "shared/data/cifar100-png.tar.gz"]
ARCHIVE = next((Path(p) for p in CANDIDATES if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(ARCHIVE is None, reason="cifar100-png.tar.gz not found (set SLCA_CIFAR100_PNG)")

PER_SPLIT = {"train": 3, "test": 1}


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    """The first 3 train and 1 test image of every class, repacked from the real archive (one pass over it)."""
    path = tmp_path_factory.mktemp("cifar") / "cifar100-small.tar.gz"
    taken = Counter()
    with tarfile.open(ARCHIVE, "r:gz") as source, tarfile.open(path, "w:gz") as out:
        for member in source:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in PER_SPLIT:
                continue
            key = (parts[0], parts[1])
            if taken[key] < PER_SPLIT[parts[0]]:
                taken[key] += 1
                out.addfile(member, source.extractfile(member))
    assert len(taken) == 200
    return path


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLCA_DATA_ROOT", str(tmp_path / "cache"))


def test_cifar100_from_the_png_archive(small_archive):
    data = load_dataset("cifar100", str(small_archive))
    assert (data.num_classes, len(data.train), len(data.test)) == (100, 300, 100)
    # Sorted folder names are the official fine-label ids: 0 apple ... 99 worm.
    assert data.class_names[0] == "apple" and data.class_names[99] == "worm" and data.class_names[58] == "pickup_truck"
    image, label = data.train[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0


def test_train_cifar100_on_real_images(small_archive, cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli("train", "--dataset", "cifar100", "--data-root", small_archive, "--backbone",
                            "vit-tiny-test", "--device", "cpu", "--epochs", 1, "--workers", 0, "--ca-epochs", 1,
                            "--ca-samples", 4, "--no-progress", "--out", out)
    assert code == 0, err
    config = read_json(out / "seed-1993" / "config.json")
    assert config["task_sizes"] == [10] * 10 and config["class_order"][:4] == [68, 56, 78, 8]
    assert config["class_names"][0] == "road"  # fine label 68
    metrics = read_json(out / "seed-1993" / "metrics.json")
    assert len(metrics["task_accuracy"]) == 10 and sum(metrics["counts"][-1]["total"]) == 100


def test_train_folder_on_real_images_with_tasks(small_archive, cli, tmp_path):
    """--dataset folder on 10 real classes, with --init-classes / --increment as for the benchmarks."""
    ten = ("apple", "bee", "bicycle", "bottle", "bus", "camel", "castle", "cloud", "crab", "dolphin")
    root = tmp_path / "ten"
    extract_archive(small_archive, root, keep=lambda name: name.count("/") < 2 or name.split("/")[1] in ten)
    out = tmp_path / "run"
    code, _, err = cli("train", "--dataset", "folder", "--data-root", root, "--backbone", "vit-tiny-test",
                       "--device", "cpu", "--init-classes", 6, "--increment", 4, "--epochs", 1, "--workers", 0,
                       "--ca-samples", 4, "--no-progress", "--out", out)
    assert code == 0, err
    config = read_json(out / "seed-1993" / "config.json")
    assert config["task_sizes"] == [6, 4] and sorted(config["class_names"]) == list(ten)
    assert config["config"]["mean"] == [0.5, 0.5, 0.5]  # folder: the backbone's own normalization
