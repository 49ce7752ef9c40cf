"""`slca export`: a finished task's model as a plain timm model for people who do not install slca: the weights as
safetensors with every task head merged into one classifier over the seen classes, classes.json (names in output
order), preprocessing.json (the run's test transform) and model.json (how timm builds it); optionally ONNX."""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from .checkpoint import MODEL_FILE, TaskState, atomic_write_json
from .data import dataset_transform_style
from .data.transforms import test_geometry
from .errors import SlcaError
from .methods.lora import LoRALinear
from .model import ContinualModel

FORMATS = ("safetensors", "onnx")
# Backbones built outside timm.create_model: the timm architecture and arguments that give the same modules.
TIMM_EQUIVALENTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "vit-tiny-test": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                                   mlp_ratio=2.0)),
}
# Methods whose model is more than backbone + linear classifier.
NOT_PLAIN = {"l2p": "its prompts are chosen per image by a query pass of the ViT",
             "dualprompt": "its prompts are chosen per image by a query pass of the ViT",
             "ranpac": "its heads read a random projection of the features",
             "coda-prompt": "its prompts are weighted per image by a query pass of the ViT",
             "aper": "its features concatenate two backbones",
             "ease": "its features concatenate one ViT pass per task's adapter",
             "mos": "each image is encoded again with the adapter a first pass retrieves"}
# Largest |logit difference| accepted between the exported model and slca's, in float32.
TOLERANCE = 1e-4


def merged_classifier(model: ContinualModel) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every task head stacked into one (classes x features) weight and bias, in output order."""
    weight = torch.cat([h.weight.detach().float() for h in model.task_heads])
    bias = torch.cat([h.bias.detach().float() for h in model.task_heads])
    return weight, bias


def merge_lora(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` with each LoRA layer folded into a plain nn.Linear (W + scale * B A)."""
    backbone = copy.deepcopy(backbone)
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.base.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(module.merged_weight())
                if module.base.bias is not None:
                    plain.bias.copy_(module.base.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, leaf, plain)
    return backbone


def timm_recipe(cfg_backbone: str, backbone: nn.Module) -> Tuple[str, Dict[str, Any]]:
    """(architecture, create_model arguments) that rebuild ``backbone``'s modules in timm."""
    if cfg_backbone in TIMM_EQUIVALENTS:
        name, kwargs = TIMM_EQUIVALENTS[cfg_backbone]
        return name, dict(kwargs)
    architecture = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if not architecture:
        raise SlcaError(f"slca export: the backbone {cfg_backbone} was not built by timm.create_model, so no timm "
                        f"architecture rebuilds it; use --format onnx")
    kwargs = {"dynamic_img_size": True} if getattr(backbone, "dynamic_img_size", False) else {}
    return architecture, kwargs


def layer_norm_eps(plain: nn.Module, trained: nn.Module) -> Dict[str, float]:
    """LayerNorms whose eps differs from timm's default (the fresh final norm of --fresh-norm: 1e-5)."""
    return {name: m.eps for name, m in trained.named_modules() if isinstance(m, nn.LayerNorm)
            and isinstance(plain.get_submodule(name), nn.LayerNorm) and plain.get_submodule(name).eps != m.eps}


def build_plain(spec: Dict[str, Any]) -> nn.Module:
    """The timm model model.json describes (what the README's loading lines do)."""
    import timm
    model = timm.create_model(spec["architecture"], pretrained=False, num_classes=spec["num_classes"],
                              **spec["kwargs"])
    for name, eps in spec["layer_norm_eps"].items():
        model.get_submodule(name).eps = eps
    return model


def plain_model(model: ContinualModel, state: TaskState) -> Tuple[nn.Module, Dict[str, Any]]:
    """A timm model computing the same logits as ``model``, and its model.json."""
    cfg = state.config
    if cfg.method in NOT_PLAIN:
        raise SlcaError(f"slca export: --method {cfg.method} is not a plain timm model ({NOT_PLAIN[cfg.method]}); "
                        f"use --format onnx")
    backbone = merge_lora(model.backbone)
    architecture, kwargs = timm_recipe(cfg.backbone, backbone)
    weight, bias = merged_classifier(model)
    spec = {"architecture": architecture, "kwargs": kwargs, "num_classes": int(weight.shape[0]),
            "layer_norm_eps": {}}
    try:
        plain = build_plain(spec)
    except Exception as exc:  # an unknown architecture or arguments in this timm
        raise SlcaError(f"slca export: timm cannot build {architecture} ({exc.__class__.__name__}: {exc}); use "
                        f"--format onnx") from None
    spec["layer_norm_eps"] = layer_norm_eps(plain, backbone)
    plain = build_plain(spec)
    classifier = plain.get_classifier()
    names = {id(p): n for n, p in plain.named_parameters()}
    weights = {k: v.detach().float() for k, v in backbone.state_dict().items()}
    weights[names[id(classifier.weight)]] = weight
    weights[names[id(classifier.bias)]] = bias
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SlcaError(f"slca export: {cfg.backbone}'s weights do not fit timm's {architecture} (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); use --format onnx")
    return plain.eval(), spec


