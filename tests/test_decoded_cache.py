"""The JPEG datasets' on-device path: decoded-image caches equal the PIL path's pixels, the random crops draw
from torchvision's distributions, the caches are reused and keyed by their files, and whole CLI runs of
cub200 / imagenet-r take either path with the same classes and data."""
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import RandomCrop, RandomResizedCrop

from slca_cli.data import device_path, load_dataset
from slca_cli.data.base import FileSplit
from slca_cli.data.decoded import Geometry, build_cache, cache_key, open_cache
from slca_cli.data.device_crops import (cached_eval_batch, crop_train_batch, fine_grained_train_batch,
                                        gather_crops, indexed_crops, random_crop_offsets, sliced_crops)
from slca_cli.data.device_transforms import random_resized_crop_boxes_per_image
from slca_cli.data.loaders import resolve_device_augment
from slca_cli.data.transforms import build_transforms

from conftest import REPO, read_json
from fake_datasets import write_cub, write_imagenet_r

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Sizes of the generated JPEGs (width, height): CUB-like, portrait, small, square, a wide panorama.
SIZES = [(500, 375), (240, 320), (61, 47), (300, 300), (400, 90)]


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLCA_DATA_ROOT", str(tmp_path / "data-home"))


def real_photos():
    """Real photographs: CIFAR-100 PNGs from ../shared/data (the first few in the archive) and scikit-image's."""
    photos = []
    archive = REPO.parent / "shared/data/cifar100-png.tar.gz"
    if archive.is_file():
        with tarfile.open(archive, "r:gz") as source:
            for member in source:
                if member.isfile() and member.name.endswith(".png"):
                    photos.append(Image.open(io.BytesIO(source.extractfile(member).read())).convert("RGB"))
                    if len(photos) == 3:
                        break
    from skimage import data as skdata
    photos += [Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())]
    return photos


@pytest.fixture(scope="module")
def jpeg_split(tmp_path_factory):
    """A FileSplit of real JPEGs at several sizes (each photo resized, then JPEG-encoded at quality 90)."""
    root = tmp_path_factory.mktemp("jpegs")
    files = []
    for i, photo in enumerate(real_photos()):
        for j, size in enumerate(SIZES):
            path = root / f"c{i}" / f"img_{j}.jpg"
            path.parent.mkdir(exist_ok=True)
            photo.resize(size, Image.BICUBIC).save(path, quality=90)
            files.append(path)
    return FileSplit(root, files, [0] * len(files))


def pil_tensor(path, transform):
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def test_cached_test_images_equal_the_pil_test_transform(jpeg_split):
    """Resize(256/224 x size) + CenterCrop(size): the cache holds the PIL path's pixels, so the normalized
    tensors differ only by float rounding (tolerance 1e-6)."""
    for size in (32, 224):
        cache = build_cache(jpeg_split, Geometry("center", size))
        ours = cached_eval_batch(torch.from_numpy(np.asarray(cache.images)), MEAN, STD)
        _, test = build_transforms("fine-grained", size, MEAN, STD)
        for i, path in enumerate(jpeg_split.files):
            torch.testing.assert_close(ours[i], pil_tensor(path, test), atol=1e-6, rtol=0)


def test_fine_grained_crops_hold_exactly_the_pil_crops_pixels(jpeg_split):
    """Resize((300, 300)) in the cache, then RandomCrop(224) + flip as an integer gather: the same pixels as
    torchvision's crop and flip of the PIL image at the same offsets."""
    size, big = 48, round(48 * 300 / 224)
    cache = build_cache(jpeg_split, Geometry("square", big))
    images = torch.from_numpy(np.asarray(cache.images))
    top, left = random_crop_offsets(len(images), big, big, size, torch.Generator().manual_seed(0))
    flip = torch.arange(len(images)) % 2 == 0
    ours = gather_crops(images, top, left, size, flip)
    to_tensor = T.PILToTensor()
    for i, path in enumerate(jpeg_split.files):
        with Image.open(path) as image:
            resized = T.Resize((big, big), interpolation=T.InterpolationMode.BICUBIC)(image.convert("RGB"))
        ref = to_tensor(T.functional.crop(resized, int(top[i]), int(left[i]), size, size))
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(ours[i].permute(2, 0, 1), ref)
    batch = fine_grained_train_batch(images, size, MEAN, STD, torch.Generator().manual_seed(1))
    assert batch.shape == (len(images), 3, size, size) and torch.isfinite(batch).all()


