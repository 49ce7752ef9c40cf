"""The catalog of methods: one torch-free declaration per method, read by the CLI, presets, report and tests.

Adding a method is one module under ``slca_cli/methods/`` (a ``base.Method`` subclass overriding the hooks that
differ; none when presets say it all) plus one entry here (or ``register_method`` from your own code).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import SlcaError


@dataclass(frozen=True)
class Published:
    """A published result on one dataset: Last-Acc, Inc-Acc (None when not published), read from a figure."""

    last_acc: float
    inc_acc: Optional[float] = None
    from_figure: bool = False


@dataclass(frozen=True)
class Variant:
    """Runs whose RunConfig setting ``flag`` is ``value`` (True: a switch that is on): reported as ``label +
    suffix``, with their own paper numbers and their own presets (on top of the method's, for every dataset, then
    ``dataset_presets[dataset]``)."""

    flag: str
    suffix: str
    paper: Mapping[str, Published] = field(default_factory=dict)
    value: Any = True
    presets: Mapping[str, Any] = field(default_factory=dict)
    dataset_presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of slca needs to know about a method without importing torch.

    ``presets`` override RunConfig's defaults for every dataset, ``dataset_presets[dataset]`` after them.
    ``aligns``: classifier alignment is part of the method (the preset of ``--align``, and how the report names
    runs with ``--no-align``). ``needs_vit``: refused on backbones without transformer blocks.
    ``implementation``: a function returning the ``base.Method`` subclass, called only when the method runs (so
    torch is imported then); None for a method whose presets say everything (base.Method's hooks).
    ``paper``: published numbers per dataset for `slca report --paper`, from ``source``; ``variants``: label
    variants selected by a flag (e.g. ``ranpac --ranpac-adapt``).
    """

    name: str
    label: str
    description: str
    implementation: Optional[Callable[[], type]] = None
    aligns: bool = False
    needs_vit: bool = False
    presets: Mapping[str, Any] = field(default_factory=dict)
    dataset_presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    paper: Mapping[str, Published] = field(default_factory=dict)
    source: str = ""
    variants: Tuple[Variant, ...] = ()

    def preset(self, dataset: str, flags: Mapping[str, Any] = {}) -> Dict[str, Any]:
        """This method's settings on ``dataset``, on top of RunConfig's defaults; then those of the variant that
        ``flags`` (the settings given on the command line) or these presets select."""
        values = {"align": self.aligns, **self.presets, **self.dataset_presets.get(dataset, {})}
        variant = self.variant_of({**values, **flags})
        if variant is not None:
            values.update({**variant.presets, **variant.dataset_presets.get(dataset, {})})
        return values

    def variant_of(self, config: Mapping[str, Any]) -> Optional[Variant]:
        """The label variant a stored config selects, if any."""
        return next((v for v in self.variants if v.flag in config and config[v.flag] == v.value), None)

    def published(self, dataset: str, label: str) -> Optional[Published]:
        """The paper's numbers for a report row named ``label`` (the plain label or a variant's) on ``dataset``."""
        if label == self.label:
            return self.paper.get(dataset)
        variant = next((v for v in self.variants if label == self.label + v.suffix), None)
        return variant.paper.get(dataset) if variant else None


def _on(cifar100: float, imagenet_r: float, cub200: float, cars196: float, inc: Tuple = (None,) * 4,
        figure: Tuple[str, ...] = ()) -> Dict[str, Published]:
    """Published numbers on the four benchmarks, in the order CIFAR-100, ImageNet-R, CUB-200, Cars-196."""
    names = ("cifar100", "imagenet-r", "cub200", "cars196")
    return {d: Published(last, i, d in figure) for d, last, i in zip(names, (cifar100, imagenet_r, cub200, cars196),
                                                                   inc)}


# The implementations, imported on first use (torch); each returns its base.Method subclass.
def _joint():
    from .joint import Joint
    return Joint


def _l2p():
    from .prompts import L2P
    return L2P


def _dualprompt():
    from .prompts import DualPrompt
    return DualPrompt


def _slcapp():
    from .slcapp import SLCAPlusPlus
    return SLCAPlusPlus


def _simplecil():
    from .simplecil import SimpleCIL
    return SimpleCIL


def _ranpac():
    from .ranpac import RanPAC
    return RanPAC


def _cofima():
    from .cofima import CoFiMA
    return CoFiMA


def _aper():
    from .aper import APER
    return APER


def _coda_prompt():
    from .coda import CODAPrompt
    return CODAPrompt


def _ease():
    from .ease import EASE
    return EASE


def _inflora():
    from .inflora import InfLoRA
    return InfLoRA


def _mos():
    from .mos import MOS
    return MOS


