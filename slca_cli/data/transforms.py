"""Train and test transforms of the protocol (spec section 2), scaled to any image size."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC


def _test_resize(image_size: int) -> int:
    """Resize(256) + CenterCrop(224) at 224 px; the same ratio at other sizes."""
    return round(image_size * 256 / 224)


def build_transforms(style: str, image_size: int, mean: Sequence[float],
                     std: Sequence[float], uint8: bool = False) -> Tuple[Callable, Callable]:
    """(train, test) transforms for PIL images. ``style``: cifar, crop (ImageNet-R, folder),
    fine-grained or digits. ``uint8``: end in a uint8 CHW tensor instead, normalized later on the device
    (loaders.DeviceNormalize), a quarter of the bytes through pinned memory."""
    normalize = [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(mean, std)]
    if style == "cifar":
        train = [T.RandomResizedCrop(image_size, interpolation=BICUBIC), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=63 / 255)]
    elif style == "fine-grained":
        big = round(image_size * 300 / 224)
        train = [T.Resize((big, big), interpolation=BICUBIC), T.RandomCrop(image_size), T.RandomHorizontalFlip()]
    elif style == "digits":  # small shifts only: flips and crops of a digit change or cut it
        train = [T.Resize(_test_resize(image_size), interpolation=BICUBIC), T.RandomCrop(image_size)]
    elif style == "crop":
        train = [T.RandomResizedCrop(image_size, interpolation=BICUBIC), T.RandomHorizontalFlip()]
    else:
        raise ValueError(f"unknown transform style {style!r}")
    test = [T.Resize(_test_resize(image_size), interpolation=BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(train + normalize), T.Compose(test + normalize)


def build_test_transform(style: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                         uint8: bool = False) -> Callable:
    """The test transform of ``style`` for PIL images (``slca predict`` on new files). Generated (``tensor``)
    data has no files: its images are resized to the run's size and normalized as its test transform does."""
    if style == "tensor":
        steps = [T.Resize((image_size, image_size), interpolation=BICUBIC)]
        return T.Compose(steps + ([T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(mean, std)]))
    return build_transforms(style, image_size, mean, std, uint8)[1]


def test_geometry(style: str, image_size: int) -> dict:
    """Resize (shorter side, bicubic) and centre crop of the test transform, for an exported model."""
    resize = image_size if style == "tensor" else _test_resize(image_size)
    return {"resize": resize, "crop": image_size, "interpolation": "bicubic"}


def build_tensor_transforms(image_size: int, native_size: int, mean: Sequence[float],
                            std: Sequence[float]) -> Tuple[Callable, Callable]:
    """(train, test) transforms for float image tensors in [0, 1] (generated data)."""
    steps = [T.Resize(image_size, interpolation=BICUBIC, antialias=True)] if image_size != native_size else []
    normalize = T.Normalize(mean, std)
    return (T.Compose(steps + [T.RandomHorizontalFlip(), normalize]),
            T.Compose(steps + [normalize]))

