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

METHOD_PRESETS: Dict[str, Dict[str, Any]] = {
    "slca": dict(lr_backbone=1e-4, lr_head=1e-2, align=True),
    "sl": dict(lr_backbone=1e-4, lr_head=1e-2, align=False),
    "seqft": dict(lr_backbone=1e-2, lr_head=1e-2, align=False),
    # The upper bound: every class in one task, the slow learner's recipe.
    "joint": dict(lr_backbone=1e-4, lr_head=1e-2, align=False),
    # Frozen pre-trained backbone (its own final norm), heads only.
    "linear": dict(lr_backbone=0.0, lr_head=1e-2, align=False, fresh_norm=False),
    # L2P (Wang et al., CVPR 2022) and DualPrompt (Wang et al., ECCV 2022), see CONTRIBUTING.md: frozen ViT,
    # Adam at 0.03 x 128/256 with a constant schedule, no weight decay, gradient norm clipped at 1, 5 epochs
    # on CIFAR-100. lr_backbone is the prompts' and keys' learning rate.
    "l2p": dict(lr_backbone=0.015, lr_head=0.015, align=False, fresh_norm=False, optimizer="adam",
                schedule="constant", weight_decay=0.0, grad_clip=1.0, epochs=5, lr_drop_epoch=None,
                prompt_pool=10, prompt_length=5, prompt_top_k=5, matching_weight=0.1),
    "dualprompt": dict(lr_backbone=0.015, lr_head=0.015, align=False, fresh_norm=False, optimizer="adam",
                       schedule="constant", weight_decay=0.0, grad_clip=1.0, epochs=5, lr_drop_epoch=None,
                       prompt_pool=10, prompt_length=5, prompt_top_k=1, g_prompt_length=5, matching_weight=1.0),
    # SLCA++ (arXiv 2408.08295; spec section 9): LoRA + norms + biases + CLS token, symmetric cross-entropy,
    # cosine schedule down to 1e-4, alignment with shrunk old-class samples instead of shrunk means.
    "slca++": dict(lr_backbone=1e-3, lr_head=1e-2, lr_lora=1e-3, lr_lora_first=5e-3, align=True, schedule="cosine",
                   min_lr=1e-4, lr_drop_epoch=None, sce_a=1.0, sce_b=0.1, lora_rank=4, lora_scale=0.8,
                   mean_scaling="off", sample_shrink=0.02),
    # Training-free baselines (methods/simplecil.py, methods/ranpac.py): the frozen pre-trained backbone with its
    # own final norm; RanPAC's optional first-task adaptation (--ranpac-adapt) uses the slow learner's rates.
    "simplecil": dict(lr_backbone=0.0, lr_head=1e-2, align=False, fresh_norm=False),
    "ranpac": dict(lr_backbone=1e-4, lr_head=1e-2, align=False, fresh_norm=False),
}

# Method presets that differ per dataset (applied after METHOD_PRESETS).
_PROMPTS_SMALL_DATA = dict(epochs=50, lr_backbone=0.0025, lr_head=0.0025)  # DualPrompt's ImageNet-R: 0.005 x 128/256
_SLCAPP_HALF_SCE = dict(sce_a=0.5, sce_b=0.5, weight_decay=0.0)
METHOD_DATASET_PRESETS: Dict[Tuple[str, str], Dict[str, Any]] = {
    **{("l2p", d): _PROMPTS_SMALL_DATA for d in ("imagenet-r", "cub200", "cars196")},
    **{("dualprompt", d): dict(_PROMPTS_SMALL_DATA, prompt_length=20) for d in ("imagenet-r", "cub200", "cars196")},
    ("slca++", "imagenet-r"): _SLCAPP_HALF_SCE,
    ("slca++", "cars196"): _SLCAPP_HALF_SCE,
}

# Settings added for the methods beyond SLCA; their defaults leave seqft/sl/slca unchanged.
METHOD_SETTINGS: Dict[str, Any] = dict(
    optimizer="sgd", schedule="step", min_lr=0.0, grad_clip=None, sce_a=1.0, sce_b=0.0, lora_rank=0,
    lora_scale=0.8, lr_lora=None, lr_lora_first=None, sample_shrink=0.0, prompt_pool=10, prompt_length=5,
    prompt_top_k=5, g_prompt_length=5, matching_weight=0.1, covariance="ridge", align_mode="sampled",
    ranpac_dim=10000, ranpac_adapt=False)