# Spec section 7 (the SLCA paper, Zhang et al., ICCV 2023, Tables 1-2): ViT-B/16 IN21K, 10 tasks, mean of 3 seeds.
SLCA_PAPER = "the SLCA paper (Zhang et al., ICCV 2023), Tables 1-2"
# RanPAC paper (McDonnell et al., NeurIPS 2023), Tables 1-2, final accuracy as the authors publish it in
# RanPAC/RanPAC paper_tables/Table_data_main_<dataset>.csv: "Algorithm 1" (with phase-1 adaptation) is our
# `ranpac --ranpac-adapt`, "No Phase 1" our default `ranpac`, "NCM only" (frozen ViT, class-mean prototypes)
# SimpleCIL's classifier.
RANPAC_PAPER = "the RanPAC paper (McDonnell et al., NeurIPS 2023), Tables 1-2"
_SMALL_DATASETS = ("imagenet-r", "cub200", "cars196")
# L2P (Wang et al., CVPR 2022) and DualPrompt (Wang et al., ECCV 2022), see CONTRIBUTING.md: frozen ViT, Adam at
# 0.03 x 128/256 with a constant schedule, no weight decay, gradient norm clipped at 1, 5 epochs on CIFAR-100;
# lr_backbone is the prompts' and keys' learning rate. DualPrompt's ImageNet-R: 50 epochs at 0.005 x 128/256.
_PROMPTS = dict(lr_backbone=0.015, lr_head=0.015, fresh_norm=False, optimizer="adam", schedule="constant",
                weight_decay=0.0, grad_clip=1.0, epochs=5, lr_drop_epoch=None)
_PROMPTS_SMALL_DATA = dict(epochs=50, lr_backbone=0.0025, lr_head=0.0025)
_SLCAPP_HALF_SCE = dict(sce_a=0.5, sce_b=0.5, weight_decay=0.0)
# The methods later papers compare against (CONTRIBUTING.md, "Methods", has every default's source).
COFIMA_PAPER = ("the CoFiMA paper (Marouf et al., ECCV 2024), Last-Acc of ViT-B/16 IN21K, mean of 3 seeds as in the "
                "authors' logs")
# APER (LAMDA-PILOT exps/aper_*.json, CONTRIBUTING.md): SGD with a cosine schedule to 0 on the first task, one lr for
# what adapts and the cosine head; each variant's epochs, batch, lr and weight decay from its own config (ImageNet-R:
# its _inr config; CUB and Cars get CIFAR-100's). aper_aperpter*.json is the adapter variant's (sic).
_APER = dict(aper_variant="finetune", schedule="cosine", min_lr=0.0, lr_drop_epoch=None, fresh_norm=False)
_APER_PEFT = dict(epochs=20, batch_size=48, lr_backbone=0.01, lr_head=0.01, weight_decay=5e-4)
_APER_VARIANTS = (
    Variant("aper_variant", " (finetune)", value="finetune",
            presets=dict(epochs=6, batch_size=128, lr_backbone=0.01, lr_head=0.01, weight_decay=0.05),
            dataset_presets={"imagenet-r": dict(epochs=5, batch_size=144, weight_decay=0.005)}),
    Variant("aper_variant", " (adapter)", value="adapter", presets=dict(_APER_PEFT, adapter_bottleneck=64),
            dataset_presets={"imagenet-r": dict(epochs=10, batch_size=16, lr_backbone=0.05, lr_head=0.05,
                                                weight_decay=0.005)}),
    Variant("aper_variant", " (ssf)", value="ssf", presets=_APER_PEFT),
    Variant("aper_variant", " (vpt)", value="vpt", presets=dict(_APER_PEFT, prompt_length=5),
            dataset_presets={"imagenet-r": dict(batch_size=24, lr_backbone=0.05, lr_head=0.05, prompt_length=30)}),
)
# CODA-Prompt (LAMDA-PILOT exps/coda_prompt.json, coda_prompt_inr.json): pool 100, length 8, Adam 1e-3, cosine.
_CODA = dict(prompt_pool=100, prompt_length=8, ortho_weight=0.0, optimizer="adam", lr_backbone=1e-3, lr_head=1e-3,
             weight_decay=0.0, schedule="cosine", min_lr=1e-5, lr_drop_epoch=None, epochs=20, batch_size=128,
             grad_clip=None, fresh_norm=False)
