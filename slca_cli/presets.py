"""The paper's hyperparameters per (dataset, backbone family, method), and the frozen RunConfig they resolve to."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .errors import SlcaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)

# Spec sections 2, 4 and 5. `mean`/`std` None means "the backbone's own normalization".
DATASET_PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar100": dict(init_classes=10, increment=10, epochs=20, lr_drop_epoch=18, tau=0.1,
                     mean=CIFAR_MEAN, std=CIFAR_STD),
    "imagenet-r": dict(init_classes=20, increment=20, epochs=50, lr_drop_epoch=40, tau=0.1,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "cub200": dict(init_classes=20, increment=20, epochs=50, lr_drop_epoch=40, tau=0.1,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "cars196": dict(init_classes=20, increment=20, epochs=50, lr_drop_epoch=40, tau=0.05,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "folder": dict(tasks=10, epochs=20, lr_drop_epoch=18, tau=0.1, mean=None, std=None),
    "synthetic": dict(tasks=5, epochs=3, lr_drop_epoch=None, tau=0.1, mean=None, std=None),
    "digits": dict(tasks=5, epochs=5, lr_drop_epoch=4, tau=0.1, mean=None, std=None),
}

# Self-supervised backbones train longer (spec section 4: MoCo v3 90 epochs, drop after 80). The authors publish
# no recipe for iBOT and DINO; they are self-supervised ViT-B/16s like MoCo v3, so they get its schedule.
FAMILY_EPOCHS: Dict[str, Tuple[int, int]] = {"mocov3": (90, 80), "ibot": (90, 80), "dino": (90, 80)}

# The allowed values of every setting that takes a name; checked once, in check_choice.
CHOICES: Dict[str, Tuple[str, ...]] = {
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "optimizer": ("sgd", "adam"),
    "schedule": ("step", "cosine", "constant"),
    "mean_scaling": ("task", "authors", "off"),
    "covariance": ("ridge", "shrinkage"),
    "align_mode": ("sampled", "closed-form"),
    "drift_compensation": ("off", "linear"),
}


def check_choice(name: str, value: str) -> str:
    if value not in CHOICES[name]:
        raise SlcaError(f"--{name.replace('_', '-')} must be one of {', '.join(CHOICES[name])}, got '{value}'")
    return value


def execution(default: Any = None) -> Any:
    """A RunConfig field that says how or where a run executes, not what it computes: outside the run's identity
    (a --resume may change it; the report groups across it)."""
    return field(default=default, metadata={"execution": True})


@dataclass(frozen=True)
class RunConfig:
    """Every value that decides a run's numbers, and how it ran; written to config.json and state.json.

    The defaults here are the paper's recipe (spec sections 4-5); dataset, backbone and method presets change
    some of them (resolve_config). Method settings: CONTRIBUTING.md, "Methods".
    """

    dataset: str
    backbone: str
    method: str
    num_classes: int
    task_sizes: Tuple[int, ...]
    epochs: int = 20
    lr_drop_epoch: Optional[int] = 18
    batch_size: int = 128
    lr_backbone: float = 1e-4
    lr_head: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    align: bool = False
    ca_epochs: int = 5
    ca_samples: int = 256
    ca_lr: float = 0.01
    ca_batch_size: int = 256
    tau: float = 0.1
    logit_norm: bool = True
    mean_scaling: str = "task"
    fresh_norm: bool = True
    restore_stage1_heads: bool = True
    cov_ridge: float = 1e-4
    image_size: int = 224
    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    train_per_class: Optional[int] = None
    test_per_class: Optional[int] = None
    freeze_bn: bool = True
    optimizer: str = "sgd"
    schedule: str = "step"
    min_lr: float = 0.0
    grad_clip: Optional[float] = None
    sce_a: float = 1.0
    sce_b: float = 0.0
    lora_rank: int = 0
    lora_scale: float = 0.8
    lr_lora: Optional[float] = None
    lr_lora_first: Optional[float] = None
    sample_shrink: float = 0.0
    prompt_pool: int = 10
    prompt_length: int = 5
    prompt_top_k: int = 5
    g_prompt_length: int = 5
    matching_weight: float = 0.1
    covariance: str = "ridge"  # class covariances: + cov_ridge I (paper) or OAS shrinkage (closed_form.py)
    align_mode: str = "sampled"  # classifier alignment: Gaussian samples (paper) or LDA heads in closed form
    drift_compensation: str = "off"  # move the stored Gaussians with the backbone's drift (drift.py)
    drift_views: int = 8  # train-transform passes (besides the test-transform one) the drift is fitted on
    drift_ridge: float = 1.0  # ridge of the drift fit, relative to the mean eigenvalue of the features' Gram
    ranpac_dim: int = 10000
    ranpac_adapt: bool = False
    # Where the inputs are (the data's file-list checksum and the weights' sha256 are checked separately).
    data_root: Optional[str] = execution()
    weights: Optional[str] = execution()
    # How the run executes: --resume may change these (e.g. --precision fp32 after a NaN).
    precision: str = execution("auto")
    workers: Optional[int] = execution()
    compile: bool = execution(False)
    device_augment: Optional[bool] = execution()  # None: on where the dataset supports it on a GPU
    checkpoint_every: int = execution(0)
    skip_bad_images: bool = execution(False)  # a skipped image changes the data checksum, which is checked
    overridden: Tuple[str, ...] = execution(())  # the settings given as flags (the rest are presets)

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise SlcaError(f"the run's config has unknown fields {sorted(unknown)}; it was written by "
                            f"another version of slca")
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**values)

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


# Fields whose difference makes a folder another experiment (refused on --resume, separate rows in reports).
IDENTITY_FIELDS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig)
                                         if not f.metadata.get("execution"))
SETTINGS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig))


def identity(config: Dict[str, Any]) -> Dict[str, Any]:
    """The identity fields of a stored config (None where an older version did not write one)."""
    return {k: config.get(k) for k in IDENTITY_FIELDS}


def _defaults() -> Dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}


DEFAULTS: Dict[str, Any] = _defaults()  # read-only: what recipes built without a RunConfig start from


def resolve_config(dataset: str, backbone: str, method: str, *, backbone_family: str,
                   backbone_image_size: int, backbone_mean: Tuple[float, ...], backbone_std: Tuple[float, ...],
                   num_classes: int, task_sizes: List[int], overrides: Dict[str, Any],
                   backbone_defaults: Optional[Dict[str, Any]] = None) -> RunConfig:
    """RunConfig's defaults, then the dataset's and backbone family's schedule, the method's catalog presets, the
    backbone's own defaults (e.g. no fresh LayerNorm for a CNN), then every flag that was given on top."""
    from .methods.catalog import method_spec
    spec = method_spec(method)
    given = {k: v for k, v in overrides.items() if v is not None}
    ds = DATASET_PRESETS.get(dataset, DATASET_PRESETS["folder"])
    epochs, drop = ds["epochs"], ds["lr_drop_epoch"]
    if backbone_family in FAMILY_EPOCHS and dataset not in ("synthetic",):
        epochs, drop = FAMILY_EPOCHS[backbone_family]
    if "epochs" in given and "lr_drop_epoch" not in given and drop is not None:
        # Keep the drop at the same fraction of training when only the epoch count changes.
        drop = max(1, round(given["epochs"] * drop / epochs)) if given["epochs"] > 1 else None
    values = dict(DEFAULTS)
    values.update(dataset=dataset, backbone=backbone, method=method, num_classes=num_classes,
                  task_sizes=tuple(task_sizes), epochs=epochs, lr_drop_epoch=drop, tau=ds["tau"],
                  image_size=backbone_image_size, mean=tuple(ds["mean"] or backbone_mean),
                  std=tuple(ds["std"] or backbone_std))
    values.update(spec.preset(dataset))
    unknown = set(given) - set(values)
    if unknown:
        raise SlcaError(f"unknown setting(s) {sorted(unknown)}")
    unknown = set(backbone_defaults or {}) - set(values)
    if unknown:
        raise SlcaError(f"backbone {backbone} sets unknown default(s) {sorted(unknown)}; fix its BackboneSpec")
    values.update(backbone_defaults or {})
    values.update(given)
    values["overridden"] = tuple(sorted(k for k in given if k not in ("data_root", "weights")))
    cfg = RunConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})
    _check(cfg)
    return cfg


