"""Downloading a dataset file from its public address, checked against its published md5."""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from ..errors import SlcaError


def download_file(url: str, dest: Path, md5: Optional[str] = None, show_progress: bool = True) -> Path:
    """``url`` -> ``dest`` through ``dest.part`` (renamed only when complete and its md5 matches)."""
    from ..progress import progress

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SlcaError(f"cannot create {dest.parent} ({exc.strerror}); pass a writable --data-root") from None
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = progress(dest.name, total, "B", enabled=show_progress, unit_scale=True)
            try:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise SlcaError(f"could not download {url} ({reason}); download it on a machine that is online and put "
                        f"it at {dest}") from None
    if md5 and digest.hexdigest() != md5.lower():
        part.unlink(missing_ok=True)
        raise SlcaError(f"the file downloaded from {url} is damaged (md5 {digest.hexdigest()}, expected {md5}); "
                        f"try again, or download it by hand and put it at {dest}")
    part.replace(dest)
    return dest
