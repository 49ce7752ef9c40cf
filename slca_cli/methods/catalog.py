"""The catalog of methods: one torch-free declaration per method, read by the CLI, presets, report and tests.

Adding a method is one module under ``slca_cli/methods/`` (a ``base.Method`` subclass) plus one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

from ..errors import SlcaError


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of slca needs to know about a method without importing torch.

    ``presets`` override RunConfig's defaults for every dataset, ``dataset_presets[dataset]`` after them.
    ``aligns``: classifier alignment is part of the method (the preset of ``--align``, and how the report names
    runs with ``--no-align``). ``needs_vit``: refused on backbones without transformer blocks.
    ``implementation`` is ``module:Class`` under ``slca_cli.methods``, imported only when the method runs.
    """

    name: str
    label: str
    description: str
    implementation: str
    aligns: bool = False
    needs_vit: bool = False
    presets: Mapping[str, Any] = field(default_factory=dict)
    dataset_presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def preset(self, dataset: str) -> Dict[str, Any]:
        """This method's settings on ``dataset``, on top of RunConfig's defaults."""
        return {"align": self.aligns, **self.presets, **self.dataset_presets.get(dataset, {})}


_SMALL_DATASETS = ("imagenet-r", "cub200", "cars196")
# L2P (Wang et al., CVPR 2022) and DualPrompt (Wang et al., ECCV 2022), see CONTRIBUTING.md: frozen ViT, Adam at
# 0.03 x 128/256 with a constant schedule, no weight decay, gradient norm clipped at 1, 5 epochs on CIFAR-100;
# lr_backbone is the prompts' and keys' learning rate. DualPrompt's ImageNet-R: 50 epochs at 0.005 x 128/256.
_PROMPTS = dict(lr_backbone=0.015, lr_head=0.015, fresh_norm=False, optimizer="adam", schedule="constant",
                weight_decay=0.0, grad_clip=1.0, epochs=5, lr_drop_epoch=None)
_PROMPTS_SMALL_DATA = dict(epochs=50, lr_backbone=0.0025, lr_head=0.0025)
_SLCAPP_HALF_SCE = dict(sce_a=0.5, sce_b=0.5, weight_decay=0.0)

CATALOG: Tuple[MethodSpec, ...] = (
    MethodSpec("seqft", "Seq FT", "sequential fine-tuning, one learning rate (1e-2) for backbone and head: the "
               "lower baseline", "finetune:SeqFT", presets=dict(lr_backbone=1e-2)),
    MethodSpec("sl", "SL", "slow learner only: backbone lr 1e-4, head 1e-2, no alignment", "finetune:SlowLearner"),
    MethodSpec("slca", "SLCA", "slow learner + classifier alignment (the paper's method)", "finetune:SLCA",
               aligns=True),
    MethodSpec("joint", "Joint", "all classes in one task, the slow learner's recipe: the upper bound",
               "finetune:Joint"),
    MethodSpec("linear", "Linear", "frozen pre-trained backbone (its own final norm), heads only",
               "finetune:Linear", presets=dict(lr_backbone=0.0, fresh_norm=False)),
    MethodSpec("l2p", "L2P", "L2P: frozen ViT, pool of 10 prompts (length 5), top-5 by key matching, prompt "
               "tuning", "prompts:L2P", needs_vit=True,
               presets=dict(_PROMPTS, prompt_pool=10, prompt_length=5, prompt_top_k=5, matching_weight=0.1),
               dataset_presets={d: _PROMPTS_SMALL_DATA for d in _SMALL_DATASETS}),
    MethodSpec("dualprompt", "DualPrompt", "DualPrompt: frozen ViT, G-prompt (blocks 1-2) + task E-prompts "
               "(blocks 3-5), prefix tuning", "prompts:DualPrompt", needs_vit=True,
               presets=dict(_PROMPTS, prompt_pool=10, prompt_length=5, prompt_top_k=1, g_prompt_length=5,
                            matching_weight=1.0),
               dataset_presets={d: dict(_PROMPTS_SMALL_DATA, prompt_length=20) for d in _SMALL_DATASETS}),
    # SLCA++ (arXiv 2408.08295; spec section 9): LoRA + norms + biases + CLS token, symmetric cross-entropy,
    # cosine schedule down to 1e-4, alignment with shrunk old-class samples instead of shrunk means.
    MethodSpec("slca++", "SLCA++", "SLCA++: LoRA (rank 4) + norms/biases/CLS token train, symmetric CE, cosine "
               "lr, alignment with shrunk old-class samples", "slcapp:SLCAPlusPlus", aligns=True, needs_vit=True,
               presets=dict(lr_backbone=1e-3, lr_lora=1e-3, lr_lora_first=5e-3, schedule="cosine", min_lr=1e-4,
                            lr_drop_epoch=None, sce_a=1.0, sce_b=0.1, lora_rank=4, lora_scale=0.8,
                            mean_scaling="off", sample_shrink=0.02),
               dataset_presets={"imagenet-r": _SLCAPP_HALF_SCE, "cars196": _SLCAPP_HALF_SCE}),
    # Training-free baselines on the frozen pre-trained backbone with its own final norm (CONTRIBUTING.md);
    # RanPAC's optional first-task adaptation (--ranpac-adapt) uses the slow learner's rates.
    MethodSpec("simplecil", "SimpleCIL", "frozen backbone, class-mean prototypes, cosine classifier (no training)",
               "simplecil:SimpleCIL", presets=dict(lr_backbone=0.0, fresh_norm=False)),
    MethodSpec("ranpac", "RanPAC", "frozen backbone, random projection to M dims + ReLU, ridge classifier (Gram "
               "matrix per task)", "ranpac:RanPAC", presets=dict(fresh_norm=False)),
)
METHODS: Dict[str, MethodSpec] = {spec.name: spec for spec in CATALOG}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise SlcaError(f"unknown method '{name}'; known: {', '.join(METHODS)} (see `slca methods`)")
    return METHODS[name]


def method_names() -> List[str]:
    return list(METHODS)
