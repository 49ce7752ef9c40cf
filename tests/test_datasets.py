"""The benchmarks' real layouts (tiny fake copies): split sizes, class counts, class ids, archives, prepare."""
import hashlib
import pathlib
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest

from slca_cli.data import load_dataset
from slca_cli.data import prepare as prepare_module
from slca_cli.data.imagenet_r import SPLIT_FILE, Source, split_positions, split_record
from slca_cli.errors import SlcaError

from conftest import assert_one_line_error, read_json, write_image_tree
from fake_datasets import (cars_class_names, cub_class_names, imagenet_r_names, make_tar, write_cars_annos,
                           write_cars_devkit, write_cub, write_imagenet_r)

# Our ImageNet-R split of the fake tree's 1,000 files (tests/fake_datasets.py): fixed forever. If these change,
# every ImageNet-R number ever produced with slca changes with them.
FAKE_FILE_LIST_SHA256 = "6d461c1636771016029b65638ba2bfffd7b5aebc0aba9e0f5018c33e3d51675c"
FAKE_SPLIT_SHA256 = "3f2f563edbbd4d2786bd6e9c96ef7efba0478ba576863ef0236458c9c2dcb1e3"


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    """Extracted archives and default data roots go to a temporary folder, never to ~/.cache; the hub mirrors of
    CUB and Cars are never reached (tests/test_hub_mirrors.py serves them locally)."""
    monkeypatch.setenv("SLCA_DATA_ROOT", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def imagenet_r_tree(tmp_path_factory):
    return write_imagenet_r(tmp_path_factory.mktemp("imr"))


# ImageNet-R ---------------------------------------------------------------------------------------------------------

def test_imagenet_r_split_is_80_20_of_all_files_not_stratified(imagenet_r_tree):
    data = load_dataset("imagenet-r", str(imagenet_r_tree))
    assert data.num_classes == 200 and len(data.train) == 800 and len(data.test) == 200
    assert data.transform_style == "crop"
    train = {data.train.describe(i) for i in range(len(data.train))}
    test = {data.test.describe(i) for i in range(len(data.test))}
    assert not train & test and train | test == set(imagenet_r_names())
    # Labels come from the class folder: sorted wnids.
    wnids = sorted({n.split("/")[0] for n in imagenet_r_names()})
    assert data.class_names == wnids
    assert all(data.train.describe(i).startswith(wnids[label] + "/") for i, label in enumerate(data.train.labels))
    # One permutation of all files, not 80% of each class: class fractions vary.
    per_class = Counter(data.train.labels)
    totals = Counter(n.split("/")[0] for n in imagenet_r_names())
    assert len({round(per_class[c] / totals[w], 2) for c, w in enumerate(wnids)}) > 3


def test_imagenet_r_split_checksum_is_a_fixed_constant(imagenet_r_tree):
    record = load_dataset("imagenet-r", str(imagenet_r_tree)).records[SPLIT_FILE]
    assert record["file_list_sha256"] == FAKE_FILE_LIST_SHA256
    assert record["split_sha256"] == FAKE_SPLIT_SHA256
    assert record["num_files"] == 1000 and len(record["train"]) == 800 and record["seed"] == 0
    # The checksum is that of the listed split: anyone can recompute it from the file.
    lines = [f"train\t{f}" for f in record["train"]] + [f"test\t{f}" for f in record["test"]]
    assert hashlib.sha256("".join(l + "\n" for l in lines).encode()).hexdigest() == FAKE_SPLIT_SHA256


def test_imagenet_r_split_does_not_depend_on_directory_order(imagenet_r_tree, monkeypatch):
    first = load_dataset("imagenet-r", str(imagenet_r_tree))
    listing = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(listing(self), reverse=True)))
    second = load_dataset("imagenet-r", str(imagenet_r_tree))
    assert second.records[SPLIT_FILE]["split_sha256"] == FAKE_SPLIT_SHA256
    assert second.fingerprint() == first.fingerprint()
    shuffled = list(imagenet_r_names())
    np.random.default_rng(3).shuffle(shuffled)
    assert split_record(shuffled)["split_sha256"] == FAKE_SPLIT_SHA256


