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
    "aper_variant": ("finetune", "adapter", "ssf", "vpt"),
}


def check_choice(name: str, value: str) -> str:
    if value not in CHOICES[name]:
        raise SlcaError(f"--{name.replace('_', '-')} must be one of {', '.join(CHOICES[name])}, got '{value}'")
    return value


# The --help panels of `slca train`, in the order they are shown.
DATA, BACKBONE, METHOD, STAGE1, ALIGNMENT, RUN, SPEED = (
    "Data", "Backbone", "Method-specific", "Stage 1 (slow learner)", "Alignment", "Run and resume", "Speed")
PANELS = (DATA, BACKBONE, METHOD, STAGE1, ALIGNMENT, RUN, SPEED)
_REQUIRED = dataclasses.MISSING


def option(panel: str, help: str, *flags: str, default: Any = _REQUIRED, execution: bool = False,
           cli_default: Any = None, bounds: Optional[Dict[str, Any]] = None) -> Any:
    """A RunConfig field that is a `slca train` option: its --help panel and text, and its flag names where they
    are not ``--field-name`` (switches: ``"--align/--no-align"``). On the command line it defaults to
    ``cli_default`` (None: "the preset"); ``execution``: see ``execution``; ``bounds``: see ``setting``."""
    metadata = {"panel": panel, "help": help, "flags": flags, "cli_default": cli_default, "execution": execution,
                **({"bounds": bounds} if bounds is not None else {})}
    return field(metadata=metadata) if default is _REQUIRED else field(default=default, metadata=metadata)


def setting(default: Any, bounds: Dict[str, Any]) -> Any:
    """A RunConfig field without a flag (the paper's fixed values), with its allowed range. ``bounds`` (checked for
    flags and presets alike, validation.check_bounds): min / max inclusive, above an exclusive lower bound; floats
    must also be finite; None means "off" and is not checked; tuples are checked element by element; say: how the
    error words the rule, where the bounds alone would not tell what the number means."""
    return field(default=default, metadata={"bounds": bounds})


def execution(default: Any = None) -> Any:
    """A RunConfig field that says how or where a run executes, not what it computes: outside the run's identity
    (a --resume may change it; the report groups across it)."""
    return field(default=default, metadata={"execution": True})


def _methods_help() -> str:
    from .methods.catalog import method_names
    return f"{', '.join(method_names())} (`slca methods` describes each)."


