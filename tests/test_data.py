"""Dataset adapters on generated trees in the layouts people have."""
import pytest

from slca_cli.data import load_dataset
from slca_cli.errors import SlcaError

from conftest import read_json, write_image_tree


def test_folder_layout_sorted_classes_and_caps(tmp_path):
    root = write_image_tree(tmp_path, ["zebra", "apple", "mango"], per_split=(5, 3))
    (root / "train" / "apple" / "notes.txt").write_text("not an image")
    data = load_dataset("folder", str(root), train_per_class=2)
    assert data.class_names == ["apple", "mango", "zebra"]
    assert len(data.train) == 6 and len(data.test) == 9
    assert data.train.labels == [0, 0, 1, 1, 2, 2]
    image, label = data.test[8]
    assert label == 2 and image.size == (16, 16)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    a = write_image_tree(tmp_path / "a", ["x", "y"])
    b = write_image_tree(tmp_path / "b", ["x", "y"])
    assert load_dataset("folder", str(a)).fingerprint() == load_dataset("folder", str(b)).fingerprint()
    (b / "test" / "y" / "img_0.png").rename(b / "test" / "y" / "img_9.png")
    assert load_dataset("folder", str(a)).fingerprint() != load_dataset("folder", str(b)).fingerprint()


def test_mismatched_class_sets_and_empty_classes_are_errors(tmp_path):
    root = write_image_tree(tmp_path, ["a", "b"])
    (root / "test" / "c").mkdir()
    with pytest.raises(SlcaError, match="no images"):
        load_dataset("folder", str(root))
    (root / "test" / "c").rmdir()
    (root / "train" / "b").rename(root / "train" / "d")
    with pytest.raises(SlcaError, match="different class folders"):
        load_dataset("folder", str(root))


def test_cifar100_image_folder_layout(tmp_path):
    names = [f"class_{i:02d}" for i in range(100)]
    root = write_image_tree(tmp_path, names, per_split=(2, 1), size=8)
    data = load_dataset("cifar100", str(root))
    assert data.num_classes == 100 and len(data.train) == 200 and len(data.test) == 100
    assert data.transform_style == "cifar"


def test_cifar100_with_the_wrong_number_of_classes(tmp_path):
    root = write_image_tree(tmp_path, ["a", "b"])
    with pytest.raises(SlcaError, match="100"):
        load_dataset("cifar100", str(root))


def test_synthetic_is_deterministic():
    a = load_dataset("synthetic", None, num_classes=3, train_per_class=2, test_per_class=2)
    b = load_dataset("synthetic", None, num_classes=3, train_per_class=2, test_per_class=2)
    assert a.train.load(3).equal(b.train.load(3))
    assert not a.train.load(3).equal(a.test.load(3))
    assert a.train.labels == [0, 0, 1, 1, 2, 2]


def test_folder_dataset_end_to_end_with_eval(tmp_path, cli):
    root = write_image_tree(tmp_path / "data", ["cat", "dog", "owl", "yak"], per_split=(6, 3))
    out = tmp_path / "run"
    code, _, err = cli("train", "--dataset", "folder", "--data-root", root, "--backbone", "vit-tiny-test",
                       "--device", "cpu", "--tasks", 2, "--epochs", 1, "--workers", 0, "--out", out,
                       "--no-progress")
    assert code == 0, err
    config = read_json(out / "seed-1993" / "config.json")
    assert config["class_names"] == [["cat", "dog", "owl", "yak"][c] for c in config["class_order"]]
    code, stdout, err = cli("eval", out / "seed-1993" / "task-02", "--device", "cpu", "--no-progress")
    assert code == 0 and "matches the stored" in stdout, err
    # Another copy of the same files elsewhere: --data-root points eval at it.
    moved = tmp_path / "moved"
    root.rename(moved)
    code, stdout, err = cli("eval", out / "seed-1993" / "task-02", "--device", "cpu", "--no-progress",
                            "--data-root", moved)
    assert code == 0 and "matches the stored" in stdout, err


def test_augmentation_is_the_same_with_any_number_of_loader_workers():
    """Every item's random transform is seeded from the loader's generator with the shuffle: the batches (order
    and augmented pixels) are equal with 0, 1 or 2 workers, differ between epochs, and leave the caller's RNG."""
    import torch
    from torch.utils.data import Dataset
    from slca_cli.data.loaders import host_loader

    class Noisy(Dataset):  # a "transform" that draws from the global torch RNG, as torchvision's do
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.rand(3) + index, torch.tensor(index)

    def epochs(workers):
        loader = host_loader(Noisy(), 4, True, seed=7, workers=workers)
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(2)]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    reference = epochs(0)
    assert torch.equal(torch.get_rng_state(), before)  # the main process's RNG is untouched
    for workers in (1, 2):
        other = epochs(workers)
        for epoch_a, epoch_b in zip(reference, other):
            for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
    first, second = (torch.cat([y for _, y in e]) for e in reference)
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, second)
    x_first = torch.cat([x for x, _ in reference[0]])[first.argsort()]
    x_second = torch.cat([x for x, _ in reference[1]])[second.argsort()]
    assert not torch.allclose(x_first, x_second)  # new augmentation draws each epoch