def test_split_positions_at_the_real_size():
    train, test = split_positions(30_000)
    assert len(train) == 24_000 and len(test) == 6_000 and not set(train) & set(test)
    assert split_positions(30_000) == (train, test)


def test_imagenet_r_from_its_tar_and_from_a_folder_holding_it(imagenet_r_tree, tmp_path, data_cache):
    archive = make_tar(tmp_path / "imagenet-r.tar", imagenet_r_tree / "imagenet-r", "imagenet-r")
    from_tar = load_dataset("imagenet-r", str(archive))
    assert from_tar.records[SPLIT_FILE]["split_sha256"] == FAKE_SPLIT_SHA256
    assert str(data_cache) in from_tar.root
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(archive, holder / "imagenet-r.tar")
    from_holder = load_dataset("imagenet-r", str(holder))
    assert from_holder.fingerprint() == from_tar.fingerprint() == load_dataset("imagenet-r",
                                                                                str(imagenet_r_tree)).fingerprint()


def test_imagenet_r_already_split_layout(tmp_path):
    names = [f"n{c:08d}" for c in range(200)]
    data = load_dataset("imagenet-r", str(write_image_tree(tmp_path, names, per_split=(2, 1), size=4)))
    assert (data.num_classes, len(data.train), len(data.test)) == (200, 400, 200)
    assert SPLIT_FILE not in data.records


def test_imagenet_r_with_missing_classes_is_an_error(tmp_path):
    write_imagenet_r(tmp_path, num_classes=12)
    with pytest.raises(SlcaError, match="12 classes, imagenet-r has 200"):
        load_dataset("imagenet-r", str(tmp_path))


# CUB-200-2011 -------------------------------------------------------------------------------------------------------

def test_cub_official_layout_follows_train_test_split(tmp_path):
    write_cub(tmp_path)
    data = load_dataset("cub200", str(tmp_path))
    assert (data.num_classes, len(data.train), len(data.test)) == (200, 400, 200)
    assert data.class_names == cub_class_names() and data.transform_style == "fine-grained"
    assert Counter(data.train.labels) == {c: 2 for c in range(200)}
    assert data.train.describe(0) == "images/001.Bird_1/Bird_1_0000.jpg"
    assert data.test.describe(0) == "images/001.Bird_1/Bird_1_0002.jpg" and data.test.labels[0] == 0
    assert data.train.labels[-1] == 199 and data.train.describe(len(data.train) - 1).startswith("images/200.")


def test_cub_from_the_official_tgz(tmp_path):
    write_cub(tmp_path / "tree")
    (tmp_path / "tree" / "attributes.txt").write_text("1 has_bill_shape::dagger\n")  # beside CUB_200_2011/
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "CUB_200_2011", arcname="CUB_200_2011")
        tar.add(tmp_path / "tree" / "attributes.txt", arcname="attributes.txt")
    data = load_dataset("cub200", str(archive))
    assert (data.num_classes, len(data.train), len(data.test)) == (200, 400, 200)
    assert data.fingerprint() == load_dataset("cub200", str(tmp_path / "tree")).fingerprint()


def test_cub_train_test_folder_layout(tmp_path):
    data = load_dataset("cub200", str(write_image_tree(tmp_path, cub_class_names(), per_split=(1, 1), size=4)))
    assert (data.num_classes, len(data.train), len(data.test)) == (200, 200, 200)


def test_cub_broken_metadata_names_the_file(tmp_path, cli):
    write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "image_class_labels.txt").unlink()
    code, _, err = cli("datasets", "prepare", "cub200", "--data-root", tmp_path)
    assert_one_line_error(code, err, "image_class_labels.txt")
    write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "images" / "007.Bird_7" / "Bird_7_0001.jpg").unlink()
    code, _, err = cli("datasets", "prepare", "cub200", "--data-root", tmp_path)
    assert_one_line_error(code, err, "missing", "Bird_7_0001.jpg")