def _check(cfg: RunConfig) -> None:
    """Every numeric setting within its bounds (validation.BOUNDS, for flags and presets alike), every named one a
    known choice, and the rules that tie settings together."""
    from .validation import check_bounds
    check_bounds(cfg.to_dict())
    for name in CHOICES:
        check_choice(name, getattr(cfg, name))
    if cfg.drift_compensation != "off" and not cfg.align:
        raise SlcaError(f"--drift-compensation moves the class statistics that classifier alignment uses; --method "
                        f"{cfg.method} does not align them: use --method slca (or slca++), or drop the flag")
    if cfg.prompt_top_k > cfg.prompt_pool:
        raise SlcaError(f"--prompt-top-k {cfg.prompt_top_k} is larger than --prompt-pool {cfg.prompt_pool}; "
                        f"select at most as many prompts as the pool holds")
    if cfg.sce_a + cfg.sce_b == 0:
        raise SlcaError(f"--sce-a and --sce-b must be >= 0 and not both 0, got {cfg.sce_a} and {cfg.sce_b}")


def task_split_request(dataset: str, tasks: Optional[int], init_classes: Optional[int],
                       increment: Optional[int]) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(tasks, init, increment) to split by: the flags when any is given, else the dataset's preset."""
    if tasks is not None or init_classes is not None or increment is not None:
        return tasks, init_classes, increment
    ds = DATASET_PRESETS.get(dataset, DATASET_PRESETS["folder"])
    return ds.get("tasks"), ds.get("init_classes"), ds.get("increment")
