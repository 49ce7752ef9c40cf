"""Progress on stderr: tqdm bars on a terminal, one plain line per epoch and per stage otherwise (CI, SLURM,
``nohup``, ``| tee``), where carriage-return bars would pile up as one growing line per update.

``--progress auto|bar|lines|off`` sets the mode once per command (``configure``); every progress display of the
package goes through ``progress(...)``, so the mode holds everywhere without passing it through each call.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, List, Optional

from .errors import SlcaError
from .stages import mark

MODES = ("auto", "bar", "lines", "off")
_mode = "auto"


def configure(mode: str) -> str:
    """Set the mode for this process; returns it resolved (``auto``: bars when stderr is a terminal, else lines)."""
    global _mode
    if mode not in MODES:
        raise SlcaError(f"--progress must be one of {', '.join(MODES)}, got '{mode}'")
    _mode = mode
    return resolved_mode()


def resolved_mode(stream=None) -> str:
    if _mode != "auto":
        return _mode
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def format_seconds(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class _Lines:
    """Plain lines: ``epoch_done`` prints one per epoch (loss, images/s, ETA of the stage); ``close`` one per stage
    that had no epoch lines (images, images/s, seconds)."""

    def __init__(self, desc: str, total: Optional[int], unit: str, epochs: Optional[int], stream):
        self.desc, self.total, self.unit, self.epochs, self.stream = desc, total, unit, epochs, stream
        self.started = self.epoch_started = time.perf_counter()
        self.count = self.images = self.epoch_images = 0
        self.epoch_lines = 0
        self.first_epoch = 0
        self.postfix = {}

    def update(self, n: int = 1, images: int = 0) -> None:
        self.count += n
        self.images += images
        self.epoch_images += images

    def set_postfix(self, **values) -> None:
        self.postfix.update(values)

    def start_at_epoch(self, epoch: int) -> None:
        """A resumed stage: the epochs before ``epoch`` were done by an earlier process (not part of the ETA)."""
        self.first_epoch = epoch

    def epoch_done(self, epoch: int, loss: float) -> None:
        now = time.perf_counter()
        took = now - self.epoch_started
        rate = self.epoch_images / took if took > 0 else 0.0
        parts = [f"{self.desc}: epoch {epoch + 1}/{self.epochs}", f"loss {loss:.4f}"]
        if self.epoch_images:
            parts.append(f"{rate:.1f} images/s")
        done = epoch + 1 - self.first_epoch
        parts.append(f"ETA {format_seconds((now - self.started) / done * (self.epochs - epoch - 1))}")
        self._write(", ".join(parts))
        self.epoch_lines += 1
        self.epoch_started, self.epoch_images = now, 0

    def close(self) -> None:
        if self.epoch_lines:
            return
        took = time.perf_counter() - self.started
        amount = f"{self.count / 2**20:.1f} MB" if self.unit == "B" else \
            f"{self.count} {self.unit}{'s' if self.count != 1 else ''}"
        parts = [f"{self.desc}: {amount}"]
        if self.images:
            parts.append(f"{self.images} images" + (f", {self.images / took:.1f} images/s" if took > 0 else ""))
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"{took:.1f} s")
        self._write(", ".join(parts))

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class _Bar:
    """A tqdm bar (``leave=False``: it disappears when done)."""

    def __init__(self, desc: str, total: Optional[int], unit: str, unit_scale: bool):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, file=sys.stderr)

    def update(self, n: int = 1, images: int = 0) -> None:
        self.bar.update(n)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def start_at_epoch(self, epoch: int) -> None:
        pass

    def epoch_done(self, epoch: int, loss: float) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


class _Off:
    def update(self, n: int = 1, images: int = 0) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def start_at_epoch(self, epoch: int) -> None:
        pass

    def epoch_done(self, epoch: int, loss: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress(desc: str, total: Optional[int] = None, unit: str = "batch", *, enabled: bool = True,
             epochs: Optional[int] = None, unit_scale: bool = False):
    """A progress display in the configured mode; ``enabled=False`` (``--no-progress``, or not the main process)
    shows nothing. Call ``update(n, images=...)`` per step, ``epoch_done(epoch, loss)`` per epoch, ``close()``."""
    mode = resolved_mode()
    if not enabled or mode == "off":
        return _Off()
    if mode == "bar":
        return _Bar(desc, total, unit, unit_scale)
    return _Lines(desc, total, unit, epochs, sys.stderr)


def iterate(iterable, desc: str, total: Optional[int] = None, unit: str = "batch", *, enabled: bool = True,
            images=None):
    """Yield from ``iterable`` under a progress display; ``images(item)`` counts the images of an item."""
    display = progress(desc, total if total is not None else _length(iterable), unit, enabled=enabled)
    try:
        for item in iterable:
            yield item
            display.update(1, images(item) if images else 0)
    finally:
        display.close()


def _length(iterable) -> Optional[int]:
    try:
        return len(iterable)
    except TypeError:
        return None


def alignment_progress(task: int, bar, losses: List[float]) -> Callable[[int, float], None]:
    """The callback of one task's alignment: stage mark, loss record, progress bar with the epoch's loss."""
    def on_epoch(epoch: int, loss: float) -> None:
        mark("align", task=task + 1, epoch=epoch + 1)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    return on_epoch