# Cars-196 -----------------------------------------------------------------------------------------------------------

def _check_cars(data, per_split=(2, 1)):
    names = sorted(n.replace("/", "-") for n in cars_class_names())
    assert data.num_classes == 196 and data.class_names == names
    assert (len(data.train), len(data.test)) == (196 * per_split[0], 196 * per_split[1])
    assert data.transform_style == "fine-grained"


@pytest.mark.parametrize("nested", [False, True])
def test_cars_devkit_mat_layout(tmp_path, nested):
    write_cars_devkit(tmp_path, nested=nested)
    data = load_dataset("cars196", str(tmp_path))
    _check_cars(data)
    # Class ids are the alphabetical ranks of the names: official class 6 is 'Ram C/V ...', sorted last.
    official = cars_class_names()
    first_ram = data.test.labels[5]  # test images go class by class, one each: the 6th is official class 6
    assert data.class_names[first_ram] == "Ram C-V Cargo Van Minivan 2012" == official[5].replace("/", "-")
    assert data.train.labels[0] == data.class_names.index(official[0])


def test_cars_devkit_labels_match_the_folder_layout(tmp_path):
    """The same images in both layouts get the same class ids, so class orders agree across layouts."""
    write_cars_devkit(tmp_path / "devkit")
    folders = write_image_tree(tmp_path / "folders", [n.replace("/", "-") for n in cars_class_names()],
                               per_split=(1, 1), size=4)
    by_devkit = load_dataset("cars196", str(tmp_path / "devkit"))
    by_folder = load_dataset("cars196", str(folders))
    assert by_devkit.class_names == by_folder.class_names


def test_cars_official_archives_with_the_loose_labels_file(tmp_path):
    tree = write_cars_devkit(tmp_path / "tree")
    holder = tmp_path / "downloads"
    holder.mkdir()
    make_tar(holder / "car_devkit.tgz", tree / "devkit", "devkit")
    make_tar(holder / "cars_train.tgz", tree / "cars_train", "cars_train")
    make_tar(holder / "cars_test.tgz", tree / "cars_test", "cars_test")
    shutil.copy(tree / "cars_test_annos_withlabels.mat", holder)
    data = load_dataset("cars196", str(holder))
    _check_cars(data)
    assert data.fingerprint() == load_dataset("cars196", str(tree)).fingerprint()


def test_cars_without_test_labels_says_which_file(tmp_path, cli):
    write_cars_devkit(tmp_path)
    (tmp_path / "cars_test_annos_withlabels.mat").unlink()
    code, _, err = cli("datasets", "prepare", "cars196", "--data-root", tmp_path)
    assert_one_line_error(code, err, "cars_test_annos_withlabels.mat")


def test_cars_all_in_one_annos_layout(tmp_path):
    write_cars_annos(tmp_path)
    _check_cars(load_dataset("cars196", str(tmp_path)))


def test_cars_folder_layout_from_a_nested_zip_copy(tmp_path):
    import zipfile
    tree = write_image_tree(tmp_path / "tree", [n.replace("/", "-") for n in cars_class_names()], per_split=(2, 1),
                            size=4)
    archive = tmp_path / "stanford-car-dataset-by-classes-folder.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("names.csv", "x\n")
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, "car_data/car_data/" + path.relative_to(tree).as_posix())
        zf.writestr("__MACOSX/car_data/._junk.png", b"not an image")
    _check_cars(load_dataset("cars196", str(archive)))


# folder, task splits ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, sizes", [({"tasks": 3}, [2, 2, 2]), ({"init_classes": 2, "increment": 2}, [2, 2, 2]),
                                          ({"init_classes": 4, "increment": 1}, [4, 1, 1]),
                                          ({"tasks": 4, "init_classes": 3}, [3, 1, 1, 1])])
