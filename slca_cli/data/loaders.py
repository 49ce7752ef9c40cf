"""Which loader feeds each pass (train, statistics, test): host DataLoaders with worker processes, or the whole
split held once as uint8 on the training device with the transforms applied batched there (small images)."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..distributed import workers_per_process
from ..errors import SlcaError
from ..protocol import class_remap
from ..signals import worker_init
from .base import ArraySplit, DatasetSplits, LabelledSplit, RemappedSubset
from .decoded import build_cache
from .device_crops import cached_eval_batch, crop_train_batch, fine_grained_train_batch
from .device_path import DEVICE_AUGMENT_STYLES, pass_geometries, why_not_on_device
from .device_transforms import cifar_train_batch, eval_batch, normalize, to_float
from .transforms import build_transforms


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


INFERENCE_BATCH_FACTOR = 2
PIL_STYLES = ("cifar", "crop", "fine-grained", "digits")


class DeviceNormalize:
    """uint8 host batches -> normalized float32 on their device, the same ops as ToTensor + Normalize (so the
    same numbers); float batches pass unchanged. Host loaders carry one as ``finish_batch``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        return normalize(to_float(images), self.mean, self.std)


def finish_batch(loader) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a pass applies to each batch of ``loader`` once it is on the device (identity for most loaders)."""
    return getattr(loader, "finish_batch", None) or (lambda images: images)


class SeededShuffle(Sampler):
    """Each epoch: a permutation of the items and one seed per item, both drawn from ``generator``, the shuffle's
    own (--checkpoint-every saves and restores it; the DataLoader's, which seeds its workers once, is another).
    Yields (index, seed) keys for ``PerItemRandomness``."""

    def __init__(self, num_items: int, generator: torch.Generator):
        self.num_items, self.generator = num_items, generator

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        # Where the DataLoader drew its workers' base seed when it shared this generator: drawn still, so the
        # stream (and every earlier run's data order) is what it was.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(self.num_items, generator=self.generator).tolist()
        seeds = torch.randint(0, 2**62, (self.num_items,), generator=self.generator).tolist()
        return iter(zip(order, seeds))


class PerItemRandomness(Dataset):
    """Runs the wrapped item's random transforms from the seed that comes with its index, whichever process
    (loader worker or the main one) reads it: augmentation then does not depend on --workers or the number of
    cores, and the main process's own RNG is left as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class FixedDraws(Dataset):
    """Item ``i`` is the ``i``-th of ``keys``, (index, transform seed) pairs drawn once (``SeededShuffle``): a plain
    indexable dataset, so a pass over it can be sharded across processes (distributed.ProcessShard) and every
    item gets the same augmentation at every pass and under any process layout."""

    def __init__(self, dataset: Dataset, keys: Sequence):
        self.items, self.keys = PerItemRandomness(dataset), list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return self.items[self.keys[i]]


def host_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose order and augmentation come from ``seed`` only: a shuffled loader draws every item's
    transform seed with the permutation (SeededShuffle, from its own generator), so the images are the same with
    any number of workers. Workers persist across the epochs of a loader: they only run seeded transforms, and
    the DataLoader's generator (drawn once for their base seed) is not the shuffle's, so a run resumed at an epoch
    boundary (--checkpoint-every) continues exactly as a straight run does."""
    sampler = SeededShuffle(len(dataset), torch.Generator().manual_seed(seed)) if shuffle else None
    loader = DataLoader(PerItemRandomness(dataset) if shuffle else dataset, batch_size=batch_size, sampler=sampler,
                        generator=torch.Generator().manual_seed(seed + 1), num_workers=workers,
                        pin_memory=pin_memory, drop_last=False, persistent_workers=workers > 0,
                        worker_init_fn=worker_init if workers > 0 else None)
    loader.shuffle_generator = sampler.generator if shuffle else loader.generator
    return loader


def shuffle_generator(loader) -> torch.Generator:
    """The generator that decides a training loader's next epochs (saved and restored by --checkpoint-every)."""
    return getattr(loader, "shuffle_generator", None) or loader.generator


def resolve_device_augment(flag: Optional[bool], data: DatasetSplits, device: torch.device,
                           image_size: Optional[int] = None, log: Optional[Callable[[str], None]] = None) -> bool:
    """``--augment-on-device``: default on for the benchmarks' image datasets on a GPU, off elsewhere. With
    ``image_size``, a path whose decoded images do not fit (disk, GPU memory) falls back to the host with one line."""
    supported = data.transform_style in DEVICE_AUGMENT_STYLES
    if flag is None:
        flag = supported and device.type == "cuda"
    elif flag and not supported:
        raise SlcaError(f"--augment-on-device implements the CIFAR, fine-grained and crop transforms; {data.name} "
                        f"uses the '{data.transform_style}' transforms on host workers: drop the flag or pass "
                        f"--augment-on-host")
    if flag and image_size is not None:
        reason = why_not_on_device(data, image_size, device)
        if reason:
            (log or _to_stderr)(f"augment-on-device: {reason}; using the host path (--augment-on-host)")
            return False
    return flag


class _Pixels(Dataset):
    def __init__(self, split: LabelledSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        image = self.split.load(index)
        if isinstance(image, torch.Tensor):  # float in [0, 1], (C, H, W)
            return (image * 255).round().clamp(0, 255).to(torch.uint8)
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_images(split: LabelledSplit, workers: int = 0) -> torch.Tensor:
    """Every image of ``split`` as one (N, 3, H, W) uint8 tensor, decoded once (in parallel by ``workers``)."""
    if isinstance(split, ArraySplit):
        return torch.from_numpy(np.ascontiguousarray(split.images)).permute(0, 3, 1, 2).contiguous()
    chunks = []
    loader = DataLoader(_Pixels(split), batch_size=256, num_workers=workers, collate_fn=_stack_same_size)
    for chunk in loader:
        chunks.append(chunk)
    return torch.cat(chunks)


def _stack_same_size(images):
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise SlcaError(f"--augment-on-device needs images of one size, found {sorted(sizes)[:3]}; pass "
                        f"--augment-on-host")
    return torch.stack(images)


class DeviceLoader:
    """Batches of (transformed images, labels) from uint8 images already on the device.

    Training (``shuffle``): one permutation per epoch from ``(seed, epoch)``, identical on every process; each
    global batch of ``batch_size`` is split across the ``world`` processes as accelerate's ``split_batches``
    does (the last batch padded from the start of the permutation to a multiple of ``world``), so the
    optimization matches a one-process run. Every process transforms the whole global batch with the same
    generator and keeps its part: an image's augmentation does not depend on the process count, and all
    processes hold one generator state (a mid-task checkpoint's resumes every rank). Evaluation:
    ``for_process`` gives a strided shard, no padding.
    """

    on_device = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch_size: int,
                 transform: Callable[..., torch.Tensor], *,
                 shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, sizes: Optional[torch.Tensor] = None,
                 fixed_draws: Optional[int] = None):
        self.images, self.labels, self.indices, self.sizes = images, labels, indices, sizes
        self.batch_size, self.transform, self.shuffle = batch_size, transform, shuffle
        self.fixed_draws = fixed_draws
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0
        self.augment_generator = torch.Generator(device=images.device).manual_seed(seed * 7919)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    @property
    def generator(self) -> torch.Generator:
        """The augmentation generator (saved and restored by --checkpoint-every, like a DataLoader's)."""
        return self.augment_generator

    def set_epoch(self, epoch: int) -> None:
        """Continue at ``epoch``: the shuffle of each epoch depends on (seed, epoch) only."""
        self.epoch = epoch

    def for_process(self, rank: int, world: int) -> "DeviceLoader":
        if self.fixed_draws is not None:  # whole global batches are transformed, each process keeps its rows
            return DeviceLoader(self.images, self.labels, self.indices, self.batch_size, self.transform,
                                shuffle=False, rank=rank, world=world, sizes=self.sizes,
                                fixed_draws=self.fixed_draws)
        return DeviceLoader(self.images, self.labels, self.indices[rank::world], self.batch_size, self.transform,
                            shuffle=False, seed=self.seed, rank=rank, world=world, sizes=self.sizes)

    def _batches(self):
        if not self.shuffle:
            yield from self.indices.split(self.batch_size)
            return
        generator = torch.Generator(device=self.indices.device).manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = self.indices[torch.randperm(len(self.indices), generator=generator, device=self.indices.device)]
        for batch in order.split(self.batch_size):
            if self.world > 1:  # the whole global batch; __iter__ keeps this process's part
                batch = torch.cat([batch, order[:-len(batch) % self.world]])
            yield batch

    def _transformed(self, batch: torch.Tensor, generator: Optional[torch.Generator]):
        if self.sizes is None:
            return self.transform(self.images[batch], generator), self.labels[batch]
        # images of different true sizes in one canvas (decoded.py, bounded geometry)
        return self.transform(self.images[batch], generator, self.sizes[batch]), self.labels[batch]

    def __iter__(self):
        if self.fixed_draws is not None:
            yield from self._fixed_draw_batches()
            return
        generator = self.augment_generator if self.shuffle else None
        for batch in self._batches():
            images, labels = self._transformed(batch, generator)
            if self.shuffle and self.world > 1:
                images, labels = images.chunk(self.world)[self.rank], labels.chunk(self.world)[self.rank]
            yield images, labels

    def _fixed_draw_batches(self):
        """Every global batch of the fixed order transformed with draws from the ``fixed_draws`` seed alone (a fresh
        generator per pass), then this process's rows of it: each pass, under any process layout, sees the same
        views, and the processes' rows together are every image once."""
        generator = torch.Generator(device=self.images.device).manual_seed(self.fixed_draws)
        for batch in self.indices.split(self.batch_size):
            images, labels = self._transformed(batch, generator)
            if self.world > 1:
                images, labels = images[self.rank::self.world], labels[self.rank::self.world]
            if len(labels):
                yield images, labels


def default_workers(workers: Optional[int], data) -> int:
    """``--workers`` when given, else none for generated tensors and the node's cores shared among its
    processes for images (distributed.workers_per_process)."""
    return workers if workers is not None else workers_per_process(data.transform_style == "tensor")


class PassLoaders:
    """The loaders of one seed's passes. ``remap[c]`` is the class-order position of dataset class ``c``."""

    @classmethod
    def for_run(cls, data: DatasetSplits, class_order: Sequence[int], cfg, accelerator,
                batch_size: Optional[int] = None) -> "PassLoaders":
        """The loaders of a run (training, `slca eval`) from its RunConfig: ``cfg.device_augment`` already
        resolved (resolve_device_augment), ``batch_size`` overriding the run's for scoring only."""
        return cls(data, class_remap(class_order), batch_size=batch_size or cfg.batch_size, image_size=cfg.image_size, mean=cfg.mean,
                   std=cfg.std, device=accelerator.device, workers=default_workers(cfg.workers, data),
                   on_device=cfg.device_augment, rank=accelerator.process_index, world=accelerator.num_processes)

    def __init__(self, data: DatasetSplits, remap: Sequence[int], *, batch_size: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, workers: int,
                 on_device: bool, rank: int = 0, world: int = 1, log: Optional[Callable[[str], None]] = None):
        self.data, self.remap, self.batch_size = data, list(remap), batch_size
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.device, self.workers, self.on_device = device, workers, on_device
        self.rank, self.world = rank, world
        # Statistics and test passes keep no activations for a backward pass: twice the batch, same results.
        self.eval_batch_size = batch_size * INFERENCE_BATCH_FACTOR
        self.pin = device.type == "cuda"
        self.log = log or _to_stderr
        self._stores = {}

    def _store(self, pass_name: str):
        """(uint8 images, class-order labels, true sizes or None) a pass reads, on the device, on first use: a
        CIFAR split's originals (NCHW), or a JPEG split's decoded cache (NHWC, decoded.py)."""
        split_name, geometry = pass_geometries(self.data.transform_style, self.image_size)[pass_name]
        if (split_name, geometry) not in self._stores:
            split = getattr(self.data, split_name)
            sizes = None
            if geometry is None:
                images = uint8_images(split, self.workers).to(self.device)
            else:
                cache = build_cache(split, geometry, self.workers, self.log if self.rank == 0 else None)
                images = _upload(torch.from_numpy(cache.images), self.device)
                if geometry.kind == "bounded":
                    sizes = torch.from_numpy(cache.sizes).to(self.device)
            remap = torch.tensor(self.remap, dtype=torch.long)
            labels = remap[torch.tensor(split.labels, dtype=torch.long)].to(self.device)
            self._stores[(split_name, geometry)] = (images, labels, sizes)
        return self._stores[(split_name, geometry)]

    def _device_loader(self, pass_name: str, classes: Sequence[int], seed: int = 0, fixed_draws: bool = False):
        images, labels, sizes = self._store(pass_name)
        wanted = torch.zeros(len(self.remap), dtype=torch.bool, device=self.device)
        wanted[torch.tensor(list(classes), dtype=torch.long, device=self.device)] = True
        indices = torch.nonzero(wanted[labels]).flatten()
        size, mean, std, style = self.image_size, self.mean, self.std, self.data.transform_style
        if pass_name == "train":
            if style == "fine-grained":
                transform = lambda x, g: fine_grained_train_batch(x, size, mean, std, g)  # noqa: E731
            elif style == "crop":
                transform = lambda x, g, hw: crop_train_batch(x, hw, size, mean, std, g)  # noqa: E731
            else:
                transform = lambda x, g: cifar_train_batch(x, size, mean, std, g)  # noqa: E731
            if fixed_draws:  # one process's rows are chosen by for_process
                return DeviceLoader(images, labels, indices, self.batch_size, transform, shuffle=False, sizes=sizes,
                                    fixed_draws=seed)
            return DeviceLoader(images, labels, indices, self.batch_size, transform, shuffle=True, seed=seed,
                                rank=self.rank, world=self.world, sizes=sizes)
        if style == "cifar":
            transform = lambda x, g: eval_batch(x, size, mean, std)  # noqa: E731
        else:
            transform = lambda x, g: cached_eval_batch(x, mean, std)  # noqa: E731
        return DeviceLoader(images, labels, indices, self.eval_batch_size, transform, shuffle=False)

    def _subset(self, split, classes, transform_index: int) -> Dataset:
        """The images of ``classes`` under the train (0) or test (1) transform; PIL datasets give uint8 tensors."""
        if self.data.transform_style in PIL_STYLES:
            transform = build_transforms(self.data.transform_style, self.image_size, self.mean, self.std,
                                         uint8=True)[transform_index]
        else:
            transform = (self.data.train.transform, self.data.test.transform)[transform_index]
        return RemappedSubset(split, self.remap, classes, transform=transform)

    def _finished(self, loader):
        """PIL datasets send uint8 batches, normalized on the device by ``finish_batch``."""
        if self.data.transform_style in PIL_STYLES:
            loader.finish_batch = DeviceNormalize(self.mean, self.std)
        return loader

    def _host(self, split, classes, transform_index: int, batch_size: int, shuffle: bool, seed: int = 0):
        return self._finished(host_loader(self._subset(split, classes, transform_index), batch_size, shuffle, seed,
                                          self.workers, self.pin))

    def train(self, classes: Sequence[int], seed: int):
        """Training images of ``classes`` under the train transform, shuffled from ``seed``."""
        if self.on_device:
            return self._device_loader("train", classes, seed)
        return self._host(self.data.train, classes, 0, self.batch_size, True, seed)

    def train_views(self, classes: Sequence[int], seed: int):
        """Training images of ``classes`` under the train transform with the draws of ``seed`` alone: every pass
        over it (and its shards under any number of processes) sees the same images in the same order with the
        same crops and flips, as drift compensation pairs them before and after stage 1. On the host these are the
        images of the first epoch of ``train(classes, seed)``."""
        if self.on_device:
            return self._device_loader("train", classes, seed, fixed_draws=True)
        dataset = self._subset(self.data.train, classes, 0)
        keys = SeededShuffle(len(dataset), torch.Generator().manual_seed(seed))
        return self._finished(DataLoader(FixedDraws(dataset, keys), batch_size=self.batch_size, shuffle=False,
                                         num_workers=self.workers, pin_memory=self.pin,
                                         worker_init_fn=worker_init if self.workers > 0 else None))

    def statistics(self, classes: Sequence[int]):
        """Training images of ``classes`` under the test transform (class statistics)."""
        if self.on_device:
            return self._device_loader("statistics", classes)
        return self._host(self.data.train, classes, 1, self.eval_batch_size, False)

    def test(self, classes: Sequence[int]):
        """Test images of ``classes`` under the test transform."""
        if self.on_device:
            return self._device_loader("test", classes)
        return self._host(self.data.test, classes, 1, self.eval_batch_size, False)


def _upload(images: torch.Tensor, device: torch.device, chunk: int = 1024) -> torch.Tensor:
    """A (memory-mapped) host tensor on ``device``: a CPU device reads the mapping itself (no copy); a GPU gets
    it in chunks, so no second full-size host buffer is ever made."""
    if device.type == "cpu":
        return images
    out = torch.empty(images.shape, dtype=images.dtype, device=device)
    for start in range(0, len(images), chunk):
        out[start:start + chunk].copy_(images[start:start + chunk])
    return out