@dataclass(frozen=True)
class RunConfig:
    """Every value that decides a run's numbers, and how it ran; written to config.json and state.json.

    The defaults here are the paper's recipe (spec sections 4-5); dataset, backbone and method presets change
    some of them (resolve_config). Method settings: CONTRIBUTING.md, "Methods".
    """

    dataset: str = option(DATA, "Dataset name (see `slca datasets`).", cli_default=...)
    backbone: str = option(BACKBONE, "Backbone name or alias (see `slca backbones`).", cli_default=...)
    method: str = option(METHOD, _methods_help(), cli_default="slca")
    num_classes: int = option(DATA, "Classes to generate (synthetic only).")
    task_sizes: Tuple[int, ...]  # from --tasks, --init-classes, --increment (cli.SPLIT_FLAGS)
    epochs: int = option(STAGE1, "Epochs per task.", default=20, bounds=dict(min=1))
    lr_drop_epoch: Optional[int] = option(STAGE1, "Epoch after which the learning rate drops 10x.", default=18,
                                          bounds=dict(min=1, say="an epoch >= 1 (a drop at or after --epochs never "
                                                                 "happens; leave the flag out for the preset)"))
    batch_size: int = option(STAGE1, "Batch size for training and testing.", default=128, bounds=dict(min=1))
    lr_backbone: float = option(STAGE1, "Backbone learning rate (the slow learner).", default=1e-4,
                                bounds=dict(min=0.0))
    lr_head: float = option(STAGE1, "Classifier learning rate.", default=1e-2, bounds=dict(above=0.0))
    momentum: float = setting(0.9, bounds=dict(min=0.0, max=1.0))
    weight_decay: float = option(STAGE1, "Weight decay (also used by alignment).", default=5e-4, bounds=dict(min=0.0))
    align: bool = option(ALIGNMENT, "Classifier alignment after every task (any method).", "--align/--no-align",
                         default=False)
    ca_epochs: int = option(ALIGNMENT, "Alignment epochs.", default=5, bounds=dict(min=0))
    ca_samples: int = option(ALIGNMENT, "Gaussian samples per class per epoch.", default=256, bounds=dict(min=1))
    ca_lr: float = setting(0.01, bounds=dict(above=0.0))
    ca_batch_size: int = setting(256, bounds=dict(min=1))
    tau: float = option(ALIGNMENT, "Logit-normalization temperature.", default=0.1,
                         bounds=dict(min=1e-3))  # logits / tau: smaller ones overflow alignment in float32
    logit_norm: bool = option(ALIGNMENT, "Logit normalization.", "--logit-norm/--no-logit-norm", default=True)
    mean_scaling: str = option(ALIGNMENT, "Shrinking of old class means before sampling: task (true task of each "
                               "class), authors (their c // task_size) or off.", default="task")
    fresh_norm: bool = option(BACKBONE, "Authors' quirk: a fresh final LayerNorm (default: on for ViTs, off without "
                              "one).", "--fresh-norm/--keep-norm", default=True)
    restore_stage1_heads: bool = option(ALIGNMENT, "Authors' quirk: the next task starts from the unaligned heads.",
                                        "--restore-stage1-heads/--keep-aligned-heads", default=True)
    cov_ridge: float = setting(1e-4, bounds=dict(above=0.0))
    image_size: int = option(DATA, "Input size in pixels (default: the backbone's).", default=224, bounds=dict(min=1))
    mean: Tuple[float, float, float] = setting((0.5, 0.5, 0.5), bounds=dict())
    std: Tuple[float, float, float] = setting((0.5, 0.5, 0.5), bounds=dict(above=0.0))
    train_per_class: Optional[int] = option(DATA, "Use at most this many training images per class.", default=None,
                                            bounds=dict(min=1))
    test_per_class: Optional[int] = option(DATA, "Use at most this many test images per class.", default=None,
                                           bounds=dict(min=1))
    classes: Optional[str] = option(DATA, "Train on these class ids of the dataset only (its own ids, 0-based in its "
                                    "class order), e.g. 50-99 or 0-9,20; they become classes 0..N-1 of the run in "
                                    "id order. Default: every class.", default=None)  # data/subset.py
    freeze_bn: bool = option(BACKBONE, "BatchNorm backbones: keep the pre-trained running statistics (default) or "
                             "update them.", "--freeze-bn/--update-bn", default=True)
    optimizer: str = option(STAGE1, f"{' or '.join(CHOICES['optimizer'])}.", default="sgd")
    schedule: str = option(STAGE1, f"Per task: {', '.join(CHOICES['schedule'])}.", default="step")
    min_lr: float = option(STAGE1, "Final lr of the cosine schedule.", default=0.0, bounds=dict(min=0.0))
    grad_clip: Optional[float] = option(STAGE1, "Clip the gradient norm at this value.", default=None,
                                        bounds=dict(above=0.0))
    sce_a: float = option(METHOD, "Symmetric CE: weight of cross-entropy.", default=1.0, bounds=dict(min=0.0))
    sce_b: float = option(METHOD, "Symmetric CE: weight of reverse cross-entropy (0 = plain CE).", default=0.0,
                          bounds=dict(min=0.0))
    lora_rank: int = option(METHOD, "slca++: LoRA rank on each block's qkv, fc1, fc2; inflora: rank of each task's "
                            "key and value branch.", default=0, bounds=dict(min=0))
    lora_scale: float = option(METHOD, "slca++ / inflora: LoRA scale.", default=0.8, bounds=dict(min=0.0))
    lr_lora: Optional[float] = option(METHOD, "slca++: LoRA learning rate after the first task.", default=None,
                                      bounds=dict(min=0.0))
    lr_lora_first: Optional[float] = option(METHOD, "slca++: LoRA learning rate in the first task.", default=None,
                                            bounds=dict(min=0.0))
    sample_shrink: float = option(METHOD, "slca++: mean s of the old-class sample shrinking 1/(1 + s (T - t)) in "
                                  "alignment (0 = off).", default=0.0, bounds=dict(min=0.0))
    prompt_pool: int = option(METHOD, "l2p/dualprompt: prompts (and keys) in the pool.", default=10, bounds=dict(min=1))
    prompt_length: int = option(METHOD, "l2p: tokens per prompt; dualprompt: E-prompt length; aper --aper-variant "
                                "vpt: prompt tokens per block.", default=5,
                                bounds=dict(min=1))
    prompt_top_k: int = option(METHOD, "l2p: prompts chosen per image.", default=5, bounds=dict(min=1))
    g_prompt_length: int = option(METHOD, "dualprompt: G-prompt length.", default=5, bounds=dict(min=1))
    matching_weight: float = option(METHOD, "l2p/dualprompt: weight of the key-query matching loss.", default=0.1,
                                    bounds=dict(min=0.0))
    covariance: str = option(ALIGNMENT, "Class covariances: ridge (the paper's + 1e-4 I) or shrinkage (OAS, from the "
                             "accumulated sums).", default="ridge")  # closed_form.py
    align_mode: str = option(ALIGNMENT, "sampled (the paper's Gaussian samples) or closed-form (LDA heads from the "
                             "stored means and covariances, no sampling).", default="sampled")
    drift_compensation: str = option(ALIGNMENT, "off (the paper) or linear: move the old classes' stored Gaussians by "
                                     "a drift map fitted on each task's images before and after stage 1.",
                                     default="off")  # drift.py
    drift_views: int = option(ALIGNMENT, "Drift fit: augmented views of the task's images (plus one unaugmented "
                              "pass).", default=8, bounds=dict(min=0))
    drift_ridge: float = option(ALIGNMENT, "Drift fit: ridge, relative to the features' mean eigenvalue.",
                                default=1.0, bounds=dict(above=0.0))
    ranpac_dim: int = option(METHOD, "ranpac: random projection size M (the M x M Gram matrix is 4 M^2 bytes; "
                             "default 10000: 381 MiB).", default=10000, bounds=dict(min=1))
    ranpac_adapt: bool = option(METHOD, "ranpac: adapt the backbone on the first task (slow-learner rates) before "
                                "freezing it (default: off, training-free).", "--ranpac-adapt/--no-ranpac-adapt",
                                default=False)
    cofima_alpha: float = option(METHOD, "cofima: weight of the new task's backbone in the Fisher-weighted merge with "
                                 "the previous task's (paper: 0.4; CUB and Cars 0.5).", default=0.4,
                                 bounds=dict(above=0.0, max=1.0))
    fisher_max: float = option(METHOD, "cofima: clamp of every diagonal Fisher entry (the authors' 1e-4).",
                               default=1e-4, bounds=dict(above=0.0))
    aper_variant: str = option(METHOD, "aper: what adapts on the first task: finetune (the whole backbone), adapter "
                               "(an AdaptFormer adapter of --adapter-bottleneck width per block), ssf (a scale and "
                               "shift after each layer) or vpt (deep prompts, --prompt-length per block); the rest "
                               "stays frozen.", default="finetune")
    inflora_threshold: float = option(METHOD, "inflora: share of the input energy the old tasks' subspace keeps "
                                      "after the first task (CIFAR-100: 0.95, ImageNet-R: 0.98).", default=0.95,
                                      bounds=dict(above=0.0, max=1.0))
    inflora_threshold_end: float = option(METHOD, "inflora: the threshold rises linearly towards this value over the "
                                          "tasks (the authors' 1.0).", default=1.0, bounds=dict(above=0.0, max=1.0))
    ortho_weight: float = option(METHOD, "coda-prompt: weight of the orthogonality penalty on keys, attention vectors "
                                 "and prompts (paper: 0).", default=0.0, bounds=dict(min=0.0))
    adapter_bottleneck: int = option(METHOD, "ease, mos, aper --aper-variant adapter: width of each AdaptFormer "
                                     "adapter's bottleneck (the authors' ffn_num: ease 64, mos 16, aper 64).",
                                     default=64, bounds=dict(min=1))
    ease_alpha: float = option(METHOD, "ease: weight of the other tasks' subspaces in a class's score, divided by the "
                               "tasks so far minus one (the authors' alpha: 0.1).", default=0.1, bounds=dict(min=0.0))
    mos_merge: float = option(METHOD, "mos: after every step the task's adapter becomes (1 - m) itself + m the mean "
                              "of the earlier tasks' adapters (the authors' adapter_momentum: 0.1; 0 = off).",
                              default=0.1, bounds=dict(min=0.0, max=1.0))
    mos_reg: float = option(METHOD, "mos: weight of the authors' loss that keeps a batch's features apart from each "
                            "other and from the old class means (reg: 0.1; 0 = off).", default=0.1,
                            bounds=dict(min=0.0))
    mos_ensemble: bool = option(METHOD, "mos: at test time add the first pass's probabilities to the retrieved "
                                "adapter's (the authors' ensemble: on).", "--mos-ensemble/--no-mos-ensemble",
                                default=True)
    # Where the inputs are (the data's file-list checksum and the weights' sha256 are checked separately).
    data_root: Optional[str] = option(DATA, "Where the dataset lives (see `slca datasets`).", default=None,
                                      execution=True)
    weights: Optional[str] = option(BACKBONE, "Local backbone weights (.safetensors, .npz, .pth) instead of the hub.",
                                    default=None, execution=True)
    # How the run executes: --resume may change these (e.g. --precision fp32 after a NaN).
    precision: str = option(SPEED, "auto (bf16 on GPUs that support it, else fp32; under accelerate launch its "
                            "config's), fp32, bf16, or fp16 (with loss scaling).", default="auto", execution=True)
    workers: Optional[int] = option(SPEED, "Data-loader processes per training process (default: the machine's cores "
                                    "shared among the processes).", default=None, execution=True, bounds=dict(min=0))
    compile: bool = option(SPEED, "torch.compile the backbone (faster steps on GPUs after a warm-up).",
                           "--compile/--no-compile", default=False, execution=True)
    device_augment: Optional[bool] = option(
        SPEED, "Training transforms as batched ops on the training device from uint8 images decoded once (CIFAR: in "
        "memory; JPEG datasets: a cache under $SLCA_DATA_ROOT/decoded) (default: on for image datasets on a GPU), or "
        "PIL on host loader workers.", "--augment-on-device/--augment-on-host", default=None,
        execution=True)  # None: on where the dataset supports it on a GPU
    checkpoint_every: int = option(RUN, "Also save the task being trained every N epochs (in-progress/), so --resume "
                                   "continues mid-task. 0: off.", default=0, execution=True,
                                   bounds=dict(min=0, say="0 (off) or a number of epochs"))
    skip_bad_images: bool = option(DATA, "Decode every image first and leave unreadable ones out (listed in "
                                   "skipped-images.json) instead of stopping.",
                                   "--skip-bad-images/--stop-on-bad-images",
                                   default=False, execution=True)  # a skipped image changes the data checksum
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
    values.update(spec.preset(dataset, given))
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
    """Every numeric setting within its declared bounds (validation.BOUNDS, for flags and presets alike), every named
    one a known choice, and the rules that tie settings together."""
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