def test_folder_tasks_and_increment(tmp_path, flags, sizes):
    from slca_cli.resolve import resolve_run
    root = write_image_tree(tmp_path, [f"c{i}" for i in range(6)], per_split=(1, 1))
    cfg, data = resolve_run("folder", "vit-tiny-test", "slca", dict(data_root=str(root), **flags))
    assert list(cfg.task_sizes) == sizes and data.num_classes == 6


def test_folder_from_an_archive(tmp_path):
    tree = write_image_tree(tmp_path / "tree", ["a", "b", "c"], per_split=(2, 1))
    archive = tmp_path / "mine.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    data = load_dataset("folder", str(archive))
    assert data.class_names == ["a", "b", "c"] and len(data.train) == 6
    assert data.fingerprint() == load_dataset("folder", str(tree)).fingerprint()


# prepare ------------------------------------------------------------------------------------------------------------

def test_prepare_reports_counts_per_split_and_class(tmp_path, cli):
    write_cub(tmp_path)
    code, out, err = cli("datasets", "prepare", "cub200", "--data-root", tmp_path, "--no-progress")
    assert code == 0, err
    assert "cub200: 200 classes; train 400 images, test 200" in out
    assert "the full benchmark has 200 classes, 5,994 / 5,794" in out
    assert "001.Bird_1 2/1" in " ".join(out.split()) and "all 600 images decode" in out


def test_prepare_imagenet_r_writes_the_split_file(imagenet_r_tree, tmp_path, cli):
    root = tmp_path / "data"
    shutil.copytree(imagenet_r_tree, root)
    code, out, err = cli("datasets", "prepare", "imagenet-r", "--data-root", root, "--no-progress")
    assert code == 0, err
    assert "imagenet-r: 200 classes; train 800 images, test 200" in out
    split = read_json(root / "imagenet-r" / SPLIT_FILE)
    assert split["split_sha256"] == FAKE_SPLIT_SHA256 and FAKE_SPLIT_SHA256[:16] in out
    # The split file beside the class folders does not disturb the next load.
    assert load_dataset("imagenet-r", str(root)).num_classes == 200


def test_prepare_downloads_imagenet_r_and_checks_md5(imagenet_r_tree, tmp_path, cli, monkeypatch):
    archive = make_tar(tmp_path / "served" / "imagenet-r.tar", imagenet_r_tree / "imagenet-r", "imagenet-r")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(prepare_module, "IMAGENET_R_SOURCE", Source(archive.as_uri(), "0" * 32, "imagenet-r.tar"))
    code, _, err = cli("datasets", "prepare", "imagenet-r", "--data-root", tmp_path / "dl", "--no-progress")
    assert_one_line_error(code, err, "damaged", "md5")
    assert not (tmp_path / "dl" / "imagenet-r.tar").exists()
    monkeypatch.setattr(prepare_module, "IMAGENET_R_SOURCE", Source(archive.as_uri(), md5, "imagenet-r.tar"))
    code, out, err = cli("datasets", "prepare", "imagenet-r", "--data-root", tmp_path / "dl", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "dl" / "imagenet-r.tar").is_file() and "train 800 images, test 200" in out
    assert FAKE_SPLIT_SHA256[:16] in out