# InfLoRA (the authors' liangyanshuo/InfLoRA configs/cifar100_inflora.json, mimg10_inflora.json): rank 10 on keys and
# values, Adam 5e-4 for the up-projections and the head, no weight decay, cosine per task, batch 128, 20 epochs and
# threshold 0.95 -> 1.0 on CIFAR-100, 50 epochs and 0.98 -> 1.0 on ImageNet-R (and CUB, Cars).
_INFLORA = dict(lora_rank=10, lora_scale=1.0, inflora_threshold=0.95, inflora_threshold_end=1.0, optimizer="adam",
                lr_backbone=5e-4, lr_head=5e-4, weight_decay=0.0, schedule="cosine", min_lr=0.0, lr_drop_epoch=None,
                epochs=20, batch_size=128, grad_clip=None, fresh_norm=False)
# MOS (LAMDA-PILOT exps/mos.json; ImageNet-R: mos_inr.json): adapters at 0.03, head at 0.1 x that, SGD, cosine to 0,
# 20 epochs, batch 48; alignment 30 epochs at 0.005 with 5 x batch samples per class, one class's worth per step.
_MOS = dict(adapter_bottleneck=16, mos_merge=0.1, mos_reg=0.1, mos_ensemble=True, optimizer="sgd",
            lr_backbone=0.03, lr_head=0.003, weight_decay=5e-4, schedule="cosine", min_lr=0.0, lr_drop_epoch=None,
            epochs=20, batch_size=48, grad_clip=None, fresh_norm=False, ca_epochs=30, ca_lr=0.005, ca_samples=240,
            ca_batch_size=240, logit_norm=False, mean_scaling="off", restore_stage1_heads=False)
_MOS_INR = dict(epochs=10, lr_backbone=0.05, lr_head=0.005, batch_size=16, weight_decay=0.005, ca_samples=80,
                ca_batch_size=80)

# EASE (LAMDA-PILOT exps/ease.json, ease_inr.json): SGD 0.025 (ImageNet-R 0.05), batch 48 (16), weight decay
# 5e-4 (5e-3), 20 epochs per task, cosine to 0; adapter bottleneck 64, alpha 0.1; the ViT keeps its own norm.
_EASE = dict(lr_backbone=0.025, lr_head=0.025, optimizer="sgd", schedule="cosine", min_lr=0.0, lr_drop_epoch=None,
             weight_decay=5e-4, epochs=20, batch_size=48, fresh_norm=False, adapter_bottleneck=64, ease_alpha=0.1)

