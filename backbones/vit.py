"""ViT backbones from timm: the paper's supervised ImageNet-21k ViT-B/16 and a tiny ViT for tests."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import timm
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from slca_cli.errors import SlcaError

from .registry import BackboneSpec, register_backbone
from .weights import load_into, read_state_dict


def hub_cached(hf_repo: str) -> Optional[bool]:
    """Whether the Hugging Face hub cache already holds this repo's weights (no network used)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return any(isinstance(try_to_load_from_cache(hf_repo, f), str)
                   for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so that offline machines fail at once instead of after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_vit_weights(model: VisionTransformer, weights: str) -> None:
    """A local checkpoint: Google .npz (timm's converter) or a state dict remapped by timm's ViT filter."""
    path = Path(weights)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise SlcaError(f"--weights {path} does not exist")
        try:
            model.load_pretrained(str(path))
        except Exception as exc:
            raise SlcaError(f"--weights {path} is not a Google ViT .npz for this model ({exc})") from None
        return
    load_into(model, read_state_dict(path), str(path), filter_fn=checkpoint_filter_fn)


def build_timm_vit(model_name: str, hf_repo: str, weights: Optional[str], pretrained: bool) -> nn.Module:
    """timm ViT without classifier, so ``forward`` returns the CLS token after the final norm."""
    if weights or not pretrained:
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        if weights:
            load_vit_weights(model, weights)
        return model
    cached = hub_cached(hf_repo)
    if not cached and not hub_reachable():
        reason = "the hub is not reachable and the weights are not in the local cache"
    else:
        try:
            return timm.create_model(model_name, pretrained=True, num_classes=0)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
    raise SlcaError(f"could not get the weights of {model_name} from the Hugging Face hub ({reason}); "
                        f"offline, pass --weights FILE (.safetensors, .npz or .pth of {hf_repo}) or fill the hub "
                        f"cache (HF_HOME, default ~/.cache/huggingface)")


def _in21k(weights: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    return build_timm_vit("vit_base_patch16_224.augreg_in21k", "timm/vit_base_patch16_224.augreg_in21k",
                          weights, pretrained)


def _tiny(weights: Optional[str] = None, pretrained: bool = True) -> nn.Module:
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                              num_classes=0)
    if weights:
        load_into(model, read_state_dict(Path(weights)), weights)
    return model


register_backbone(BackboneSpec(
    name="vit-b16-in21k", build=_in21k, family="in21k", image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    description="ViT-B/16, supervised AugReg ImageNet-21k (timm vit_base_patch16_224.augreg_in21k), 768-d",
    weights_source="hub timm/vit_base_patch16_224.augreg_in21k or --weights FILE",
    weights_present=lambda: hub_cached("timm/vit_base_patch16_224.augreg_in21k"),
    aliases=("in21k",),
))
register_backbone(BackboneSpec(
    name="vit-tiny-test", build=_tiny, family="test", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    description="2-block ViT for 32 px images (patch 4, 64-d), random init: for tests and smoke runs",
    weights_source="random init (seeded) or --weights FILE", weights_present=lambda: True,
))
