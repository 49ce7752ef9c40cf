"""Tolerant but strict weight loading: local files in the common formats, prefixes stripped, heads dropped,
anything else that does not fit is an error that lists the keys."""
from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from slca_cli.errors import SlcaError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "teacher", "module", "net")
PREFIXES = ("module.", "base_encoder.", "backbone.", "model.", "encoder.")
HEAD_PREFIXES = ("head.", "head_dist.", "pre_logits.", "fc.", "classifier.")


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A flat {name: tensor} from .safetensors or a torch file loaded with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise SlcaError(f"--weights {path} does not exist")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise SlcaError(f"--weights {path} is not a readable safetensors file ({exc}); "
                            f"re-download or re-convert it") from None
    if not name.endswith(TORCH_SUFFIXES) and not name.endswith(".pth.tar"):
        raise SlcaError(f"--weights {path}: unknown format; use .safetensors, .npz (Google ViT) or a torch "
                        f"state dict ({', '.join(TORCH_SUFFIXES)})")
    try:
        obj = _load_tensors_only(path)
    except pickle.UnpicklingError as exc:
        raise SlcaError(f"--weights {path} was refused: it holds Python objects beyond tensors, which could run "
                        f"code ({str(exc).splitlines()[0][:160]}); convert it to .safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise SlcaError(f"--weights {path} is not a readable torch checkpoint ({exc.__class__.__name__}); "
                        f"re-download it") from None
    return flatten_checkpoint(obj, path)


def _load_tensors_only(path: Path):
    """``torch.load(weights_only=True)``, also accepting ``argparse.Namespace``: DINO and iBOT full checkpoints
    store their training arguments in one, and rebuilding a Namespace runs no code of the file's choosing."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5
        return torch.load(str(path), map_location="cpu", weights_only=True)
    with safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def select_encoder(state_dict: Dict[str, torch.Tensor], prefixes: Iterable[str], companions: Iterable[str],
                   source: str) -> Dict[str, torch.Tensor]:
    """The sub-module under the first of ``prefixes`` present (e.g. ``module.base_encoder.``), prefix removed.

    Keys outside it must belong to the known ``companions`` of that checkpoint (momentum encoder, projection
    heads); anything else means the file is not what we think, and is an error that lists the keys. A file
    with none of the prefixes is taken as a bare backbone."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            others = sorted(k for k in state_dict if not k.startswith(prefix) and not k.startswith(tuple(companions)))
            if others:
                raise SlcaError(f"weights from {source} have keys outside '{prefix}' that this checkpoint format "
                                f"does not have ({len(others)}): {', '.join(others[:8])}"
                                f"{' ...' if len(others) > 8 else ''}; check that the file is for this --backbone")
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def flatten_checkpoint(obj, path: Path) -> Dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}``-style containers until a dict of tensors remains."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise SlcaError(f"--weights {path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state_dict: Dict[str, torch.Tensor], prefixes: Iterable[str] = PREFIXES):
    """Remove wrapper prefixes (``module.``, ``backbone.``...) that every key shares, repeatedly."""
    prefixes = tuple(prefixes)
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def keep_prefix(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Only the keys under ``prefix`` (e.g. MoCo v3's ``module.base_encoder.``), with it removed."""
    picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return picked or state_dict


def load_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
              filter_fn: Optional[Callable] = None, head_prefixes=HEAD_PREFIXES) -> None:
    """Load ``state_dict`` into ``model``; heads are dropped, every other missing/unexpected key is an error."""
    state_dict = strip_prefixes(state_dict)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head_prefixes)}
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict and not k.startswith(head_prefixes))
    unexpected = sorted(k for k in state_dict if k not in own)
    wrong_shape = sorted(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                         if k in own and v.shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                 if keys]
        raise SlcaError(f"weights from {source} do not fit the backbone: {'; '.join(parts)}; "
                        f"check that the file is for this --backbone")
    model.load_state_dict(state_dict, strict=False)