def test_prepare_offline_says_where_to_put_which_file(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(prepare_module, "IMAGENET_R_SOURCE",
                        Source("http://127.0.0.1:9/imagenet-r.tar", "0" * 32, "imagenet-r.tar"))
    code, _, err = cli("datasets", "prepare", "imagenet-r", "--data-root", tmp_path / "d", "--no-progress")
    assert_one_line_error(code, err, "could not download http://127.0.0.1:9/imagenet-r.tar",
                          str(tmp_path / "d" / "imagenet-r.tar"))
    code, _, err = cli("datasets", "prepare", "imagenet-r", "--data-root", tmp_path / "d", "--no-download")
    assert_one_line_error(code, err, "imagenet-r.tar", "slca datasets prepare imagenet-r")


def test_data_root_holding_several_datasets(imagenet_r_tree, tmp_path):
    shared = tmp_path / "data"
    shutil.copytree(imagenet_r_tree / "imagenet-r", shared / "imagenet-r")
    write_cub(shared)
    write_image_tree(shared / "some-images", ["a", "b"], per_split=(1, 1))
    assert load_dataset("imagenet-r", str(shared)).records[SPLIT_FILE]["split_sha256"] == FAKE_SPLIT_SHA256
    assert load_dataset("cub200", str(shared)).num_classes == 200


def test_prepare_cifar100_offline_without_download(tmp_path, cli):
    code, _, err = cli("datasets", "prepare", "cifar100", "--data-root", tmp_path / "empty", "--no-download")
    assert_one_line_error(code, err, "does not exist", "cifar-100-python", "cifar100-png.tar.gz")


def test_prepare_and_train_on_a_wrong_layout_name_the_expected_one(tmp_path, cli):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("x")
    (tmp_path / "other").mkdir()
    code, _, err = cli("datasets", "prepare", "cub200", "--data-root", tmp_path)
    assert_one_line_error(code, err, "does not hold", "images.txt", "train_test_split.txt")
    code, _, err = cli("train", "--dataset", "cars196", "--backbone", "vit-tiny-test", "--data-root", tmp_path)
    assert_one_line_error(code, err, "cars_train_annos.mat", "train/<class>")
    code, _, err = cli("datasets", "prepare", "nope")
    assert_one_line_error(code, err, "unknown dataset 'nope'")


def test_datasets_lists_every_dataset_with_its_layout(cli):
    code, out, _ = cli("datasets")
    assert code == 0
    for name in ("cifar100", "imagenet-r", "cub200", "cars196", "folder", "synthetic"):
        assert f"\n{name}\n" in f"\n{out}"
    assert "images.txt" in out and "cars_meta.mat" in out and "slca datasets prepare" in out


# whole runs ---------------------------------------------------------------------------------------------------------

def test_train_on_imagenet_r_records_the_split_in_the_run_folder(imagenet_r_tree, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", "--dataset", "imagenet-r", "--data-root", imagenet_r_tree, "--backbone",
                       "vit-tiny-test", "--device", "cpu", "--epochs", 1, "--train-per-class", 1, "--test-per-class",
                       1, "--workers", 0, "--ca-samples", 4, "--ca-epochs", 1, "--tasks", 2, "--no-progress",
                       "--out", out)
    assert code == 0, err
    run = out / "seed-1993"
    split = read_json(run / SPLIT_FILE)
    assert split["split_sha256"] == FAKE_SPLIT_SHA256 and len(split["train"]) == 800
    metrics = read_json(run / "metrics.json")
    # At most one test image per class; the split is not stratified, so a few small classes have none.
    with_test = len(load_dataset("imagenet-r", str(imagenet_r_tree), test_per_class=1).test)
    assert sum(metrics["counts"][-1]["total"]) == with_test and 100 < with_test < 200
    code, stdout, err = cli("eval", run / "task-02", "--device", "cpu", "--no-progress")
    assert code == 0 and "matches the stored" in stdout, err


@pytest.mark.parametrize("dataset, sizes, tau", [("imagenet-r", [20] * 10, 0.1), ("cub200", [20] * 10, 0.1),
                                                 ("cars196", [20] * 9 + [16], 0.05)])
def test_benchmarks_resolve_to_the_protocol(tmp_path, imagenet_r_tree, dataset, sizes, tau):
    from slca_cli.resolve import resolve_run
    root = {"imagenet-r": lambda: imagenet_r_tree, "cub200": lambda: write_cub(tmp_path),
            "cars196": lambda: write_cars_devkit(tmp_path)}[dataset]()
    cfg, data = resolve_run(dataset, "vit-tiny-test", "slca", {"data_root": str(root)})
    assert list(cfg.task_sizes) == sizes and cfg.tau == tau and cfg.epochs == 50 and cfg.lr_drop_epoch == 40
    assert cfg.mean == (0.485, 0.456, 0.406)
    style = {"imagenet-r": "crop", "cub200": "fine-grained", "cars196": "fine-grained"}[dataset]
    assert data.transform_style == style