def check_same_logits(reference: nn.Module, exported, image_size: int, what: str) -> float:
    """The largest |logit difference| on random inputs; a SlcaError above ``TOLERANCE``."""
    images = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (reference(images).float() - torch.as_tensor(exported(images)).float()).abs().max().item()
    if not difference <= TOLERANCE:
        raise SlcaError(f"slca export: the {what} differs from slca's model by {difference:.2e} in the logits (more "
                        f"than {TOLERANCE:g}); nothing was written as a finished export")
    return difference


def export_checkpoint(task_dir: Path, out: Path, fmt: str = "safetensors") -> Dict[str, Any]:
    """Write the export of a task folder into ``out`` (created; files in it are replaced); returns a summary."""
    from .predict import class_names
    from .restore import restore_model

    if fmt not in FORMATS:
        raise SlcaError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SlcaError(f"--out {out} is a file; give a folder for the export")
    model, state = restore_model(task_dir)
    model = model.float().eval()
    cfg = state.config
    reference = lambda images: model(images)  # noqa: E731
    written: List[str] = []
    record: Dict[str, Any] = {"format": fmt, "task": state.task + 1, "classes": model.num_seen_classes}
    try:
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "safetensors":
            plain, spec = plain_model(model, state)
            record["max_logit_difference"] = check_same_logits(reference, plain, cfg.image_size, "timm model")
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(out / "model.safetensors"),
                      metadata={"format": "pt"})
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(out / "model.safetensors", 0o666 & ~umask)  # safetensors creates it owner-only
            atomic_write_json(out / "model.json", dict(spec, source=source_record(state)))
            written += ["model.safetensors", "model.json"]
        else:
            record["max_logit_difference"] = export_onnx(model, cfg.image_size, out / "model.onnx")
            written.append("model.onnx")
    except OSError as exc:
        raise SlcaError(f"cannot write the export into {out} ({exc.strerror or exc.__class__.__name__}); choose a "
                        f"writable --out") from None
    atomic_write_json(out / "classes.json", class_names(state)[: model.num_seen_classes])
    atomic_write_json(out / "preprocessing.json", preprocessing_record(state))
    record["files"] = [str(out / f) for f in written + ["classes.json", "preprocessing.json"]]
    return record


def preprocessing_record(state: TaskState) -> Dict[str, Any]:
    """The run's test transform: resize the shorter side (bicubic), centre-crop, scale to [0, 1], normalize."""
    cfg = state.config
    geometry = test_geometry(dataset_transform_style(cfg.dataset), cfg.image_size)
    return {**geometry, "size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std), "channels": "RGB",
            "input": "float32 NCHW, pixels / 255 then (x - mean) / std"}


def source_record(state: TaskState) -> Dict[str, Any]:
    from . import __version__
    return {"checkpoint": str(Path(state.task_dir).resolve()), "task": state.task + 1,
            "model_sha256": state.sha256.get(MODEL_FILE), "dataset": state.config.dataset,
            "backbone": state.config.backbone, "method": state.config.method, "slca": __version__}


class Logits(nn.Module):
    """images -> logits over every seen class: the whole slca model (prompts, projection, heads) for ONNX."""

    def __init__(self, model: ContinualModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def export_onnx(model: ContinualModel, image_size: int, path: Path) -> float:
    """model.onnx (dynamic batch), checked with onnxruntime against PyTorch's logits; returns the difference."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise SlcaError("--format onnx needs onnx and onnxruntime: pip install 'slca[onnx]'") from None
    module = Logits(model).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with warnings.catch_warnings():  # the tracer's notes on Python control flow fixed at export time
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as exc:  # the exporter fails in many ways on unsupported operators
        if tmp.exists():
            tmp.unlink()
        raise SlcaError(f"slca export --format onnx: torch.onnx.export failed ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    try:
        difference = check_same_logits(module, lambda x: session.run(None, {"images": x.numpy()})[0], image_size,
                                       "ONNX model")
    except SlcaError:
        tmp.unlink()
        raise
    tmp.replace(path)
    return difference
