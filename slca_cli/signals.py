"""SIGINT / SIGTERM (Ctrl-C, and what schedulers send before preempting a job) stop a run cleanly.

While ``stop_signals_handled()`` is active either signal raises ``RunInterrupted`` in the main thread, except inside
``uninterruptible()`` blocks (checkpoint writes): there the signal is remembered and raised when the block ends,
so a checkpoint being written is finished, never cut in half. The CLI turns ``RunInterrupted`` into the resume
command and exit code 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """A stop signal arrived; ``exit_code`` is what the process should exit with."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)


_owner_pid: Optional[int] = None
_depth = 0
_pending: Optional[int] = None


def _handler(signum, frame) -> None:
    global _pending
    if os.getpid() != _owner_pid:
        # A forked child (a data-loader worker) inherited this handler: behave as Python does by default.
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _depth > 0:
        if _pending is None:
            _pending = signum
        return
    raise RunInterrupted(signum)


@contextmanager
def stop_signals_handled() -> Iterator[None]:
    """Install the handlers for the block (main thread only; elsewhere this does nothing)."""
    global _owner_pid, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    _owner_pid, _pending = os.getpid(), None
    for s in HANDLED:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _owner_pid = None


@contextmanager
def uninterruptible() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block is done; then raise the one that arrived, if any."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        raise
    _depth -= 1
    if _depth == 0 and _pending is not None:
        signum, _pending = _pending, None
        raise RunInterrupted(signum)