def test_random_crop_offsets_and_flips_follow_torchvision():
    n, big, size = 2000, 300, 224
    top, left = random_crop_offsets(n, big, big, size, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = torch.tensor([RandomCrop.get_params(torch.zeros(1, big, big), (size, size))[:2] for _ in range(n)],
                       dtype=torch.float64)
    for ours, theirs in ((top.double(), ref[:, 0]), (left.double(), ref[:, 1])):
        assert ours.min() == 0 and ours.max() == big - size  # every offset reachable, none beyond
        assert abs(ours.mean() - theirs.mean()) < 2.5 and abs(ours.std() - theirs.std()) < 2.5


def test_per_image_crop_boxes_follow_torchvision_for_every_image_size():
    """One batch of images of different sizes: each size's boxes have torchvision's area, aspect and position
    statistics; an image no attempt fits gets torchvision's deterministic fallback box."""
    n = 1500
    shapes = [(375, 500), (320, 240), (47, 61)]
    heights = torch.tensor([h for h, _ in shapes] * n)
    widths = torch.tensor([w for _, w in shapes] * n)
    top, left, h, w = random_resized_crop_boxes_per_image(heights, widths, torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    torch.manual_seed(0)
    for k, (height, width) in enumerate(shapes):
        mine = slice(k, None, len(shapes))
        ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                            for _ in range(n)], dtype=torch.float64)
        for ours, theirs in ((h[mine] * w[mine] / (height * width), ref[:, 2] * ref[:, 3] / (height * width)),
                             (w[mine] / h[mine], ref[:, 3] / ref[:, 2]), (top[mine] / height, ref[:, 0] / height)):
            assert abs(ours.mean() - theirs.mean()) < 0.05 * max(1.0, theirs.mean().item())
            assert abs(ours.std() - theirs.std()) < 0.07 * max(1.0, theirs.std().item())
    # A 20:1 panorama with scale >= 0.9: no attempt fits, so the centred crop at the widest allowed ratio.
    box = random_resized_crop_boxes_per_image(torch.tensor([10]), torch.tensor([200]),
                                              torch.Generator().manual_seed(0), scale=(0.9, 1.0))
    torch.manual_seed(0)
    expected = RandomResizedCrop.get_params(torch.zeros(1, 10, 200), [0.9, 1.0], [3 / 4, 4 / 3])
    assert [int(v.item()) for v in box] == list(expected)


def test_bounded_cache_keeps_small_images_and_shrinks_large_ones(jpeg_split):
    side = 128
    cache = build_cache(jpeg_split, Geometry("bounded", side))
    for i, path in enumerate(jpeg_split.files):
        with Image.open(path) as image:
            width, height = image.size
            original = np.array(image.convert("RGB"))
        h, w = cache.sizes[i]
        assert max(h, w) == min(side, max(width, height))
        if max(width, height) <= side:  # no resampling at all: the crop reads the original
            assert np.array_equal(cache.images[i, :h, :w], original)
        assert np.array_equal(cache.images[i, h:, :w], np.repeat(cache.images[i, h - 1:h, :w], side - h, 0))
    # A box covering a small image exactly, at its own size, returns the image itself.
    small = [i for i, path in enumerate(jpeg_split.files) if max(cache.sizes[i]) < side][0]
    h, w = (int(v) for v in cache.sizes[small])
    x = crop_train_batch(torch.from_numpy(np.asarray(cache.images[small:small + 1])), torch.tensor([[h, w]]), 16,
                         (0,) * 3, (1,) * 3, torch.Generator().manual_seed(0))
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1