COVARIANCE = ("ridge", "shrinkage")
ALIGN_MODES = ("sampled", "closed-form")

MEAN_SCALING = ("task", "authors", "off")


@dataclass(frozen=True)
class RunConfig:
    """Every value that decides a run's numbers; written to config.json and state.json."""

    dataset: str
    backbone: str
    method: str
    data_root: Optional[str]
    weights: Optional[str]
    num_classes: int
    task_sizes: Tuple[int, ...]
    epochs: int
    lr_drop_epoch: Optional[int]
    batch_size: int
    lr_backbone: float
    lr_head: float
    momentum: float
    weight_decay: float
    align: bool
    ca_epochs: int
    ca_samples: int
    ca_lr: float
    ca_batch_size: int
    tau: float
    logit_norm: bool
    mean_scaling: str
    fresh_norm: bool
    restore_stage1_heads: bool
    cov_ridge: float
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    train_per_class: Optional[int]
    test_per_class: Optional[int]
    precision: str
    workers: Optional[int]
    freeze_bn: bool = True
    skip_bad_images: bool = False  # leave unreadable images out (listed in the run folder) instead of stopping
    overridden: Tuple[str, ...] = field(default=())
    # How the run executes, not what it computes (outside IDENTITY_FIELDS): torch.compile of the backbone, and
    # the CIFAR transforms on the training device (None: on for CIFAR on a GPU; the runner records the choice).
    compile: bool = False
    device_augment: Optional[bool] = None
    # Method settings (defaults in METHOD_SETTINGS; what each means: CONTRIBUTING.md, "Methods").
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
    ranpac_dim: int = 10000
    ranpac_adapt: bool = False

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


# Fields whose difference makes a folder another experiment (checked on --resume).
IDENTITY_FIELDS = ("dataset", "backbone", "method", "num_classes", "task_sizes", "epochs", "lr_drop_epoch",
                   "lr_backbone", "lr_head", "align", "ca_epochs", "ca_samples", "tau", "logit_norm",
                   "mean_scaling", "fresh_norm", "restore_stage1_heads", "image_size", "batch_size",
                   "train_per_class", "test_per_class", "freeze_bn", *METHOD_SETTINGS)


