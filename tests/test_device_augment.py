"""On-device CIFAR transforms: exact geometry, torchvision's sampling, sharded loaders, a whole CLI run."""
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from slca_cli.data.device_transforms import (center_crop_boxes, cifar_train_batch, crop_resize, eval_batch,
                                             random_resized_crop_boxes)
from slca_cli.data.loaders import DeviceLoader

from conftest import TINY, assert_one_line_error, read_json, write_image_tree

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def images(n=4, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def boxes(n, top, left, h, w):
    return tuple(torch.full((n,), float(v), dtype=torch.float64) for v in (top, left, h, w))


def test_crop_resize_at_native_scale_is_exact():
    x = images().float() / 255
    torch.testing.assert_close(crop_resize(x, boxes(4, 0, 0, 32, 32), 32), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(crop_resize(x, boxes(4, 0, 0, 32, 32), 32, torch.ones(4, dtype=torch.bool)),
                               x.flip(-1), atol=1e-5, rtol=0)
    sub = crop_resize(x, (torch.full((4,), 5.0), torch.full((4,), 9.0), torch.full((4,), 16.0),
                          torch.full((4,), 16.0)), 16)
    torch.testing.assert_close(sub, x[:, :, 5:21, 9:25], atol=1e-5, rtol=0)


def interior(start, length, size):
    """Output pixels whose 4 bicubic taps all lie inside the crop [start, start + length)."""
    src = start + (torch.arange(size) + 0.5) * length / size - 0.5
    return (src.floor() - 1 >= start) & (src.floor() + 2 <= start + length - 1)


def test_upsampling_crop_matches_torchvision_bicubic_resized_crop():
    """Equal wherever the bicubic taps stay inside the crop; at its edges torchvision (crop, then resize)
    repeats the edge pixel while we read the real neighbouring pixel."""
    x = images(2).float() / 255
    ours = crop_resize(x, boxes(2, 3, 6, 20, 14), 48)
    ref = TF.resized_crop(x, 3, 6, 20, 14, [48, 48], interpolation=InterpolationMode.BICUBIC, antialias=False)
    rows, cols = interior(3, 20, 48), interior(6, 14, 48)
    assert rows.sum() > 30 and cols.sum() > 20
    torch.testing.assert_close(ours[:, :, rows][..., cols], ref[:, :, rows][..., cols], atol=1e-4, rtol=0)


def test_eval_transform_matches_torchvision_resize_and_center_crop():
    u8 = images(3)
    for size in (32, 224):
        ours = eval_batch(u8, size, MEAN, STD)
        x = TF.resize(u8.float() / 255, [round(size * 256 / 224)], interpolation=InterpolationMode.BICUBIC,
                      antialias=False)
        ref = TF.normalize(TF.center_crop(x, [size, size]).clamp(0, 1), MEAN, STD)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    top, left, h, w = center_crop_boxes(1, 32, 32, 224)
    assert h.item() == w.item() == 28.0 and top.item() == left.item() == 2.0


def test_crop_boxes_follow_torchvision_random_resized_crop():
    n = 4000
    top, left, h, w = random_resized_crop_boxes(n, 32, 32, torch.Generator().manual_seed(0))
    for v in (top, left, h, w):
        assert torch.equal(v, v.round())
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    for ours, theirs in ((h * w / 1024, ref[:, 2] * ref[:, 3] / 1024), (w / h, ref[:, 3] / ref[:, 2]),
                         (top, ref[:, 0])):
        assert abs(ours.mean() - theirs.mean()) < 0.04 * max(1.0, theirs.mean().item())
        assert abs(ours.std() - theirs.std()) < 0.06 * max(1.0, theirs.std().item())


def test_train_batch_brightness_flip_and_reproducibility():
    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    out = cifar_train_batch(grey, 16, (0, 0, 0), (1, 1, 1), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 16, 16)
    factor = out.flatten(1).mean(1) / (128 / 255)  # a constant image keeps only the brightness factor
    assert factor.min() >= 1 - 63 / 255 - 1e-5 and factor.max() <= 1 + 63 / 255 + 1e-5
    assert factor.std() > 0.05
    a = cifar_train_batch(images(8), 24, MEAN, STD, torch.Generator().manual_seed(3))
    b = cifar_train_batch(images(8), 24, MEAN, STD, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_device_loader_splits_global_batches_and_shards_evaluation():
    u8 = images(11, size=8)
    labels = torch.arange(11)
    ident = lambda x, g: x  # noqa: E731
    one = DeviceLoader(u8, labels, torch.arange(11), 4, ident, shuffle=True, seed=5)
    two = [DeviceLoader(u8, labels, torch.arange(11), 4, ident, shuffle=True, seed=5, rank=r, world=2)
           for r in range(2)]
    for _ in range(2):  # two epochs, different permutations
        batches = [y for _, y in one]
        halves = [[y for _, y in loader] for loader in two]
        assert len(halves[0]) == len(halves[1]) == len(batches) == 3
        for full, a, b in zip(batches, *halves):
            assert len(a) == len(b)
            assert torch.cat([a, b])[:len(full)].tolist() == full.tolist()  # the last batch is padded
    evaluation = DeviceLoader(u8, labels, torch.arange(11), 4, ident, shuffle=False)
    shards = [torch.cat([y for _, y in evaluation.for_process(r, 3)]) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))


def cifar_tree(root):
    return write_image_tree(root, [f"c{i:02d}" for i in range(100)], per_split=(2, 1), size=32)


def test_cli_run_with_on_device_transforms_on_cpu(tmp_path, cli):
    root = cifar_tree(tmp_path / "cifar")
    out = tmp_path / "run"
    flags = ["--dataset", "cifar100", "--data-root", root, "--backbone", "vit-tiny-test", "--device", "cpu",
             "--no-progress", "--tasks", 2, "--epochs", 1, "--batch-size", 64, "--ca-epochs", 1, "--ca-samples", 4,
             "--workers", 0]
    code, _, stderr = cli("train", *flags, "--augment-on-device", "--out", out)
    assert code == 0, stderr
    run = out / "seed-1993"
    assert read_json(run / "config.json")["config"]["device_augment"] is True
    metrics = read_json(run / "metrics.json")
    assert [sum(c["total"]) for c in metrics["counts"]] == [50, 100]
    code, stdout, stderr = cli("eval", run / "task-02", "--device", "cpu", "--no-progress", "--json")
    assert code == 0, stderr
    assert '"matches_stored": true' in stdout
    code, _, stderr = cli("train", *flags, "--out", tmp_path / "host")
    assert code == 0, stderr
    assert read_json(tmp_path / "host" / "seed-1993" / "config.json")["config"]["device_augment"] is False


def test_on_device_transforms_for_other_datasets_are_refused(cli, tmp_path):
    code, _, stderr = cli("train", *TINY, "--tasks", 2, "--epochs", 1, "--num-classes", 4, "--augment-on-device",
                          "--out", tmp_path)
    assert_one_line_error(code, stderr, "--augment-on-device", "--augment-on-host")


def test_device_training_views_do_not_depend_on_the_process_count():
    """Each process transforms the whole global batch with the one shared generator and keeps its part: the
    processes' parts are the one-process batch bit for bit, and every rank ends an epoch with the same generator
    state (so the single state a mid-task checkpoint saves resumes every rank)."""
    u8 = images(10)
    labels = torch.arange(10)
    train = lambda x, g: cifar_train_batch(x, 16, MEAN, STD, g)  # noqa: E731
    one = DeviceLoader(u8, labels, torch.arange(10), 4, train, shuffle=True, seed=3)
    two = [DeviceLoader(u8, labels, torch.arange(10), 4, train, shuffle=True, seed=3, rank=r, world=2)
           for r in range(2)]
    halves = [list(loader) for loader in two]
    for (x, y), (xa, ya), (xb, yb) in zip(one, *halves):
        assert torch.equal(torch.cat([xa, xb])[:len(y)], x) and torch.equal(torch.cat([ya, yb])[:len(y)], y)
    states = [loader.generator.get_state() for loader in (one, *two)]
    assert torch.equal(states[0], states[1]) and torch.equal(states[1], states[2])