def test_cache_is_reused_keyed_by_its_files_and_independent_of_workers(jpeg_split, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(jpeg_split.root, root)
    split = FileSplit(root, [root / p.relative_to(jpeg_split.root) for p in jpeg_split.files], jpeg_split.labels)
    geometry = Geometry("center", 32)
    first = build_cache(split, geometry, workers=0)
    assert first.build_seconds > 0
    again = build_cache(split, geometry, workers=0)
    assert again.path == first.path and again.build_seconds == 0.0  # opened, not rebuilt
    key = cache_key(split, geometry)
    assert cache_key(split, Geometry("center", 48)) != key
    os.utime(split.files[0], ns=(1, 1))  # a changed file means a new cache
    assert cache_key(split, geometry) != key and open_cache(split, geometry) is None
    parallel = build_cache(split, geometry, workers=2)
    assert np.array_equal(np.asarray(parallel.images), np.asarray(first.images))


def test_a_path_that_does_not_fit_falls_back_to_the_host_with_one_line(tmp_path, monkeypatch):
    data = load_dataset("cub200", str(write_cub(tmp_path / "cub", per_class=2, train_per_class=1)))
    lines = []
    assert resolve_device_augment(True, data, torch.device("cpu"), 32, lines.append) is True
    monkeypatch.setattr(device_path.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 10))
    assert resolve_device_augment(True, data, torch.device("cpu"), 32, lines.append) is False
    assert len(lines) == 1 and "cub200" in lines[0] and "--augment-on-host" in lines[0] and "GB" in lines[0]
    assert resolve_device_augment(None, data, torch.device("cpu"), 32, lines.append) is False  # CPU default


FLAGS = ["--backbone", "vit-tiny-test", "--device", "cpu", "--no-progress", "--epochs", 1, "--batch-size", 32,
         "--ca-epochs", 1, "--ca-samples", 4, "--image-size", 32, "--workers", 0, "--train-per-class", 1,
         "--test-per-class", 1]


@pytest.mark.parametrize("dataset", ["cub200", "imagenet-r"])
def test_cli_runs_on_both_paths_with_the_same_classes_and_data(dataset, tmp_path, cli):
    if dataset == "cub200":
        root = write_cub(tmp_path / "cub", per_class=3, train_per_class=2)
    else:
        root = write_imagenet_r(tmp_path / "inr")
    common = ["train", "--dataset", dataset, "--data-root", root, *FLAGS, "--tasks", 2]
    runs = {}
    for flag in ("--augment-on-device", "--augment-on-host"):
        out = tmp_path / flag.strip("-")
        code, _, stderr = cli(*common, flag, "--out", out)
        assert code == 0, stderr
        runs[flag] = out / "seed-1993"
    device, host = (read_json(runs[f] / "config.json") for f in ("--augment-on-device", "--augment-on-host"))
    assert device["config"]["device_augment"] is True and host["config"]["device_augment"] is False
    assert device["class_order"] == host["class_order"] and device["data_fingerprint"] == host["data_fingerprint"]
    device_metrics, host_metrics = (read_json(runs[f] / "metrics.json") for f in runs)
    assert [c["total"] for c in device_metrics["counts"]] == [c["total"] for c in host_metrics["counts"]]
    assert len(list((tmp_path / "data-home" / "decoded").glob("*.npy"))) == 3  # train crop + 2 test geometries
    code, stdout, stderr = cli("eval", runs["--augment-on-device"] / "task-02", "--device", "cpu", "--no-progress",
                               "--json")
    assert code == 0 and '"matches_stored": true' in stdout, stderr