CATALOG: Tuple[MethodSpec, ...] = (
    MethodSpec("seqft", "Seq FT", "sequential fine-tuning, one learning rate (1e-2) for backbone and head: the "
               "lower baseline", presets=dict(lr_backbone=1e-2), paper=_on(41.77, 26.95, 40.02, 27.57),
               source=SLCA_PAPER),
    MethodSpec("sl", "SL", "slow learner only: backbone lr 1e-4, head 1e-2, no alignment",
               paper=_on(88.86, 71.80, 61.67, 52.91, figure=("cub200", "cars196")), source=SLCA_PAPER),
    MethodSpec("slca", "SLCA", "slow learner + classifier alignment (the paper's method)", aligns=True,
               paper=_on(91.53, 77.00, 84.71, 67.73, inc=(94.09, 81.17, 90.94, 76.93)), source=SLCA_PAPER),
    MethodSpec("joint", "Joint", "all classes in one task, the slow learner's recipe: the upper bound", _joint,
               paper=_on(93.22, 79.60, 88.00, 80.31), source=SLCA_PAPER),
    MethodSpec("linear", "Linear", "frozen pre-trained backbone (its own final norm), heads only",
               presets=dict(lr_backbone=0.0, fresh_norm=False)),
    MethodSpec("l2p", "L2P", "L2P: frozen ViT, pool of 10 prompts (length 5), top-5 by key matching, prompt "
               "tuning", _l2p, needs_vit=True, paper=_on(82.76, 66.49, 62.21, 38.18), source=SLCA_PAPER,
               presets=dict(_PROMPTS, prompt_pool=10, prompt_length=5, prompt_top_k=5, matching_weight=0.1),
               dataset_presets={d: _PROMPTS_SMALL_DATA for d in _SMALL_DATASETS}),
    MethodSpec("dualprompt", "DualPrompt", "DualPrompt: frozen ViT, G-prompt (blocks 1-2) + task E-prompts "
               "(blocks 3-5), prefix tuning", _dualprompt, needs_vit=True, paper=_on(85.56, 68.50, 66.00, 40.14),
               source=SLCA_PAPER,
               presets=dict(_PROMPTS, prompt_pool=10, prompt_length=5, prompt_top_k=1, g_prompt_length=5,
                            matching_weight=1.0),
               dataset_presets={d: dict(_PROMPTS_SMALL_DATA, prompt_length=20) for d in _SMALL_DATASETS}),
    # SLCA++ (arXiv 2408.08295; spec section 9): LoRA + norms + biases + CLS token, symmetric cross-entropy,
    # cosine schedule down to 1e-4, alignment with shrunk old-class samples instead of shrunk means.
    MethodSpec("slca++", "SLCA++", "SLCA++: LoRA (rank 4) + norms/biases/CLS token train, symmetric CE, cosine "
               "lr, alignment with shrunk old-class samples", _slcapp, aligns=True, needs_vit=True,
               presets=dict(lr_backbone=1e-3, lr_lora=1e-3, lr_lora_first=5e-3, schedule="cosine", min_lr=1e-4,
                            lr_drop_epoch=None, sce_a=1.0, sce_b=0.1, lora_rank=4, lora_scale=0.8,
                            mean_scaling="off", sample_shrink=0.02),
               dataset_presets={"imagenet-r": _SLCAPP_HALF_SCE, "cars196": _SLCAPP_HALF_SCE}),
    # Training-free baselines on the frozen pre-trained backbone with its own final norm (CONTRIBUTING.md);
    # RanPAC's optional first-task adaptation (--ranpac-adapt) uses the slow learner's rates.
    MethodSpec("simplecil", "SimpleCIL", "frozen backbone, class-mean prototypes, cosine classifier (no training)",
               _simplecil, presets=dict(lr_backbone=0.0, fresh_norm=False), paper=_on(83.4, 61.2, 85.1, 37.7),
               source=RANPAC_PAPER + " ('NCM only')"),
    MethodSpec("ranpac", "RanPAC", "frozen backbone, random projection to M dims + ReLU, ridge classifier (Gram "
               "matrix per task)", _ranpac, presets=dict(fresh_norm=False), paper=_on(89.0, 71.8, 88.7, 66.0),
               source=RANPAC_PAPER + " ('No Phase 1'; 'Algorithm 1' for --ranpac-adapt)",
               variants=(Variant("ranpac_adapt", " (adapted)", _on(92.2, 77.9, 90.3, 77.5)),)),
    MethodSpec("cofima", "CoFiMA", "SLCA's slow learner, then after each task the backbone is averaged with the "
               "previous task's, weighted by each task's diagonal Fisher; SLCA's alignment", _cofima, aligns=True,
               presets=dict(cofima_alpha=0.4),
               dataset_presets={d: dict(cofima_alpha=0.5) for d in ("cub200", "cars196")},
               paper=_on(92.01, 79.48, 87.02, 72.46), source=COFIMA_PAPER),
    MethodSpec("aper", "APER", "APER/ADAM: the backbone adapted on the first task only (--aper-variant: finetune, "
               "adapter, ssf or vpt), then cosine prototypes of [pre-trained, adapted] features", _aper, presets=_APER,
               variants=_APER_VARIANTS),
    MethodSpec("coda-prompt", "CODA-Prompt", "CODA-Prompt: frozen ViT, prefix prompts assembled from components "
               "weighted by attention to the query, a new slice of components per task", _coda_prompt,
               needs_vit=True, presets=_CODA, dataset_presets={d: dict(epochs=50) for d in _SMALL_DATASETS}),
    MethodSpec("ease", "EASE", "EASE: frozen ViT, one adapter per task (expandable subspaces), cosine prototypes "
               "over all subspaces with semantic-guided completion of old classes' prototypes", _ease,
               needs_vit=True, presets=_EASE,
               dataset_presets={"imagenet-r": dict(lr_backbone=0.05, lr_head=0.05, batch_size=16,
                                                   weight_decay=5e-3)}),
    MethodSpec("inflora", "InfLoRA", "InfLoRA: frozen ViT, a LoRA branch per task on the attention keys and values, "
               "its down-projection designed orthogonal to the old tasks' input subspace; the up-projection trains, "
               "then the branch is merged", _inflora, needs_vit=True, presets=_INFLORA,
               dataset_presets={d: dict(epochs=50, inflora_threshold=0.98) for d in _SMALL_DATASETS}),
    MethodSpec("mos", "MOS", "MOS: frozen ViT, an adapter per task merged with the earlier ones, SLCA's alignment; "
               "at test time a first pass retrieves each image's adapter, refined by the heads", _mos, aligns=True,
               needs_vit=True, presets=_MOS, dataset_presets={"imagenet-r": _MOS_INR}),
)
METHODS: Dict[str, MethodSpec] = {spec.name: spec for spec in CATALOG}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise SlcaError(f"unknown method '{name}'; known: {', '.join(METHODS)} (see `slca methods`)")
    return METHODS[name]


def method_names() -> List[str]:
    return list(METHODS)


def register_method(spec: MethodSpec) -> None:
    """Add a method from outside this file (a plugin, a test); its name must be new."""
    if spec.name in METHODS:
        raise SlcaError(f"method '{spec.name}' is already in the catalog; choose another name")
    METHODS[spec.name] = spec