def resolve_config(dataset: str, backbone: str, method: str, *, backbone_family: str,
                   backbone_image_size: int, backbone_mean: Tuple[float, ...], backbone_std: Tuple[float, ...],
                   num_classes: int, task_sizes: List[int], overrides: Dict[str, Any],
                   backbone_defaults: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Preset values for (dataset, backbone family, method), then the backbone's own defaults (e.g. no fresh
    LayerNorm for a CNN), then every flag that was given on top."""
    if method not in METHOD_PRESETS:
        raise SlcaError(f"unknown method '{method}'; known: {', '.join(METHOD_PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    ds = DATASET_PRESETS.get(dataset, DATASET_PRESETS["folder"])
    epochs, drop = ds["epochs"], ds["lr_drop_epoch"]
    if backbone_family in FAMILY_EPOCHS and dataset not in ("synthetic",):
        epochs, drop = FAMILY_EPOCHS[backbone_family]
    if "epochs" in given and "lr_drop_epoch" not in given and drop is not None:
        # Keep the drop at the same fraction of training when only the epoch count changes.
        drop = max(1, round(given["epochs"] * drop / epochs)) if given["epochs"] > 1 else None
    values: Dict[str, Any] = dict(
        dataset=dataset, backbone=backbone, method=method, data_root=None, weights=None,
        num_classes=num_classes, task_sizes=tuple(task_sizes), epochs=epochs, lr_drop_epoch=drop,
        batch_size=128, momentum=0.9, weight_decay=5e-4, ca_epochs=5, ca_samples=256, ca_lr=0.01,
        ca_batch_size=256, tau=ds["tau"], logit_norm=True, mean_scaling="task", fresh_norm=True,
        restore_stage1_heads=True, cov_ridge=1e-4, image_size=backbone_image_size,
        mean=tuple(ds["mean"] or backbone_mean), std=tuple(ds["std"] or backbone_std),
        train_per_class=None, test_per_class=None, precision="auto", workers=None, skip_bad_images=False,
        freeze_bn=True, compile=False, device_augment=None,
        **METHOD_SETTINGS,
    )
    values.update(METHOD_PRESETS[method])
    values.update(METHOD_DATASET_PRESETS.get((method, dataset), {}))
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
    positive = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, image_size=cfg.image_size,
                    ca_samples=cfg.ca_samples, ca_batch_size=cfg.ca_batch_size)
    for name, value in positive.items():
        if value < 1:
            raise SlcaError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if cfg.ca_epochs < 0:
        raise SlcaError(f"--ca-epochs must be 0 or more, got {cfg.ca_epochs}")
    if cfg.tau <= 0:
        raise SlcaError(f"--tau must be positive, got {cfg.tau}")
    if cfg.mean_scaling not in MEAN_SCALING:
        raise SlcaError(f"--mean-scaling must be one of {', '.join(MEAN_SCALING)}, got '{cfg.mean_scaling}'")
    if cfg.lr_backbone < 0 or cfg.lr_head <= 0:
        raise SlcaError("--lr-backbone must be >= 0 and --lr-head > 0")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise SlcaError(f"--precision must be auto, fp32, bf16 or fp16, got '{cfg.precision}'")
    for name in ("train_per_class", "test_per_class"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise SlcaError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    _check_method_settings(cfg)


def _check_method_settings(cfg: RunConfig) -> None:
    if cfg.optimizer not in ("sgd", "adam"):
        raise SlcaError(f"--optimizer must be sgd or adam, got '{cfg.optimizer}'")
    if cfg.schedule not in ("step", "cosine", "constant"):
        raise SlcaError(f"--schedule must be step, cosine or constant, got '{cfg.schedule}'")
    for name in ("prompt_pool", "prompt_length", "prompt_top_k", "g_prompt_length"):
        if getattr(cfg, name) < 1:
            raise SlcaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.prompt_top_k > cfg.prompt_pool:
        raise SlcaError(f"--prompt-top-k {cfg.prompt_top_k} is larger than --prompt-pool {cfg.prompt_pool}; "
                        f"select at most as many prompts as the pool holds")
    if cfg.lora_rank < 0:
        raise SlcaError(f"--lora-rank must be 0 (no LoRA) or more, got {cfg.lora_rank}")
    if cfg.sce_a < 0 or cfg.sce_b < 0 or cfg.sce_a + cfg.sce_b == 0:
        raise SlcaError(f"--sce-a and --sce-b must be >= 0 and not both 0, got {cfg.sce_a} and {cfg.sce_b}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise SlcaError(f"--grad-clip must be positive, got {cfg.grad_clip}")
    if cfg.covariance not in COVARIANCE:
        raise SlcaError(f"--covariance must be one of {', '.join(COVARIANCE)}, got '{cfg.covariance}'")
    if cfg.align_mode not in ALIGN_MODES:
        raise SlcaError(f"--align-mode must be one of {', '.join(ALIGN_MODES)}, got '{cfg.align_mode}'")
    if cfg.ranpac_dim < 1:
        raise SlcaError(f"--ranpac-dim must be at least 1, got {cfg.ranpac_dim}")
    if cfg.matching_weight < 0 or cfg.min_lr < 0 or cfg.sample_shrink < 0 or cfg.weight_decay < 0:
        raise SlcaError("--matching-weight, --min-lr, --sample-shrink and --weight-decay must be >= 0")


def task_split_request(dataset: str, tasks: Optional[int], init_classes: Optional[int],
                       increment: Optional[int]) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(tasks, init, increment) to split by: the flags when any is given, else the dataset's preset."""
    if tasks is not None or init_classes is not None or increment is not None:
        return tasks, init_classes, increment
    ds = DATASET_PRESETS.get(dataset, DATASET_PRESETS["folder"])
    return ds.get("tasks"), ds.get("init_classes"), ds.get("increment")