def test_resume_on_the_device_path_gives_the_same_metrics(tmp_path, cli):
    root = write_cub(tmp_path / "cub", per_class=3, train_per_class=2)
    common = ["train", "--dataset", "cub200", "--data-root", root, *FLAGS, "--tasks", 3, "--augment-on-device",
              "--out"]
    code, _, stderr = cli(*common, tmp_path / "run")
    assert code == 0, stderr
    run = tmp_path / "run" / "seed-1993"
    copy = tmp_path / "copy" / "seed-1993"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "task-03")
    code, stdout, stderr = cli(*common, tmp_path / "copy", "--resume")
    assert code == 0 and "resuming" in stdout, stderr
    straight, resumed = read_json(run / "metrics.json"), read_json(copy / "metrics.json")
    for key in ("accuracy_matrix", "counts", "train_loss"):
        assert resumed[key] == straight[key], key


def test_cpu_and_gpu_crop_gathers_agree():
    """The CPU's slice-and-stack gather and the GPU's advanced-indexing one give the same crops."""
    images = torch.randint(0, 256, (9, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    top, left = random_crop_offsets(9, 40, 40, 24, torch.Generator().manual_seed(1))
    flip = torch.arange(9) % 3 == 0
    expected = torch.stack([images[i, a:a + 24, b:b + 24].flip(1) if flip[i] else images[i, a:a + 24, b:b + 24]
                            for i, (a, b) in enumerate(zip(top.tolist(), left.tolist()))])
    assert torch.equal(sliced_crops(images, top, left, 24, flip), expected)
    assert torch.equal(indexed_crops(images, top, left, 24, flip), expected)


class _Noisy(torch.utils.data.Dataset):  # a "transform" drawing from the global torch RNG, as torchvision's do
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(3) + index, torch.tensor(index)


def test_persistent_workers_resume_exactly_from_the_shuffle_generator():
    """Host loaders keep their workers across epochs; restoring the shuffle's generator after epoch 1 into a new
    loader (as --checkpoint-every's resume does) gives epoch 2 exactly, workers or not."""
    from slca_cli.data.loaders import host_loader, shuffle_generator

    straight = host_loader(_Noisy(), 4, True, seed=3, workers=2)
    assert straight.persistent_workers
    list(straight)
    saved = shuffle_generator(straight).get_state()
    second = [(x.clone(), y.clone()) for x, y in straight]
    for workers in (0, 2):
        resumed = host_loader(_Noisy(), 4, True, seed=3, workers=workers)
        shuffle_generator(resumed).set_state(saved)
        for (xa, ya), (xb, yb) in zip(second, resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_compile_runs_full_batches_compiled_and_a_partial_last_batch_eagerly(monkeypatch):
    import torch._dynamo
    from slca_cli.speed import compile_backbone

    monkeypatch.setenv("SLCA_COMPILE_BACKEND", "eager")  # graph capture without inductor's code generation
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    expected = {n: net(torch.ones(n, 3, 2, 2)) for n in (4, 3)}
    compile_backbone(net)
    for n in (4, 3, 4, 3):
        torch.testing.assert_close(net(torch.ones(n, 3, 2, 2)), expected[n])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the size-3 batch never compiled
    assert list(net.state_dict()) == ["1.weight", "1.bias"]


def test_fused_optimizer_only_on_cuda_parameters():
    from slca_cli.recipe import fused_supported

    assert fused_supported([{"params": [torch.nn.Parameter(torch.ones(2))]}]) == {}  # CPU: the default kernels


def test_fused_kernels_are_used_only_where_this_torch_has_them(monkeypatch):
    """torch>=2.1 is allowed and SGD(fused=True) is younger: an optimizer without the keyword (or the kernel) means
    the default implementation, not a TypeError at the first task on a GPU."""
    import slca_cli.recipe as recipe

    class CudaLike:  # what fused_supported reads of a CUDA parameter
        is_cuda, device = True, torch.device("cpu")

        def is_floating_point(self):
            return True

    class OldSGD(torch.optim.SGD):
        def __init__(self, params, fused=None, **kwargs):
            if fused is not None:
                raise TypeError("SGD.__init__() got an unexpected keyword argument 'fused'")
            super().__init__(params, **kwargs)

    groups = [{"params": [CudaLike()]}]
    recipe.fused_optimizer_supported.cache_clear()
    monkeypatch.setattr(torch.optim, "SGD", OldSGD)
    assert recipe.fused_optimizer_supported("sgd", torch.device("cpu")) is False
    assert recipe.fused_supported(groups, "sgd") == {}
    monkeypatch.undo()
    recipe.fused_optimizer_supported.cache_clear()
    monkeypatch.setattr(recipe, "fused_optimizer_supported", lambda name, device: True)
    assert recipe.fused_supported(groups, "sgd") == {"fused": True}


def test_host_batches_are_uint8_and_normalize_on_the_device_to_the_float_path(tmp_path):
    """The host path sends uint8 (a quarter of the bytes through pinned memory) and normalizes after the copy:
    the same numbers as ToTensor + Normalize on the host."""
    from slca_cli.data import attach_transforms
    from slca_cli.data.loaders import PassLoaders, finish_batch, host_loader
    from slca_cli.data.base import RemappedSubset

    data = load_dataset("cub200", str(write_cub(tmp_path / "cub", num_classes=200, per_class=2, train_per_class=1)))
    attach_transforms(data, 32, MEAN, STD)
    loaders = PassLoaders(data, list(range(200)), batch_size=8, image_size=32, mean=MEAN, std=STD,
                          device=torch.device("cpu"), workers=0, on_device=False)
    test = loaders.test(list(range(20)))
    images, labels = next(iter(test))
    assert images.dtype == torch.uint8 and len(images) == 16  # inference passes: twice the batch
    float_path = host_loader(RemappedSubset(data.test, list(range(200)), list(range(20))), 16, False, 0, 0)
    reference, _ = next(iter(float_path))
    assert torch.equal(finish_batch(test)(images), reference)


def test_a_build_lock_left_by_a_killed_process_is_taken_over(jpeg_split, tmp_path):
    """Processes of one node build a cache once (the others wait); a lock whose process died does not block."""
    import socket
    import subprocess
    import sys
    from slca_cli.data.decoded import _paths

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    geometry = Geometry("center", 16)
    array_path, _ = _paths(jpeg_split, geometry)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    lock = array_path.with_suffix(".building")
    lock.write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")
    cache = build_cache(jpeg_split, geometry)
    assert cache.images.shape[0] == len(jpeg_split) and not lock.exists()


def test_killed_mid_task_on_the_device_path_resumes_bit_for_bit(tmp_path, cli):
    """--checkpoint-every on cub200 with --augment-on-device: SIGKILL in task 2's second epoch, --resume, and
    the weights and statistics equal a straight run's (the augmentation generator and epoch are restored)."""
    import signal
    from procs import Running

    root = write_cub(tmp_path / "cub", num_classes=200, per_class=2, train_per_class=1)
    args = ["train", "--dataset", "cub200", "--data-root", root, *FLAGS, "--tasks", 2, "--epochs", 2,
            "--batch-size", 8, "--augment-on-device", "--checkpoint-every", 1]
    code, _, stderr = cli(*args, "--out", tmp_path / "straight")
    assert code == 0, stderr
    point = "fit task=2 epoch=2 batch=2"
    killed = Running([*args, "--out", tmp_path / "killed"], env={"SLCA_STALL_AT": point})
    killed.wait_for(f"stalled at {point}")
    killed.proc.send_signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    assert read_json(tmp_path / "killed" / "seed-1993" / "in-progress" / "state.json")["epoch"] == 1
    code, stdout, stderr = cli(*args, "--out", tmp_path / "killed", "--resume")
    assert code == 0 and "resuming task 2 after epoch 1" in stdout, stderr
    for folder in ("task-01", "task-02"):
        assert read_json(tmp_path / "killed" / "seed-1993" / folder / "state.json")["sha256"] == \
            read_json(tmp_path / "straight" / "seed-1993" / folder / "state.json")["sha256"], folder
