"""Where checkpoints that are not on the Hugging Face hub live: one folder of files named as their authors
publish them, filled by download when online, by hand when not."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from slca_cli.errors import SlcaError

WEIGHTS_DIR_ENV = "SLCA_WEIGHTS_DIR"


def weights_dir() -> Path:
    """``$SLCA_WEIGHTS_DIR``, else ``~/.cache/slca/weights``."""
    return Path(os.environ.get(WEIGHTS_DIR_ENV) or Path.home() / ".cache" / "slca" / "weights").expanduser()


def cached_file(filename: str) -> Path:
    return weights_dir() / filename


def offline() -> bool:
    """The user said so: ``SLCA_OFFLINE`` or the hub's ``HF_HUB_OFFLINE`` set to a true value."""
    return any(os.environ.get(name, "0") not in ("", "0", "false", "False")
               for name in ("SLCA_OFFLINE", "HF_HUB_OFFLINE"))


def reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick connection test, so that offline machines fail at once instead of after minutes of retries."""
    if offline():
        return False
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch(url: str, filename: str, backbone: str) -> Path:
    """The checkpoint ``filename`` from the weights folder, downloaded from ``url`` first when it is missing.

    Offline (or when the download fails) the error says which file to put where, or to pass ``--weights``."""
    target = cached_file(filename)
    if target.is_file():
        return target
    reason: Optional[str] = "no network" if not reachable(url) else None
    if reason is None:
        import torch.hub
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        try:
            torch.hub.download_url_to_file(url, str(partial), progress=True)
            partial.replace(target)
            return target
        except Exception as exc:  # network errors come in many types; the message is what matters
            partial.unlink(missing_ok=True)
            reason = f"download failed: {exc.__class__.__name__}"
    raise SlcaError(f"the weights of {backbone} are not here ({reason}): put {filename} from {url} at {target} "
                    f"(or set ${WEIGHTS_DIR_ENV}), or pass --weights FILE")
