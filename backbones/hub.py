"""timm models with weights from the Hugging Face hub or a local file (.safetensors, Google .npz, torch state
dict): one builder for the named ViTs and for ``timm:<model name>``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Tuple

import timm
from torch import nn

from slca_cli.errors import SlcaError

from .cache import offline, reachable
from .weights import load_into, read_state_dict

HF_CACHE_DOC = "cache $HF_HOME, default ~/.cache/huggingface"


def hub_id(model_name: str) -> Optional[str]:
    """The hub repository timm takes ``model_name``'s weights from (None when it has none there)."""
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def hub_cached(hf_repo: Optional[str]) -> Optional[bool]:
    """Whether the Hugging Face hub cache already holds this repo's weights (no network used)."""
    if not hf_repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        return any(isinstance(try_to_load_from_cache(hf_repo, f), str)
                   for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))
    except Exception:
        return None


def hub_reachable(timeout: float = 3.0) -> bool:
    return not offline() and reachable("https://huggingface.co", timeout)


def classifier_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """Key prefixes of the model's classifier (timm's ``pretrained_cfg['classifier']``): dropped on load."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) + ("head_dist.",)


def load_local_weights(model: nn.Module, weights: str) -> None:
    """A local checkpoint into a timm model: Google .npz (ViTs) or a state dict run through the model family's
    own timm converter; heads dropped, every other mismatch an error listing the keys."""
    from timm.models.vision_transformer import VisionTransformer
    path = Path(weights)
    family = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if path.suffix.lower() == ".npz":
        if not isinstance(model, VisionTransformer):
            raise SlcaError(f"--weights {path}: .npz is Google's ViT format; for a {type(model).__name__} use "
                            f".safetensors or a torch state dict")
        from .google_npz import google_vit_state, read_google_npz
        state = google_vit_state(read_google_npz(path))
    else:
        state = read_state_dict(path)
    load_into(model, state, str(path), filter_fn=_tolerant(filter_fn),
              head_prefixes=classifier_prefixes(model) + ("pre_logits.",))


def _tolerant(filter_fn):
    """timm's converters expect their own source formats; when one cannot handle a file that is already in
    timm's layout, the keys go through unchanged (and are checked strictly afterwards)."""
    if filter_fn is None:
        return None

    def apply(state, model):
        try:
            return filter_fn(state, model)
        except Exception:
            return state
    return apply


def create_timm(model_name: str, weights: Optional[str], pretrained: bool, **kwargs) -> nn.Module:
    """timm model without classifier (``forward`` gives pooled features): from ``weights``, from the hub, or
    random with ``pretrained=False`` (``slca eval`` loads the run's own weights next). ``kwargs`` go to timm."""
    if weights or not pretrained:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        if weights:
            load_local_weights(model, weights)
        return model
    repo = hub_id(model_name)
    if not hub_cached(repo) and not hub_reachable():
        reason = "the hub is not reachable and the weights are not in the local cache"
    else:
        try:
            return timm.create_model(model_name, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
    where = f" of {repo}" if repo else ""
    raise SlcaError(f"could not get the weights of {model_name} from the Hugging Face hub ({reason}); offline, pass "
                    f"--weights FILE (.safetensors, .npz or .pth{where}) or fill the hub cache ($HF_HOME, default "
                    f"~/.cache/huggingface)")
