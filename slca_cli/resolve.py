"""From flags to a run: the dataset loaded, the tasks split, the presets filled in, the method's checks passed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .backbones import BackboneSpec, get_backbone

from .data import DatasetSplits, attach_transforms, load_dataset
from .data.subset import canonical_classes
from .errors import SlcaError
from .methods import get_method
from .presets import RunConfig, resolve_config, task_split_request
from .protocol import resolve_task_sizes


def load_data_for(cfg: RunConfig, data_root: Optional[str]) -> DatasetSplits:
    """The dataset of a resolved run, with its transforms (``data_root``: where it is now)."""
    # Generated data with --classes: generated up to the largest id (num_classes is then the run's N).
    generated = cfg.num_classes if cfg.dataset == "synthetic" and cfg.classes is None else None
    data = load_dataset(cfg.dataset, data_root, generated, cfg.train_per_class, cfg.test_per_class,
                        cfg.skip_bad_images, cfg.classes)
    attach_transforms(data, cfg.image_size, cfg.mean, cfg.std)
    return data


def resolve_run(dataset: str, backbone: str, method: str, flags: Dict[str, Any]) -> Tuple[RunConfig, DatasetSplits]:
    """Flags -> (RunConfig, dataset with transforms): load the data, split the tasks, fill in the presets."""
    spec = get_backbone(backbone)
    flags = dict(flags)
    num_classes = flags.pop("num_classes", None)
    if flags.get("classes") is not None:  # one spelling per set of classes: part of the run's identity
        flags["classes"] = canonical_classes(flags["classes"])
    split = task_split_request(dataset, flags.pop("tasks", None), flags.pop("init_classes", None),
                               flags.pop("increment", None))
    from .data.prepare import fetch_if_absent
    fetch_if_absent(dataset, flags.get("data_root"))
    data = load_dataset(dataset, flags.get("data_root"), num_classes, flags.get("train_per_class"),
                        flags.get("test_per_class"), bool(flags.get("skip_bad_images")), flags.get("classes"))
    policy = get_method(method)
    sizes = policy.task_sizes(resolve_task_sizes(data.num_classes, *split), data.num_classes)
    cfg = resolve_config(dataset, spec.name, method, backbone_family=spec.family,
                         backbone_image_size=spec.image_size, backbone_mean=spec.mean, backbone_std=spec.std,
                         num_classes=data.num_classes, task_sizes=sizes, overrides=flags,
                         backbone_defaults=dict(spec.defaults))
    cfg = policy.finalize_config(cfg)
    probed: list = []

    def probe():  # built at most once, and only when a check needs it
        if not probed:
            probed.append(_probe_backbone(spec))
        return probed[0]
    policy.check_backbone(spec.name, probe)
    if cfg.image_size != spec.image_size:
        check_image_size(spec.name, probe(), cfg.image_size)
    if dataset == "synthetic":
        cfg = cfg.replace(train_per_class=len(data.train) // data.num_classes,
                          test_per_class=len(data.test) // data.num_classes)
    if cfg.weights:
        cfg = cfg.replace(weights=str(Path(cfg.weights).expanduser().resolve()))
    if cfg.data_root:  # absolute, so that `slca eval` finds the data from any folder
        cfg = cfg.replace(data_root=str(Path(cfg.data_root).expanduser().resolve()))
    attach_transforms(data, cfg.image_size, cfg.mean, cfg.std)
    return cfg, data


def check_image_size(name: str, probe, image_size: int) -> None:
    """A ViT built for one input size (a fixed position-embedding grid, timm's strict_img_size) takes no other."""
    patch_embed = getattr(probe, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None)
    if fixed is None or not getattr(patch_embed, "strict_img_size", False) or getattr(probe, "dynamic_img_size",
                                                                                       False):
        return
    if tuple(fixed) != (image_size, image_size):
        raise SlcaError(f"--image-size {image_size} does not fit backbone {name}: it takes {fixed[0]} x {fixed[1]} px "
                        f"inputs only; leave --image-size out or pass {fixed[0]}")


def _probe_backbone(spec: BackboneSpec):
    """The backbone's modules without weights (meta device: no memory, no download), for method checks."""
    try:
        with torch.device("meta"):
            return spec.build(None, False)
    except Exception:  # a builder that cannot run on the meta device: the check happens when the model is built
        return None
