"""Unreadable images: one line naming the path (also from DataLoader workers); --skip-bad-images leaves them out."""
import io

import pytest
import torch
from PIL import Image

from slca_cli.data import load_dataset
from slca_cli.data.screening import image_problem
from slca_cli.errors import SlcaError

from conftest import assert_one_line_error, read_json, write_image_tree

CLASSES = ["ant", "bee", "cat", "dog"]
RUN = ["--dataset", "folder", "--backbone", "vit-tiny-test", "--device", "cpu", "--tasks", 2, "--epochs", 1,
       "--no-progress", "--ca-samples", 4, "--ca-epochs", 1]


def damage(path, keep=40):
    """Cut an image file short, as an interrupted copy does."""
    path.write_bytes(path.read_bytes()[:keep])
    return path


@pytest.fixture
def tree_with_a_bad_image(tmp_path):
    root = write_image_tree(tmp_path / "data", CLASSES, per_split=(4, 2))
    return root, damage(root / "train" / "bee" / "img_1.png")


def test_truncated_files_are_found_whatever_the_format(tmp_path):
    pixels = Image.new("RGB", (64, 48), (200, 30, 30))
    for fmt in ("JPEG", "PNG"):
        out = io.BytesIO()
        pixels.save(out, format=fmt)
        good = tmp_path / f"good.{fmt.lower()}"
        good.write_bytes(out.getvalue())
        bad = tmp_path / f"bad.{fmt.lower()}"
        bad.write_bytes(out.getvalue()[: len(out.getvalue()) * 2 // 3])
        assert image_problem(good) is None
        assert image_problem(bad) is not None, fmt
    (tmp_path / "text.jpg").write_text("not an image")
    assert "UnidentifiedImageError" in image_problem(tmp_path / "text.jpg")


def test_error_from_a_dataloader_worker_is_the_original_line(tree_with_a_bad_image):
    root, bad = tree_with_a_bad_image
    data = load_dataset("folder", str(root))
    loader = torch.utils.data.DataLoader(data.train, batch_size=2, num_workers=1, collate_fn=lambda b: b)
    with pytest.raises(SlcaError) as caught:
        list(loader)
    message = str(caught.value)
    assert message.startswith(f"cannot read image {bad}:") and "--skip-bad-images" in message
    assert "Traceback" not in message and "worker" not in message


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_stops_training_with_one_line_naming_it(tree_with_a_bad_image, cli, tmp_path, workers):
    root, bad = tree_with_a_bad_image
    code, _, err = cli("train", *RUN, "--data-root", root, "--workers", workers, "--out", tmp_path / "run")
    assert_one_line_error(code, err, f"cannot read image {bad}", "--skip-bad-images")


def test_skip_bad_images_leaves_it_out_and_records_it(tree_with_a_bad_image, cli, tmp_path):
    root, bad = tree_with_a_bad_image
    out = tmp_path / "run"
    code, stdout, err = cli("train", *RUN, "--data-root", root, "--workers", 0, "--skip-bad-images", "--out", out)
    assert code == 0, err
    assert "left out 1 unreadable image" in stdout
    record = read_json(out / "seed-1993" / "skipped-images.json")
    assert record["count"] == 1
    entry = record["images"][0]
    assert entry["path"] == "train/bee/img_1.png" and entry["class"] == "bee" and entry["split"] == "train"
    config = read_json(out / "seed-1993" / "config.json")
    assert config["config"]["skip_bad_images"] is True
    # eval rebuilds the same data (the flag is in the run's config), so the fingerprint matches.
    code, stdout, err = cli("eval", out / "seed-1993" / "task-02", "--device", "cpu", "--no-progress")
    assert code == 0 and "matches the stored" in stdout, err


def test_skipping_never_shifts_a_label(tree_with_a_bad_image):
    root, _ = tree_with_a_bad_image
    damage(root / "test" / "ant" / "img_0.png")
    data = load_dataset("folder", str(root), skip_bad_images=True)
    assert len(data.train) == 15 and len(data.test) == 7
    assert sorted(data.skipped) == ["test/ant/img_0.png", "train/bee/img_1.png"]
    for split in (data.train, data.test):
        for i, label in enumerate(split.labels):
            assert split.describe(i).split("/")[1] == data.class_names[label]


def test_a_class_with_no_readable_training_image_is_an_error(tree_with_a_bad_image):
    root, _ = tree_with_a_bad_image
    for path in (root / "train" / "cat").iterdir():
        damage(path)
    with pytest.raises(SlcaError, match="every training image of class 'cat'"):
        load_dataset("folder", str(root), skip_bad_images=True)


def test_prepare_lists_unreadable_images(tree_with_a_bad_image, cli):
    root, bad = tree_with_a_bad_image
    code, out, err = cli("datasets", "prepare", "folder", "--data-root", root, "--no-progress")
    assert f"unreadable: {bad}" in out
    assert_one_line_error(code, err, "1 unreadable image", "--skip-bad-images")
