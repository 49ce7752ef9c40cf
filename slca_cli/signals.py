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
        # A forked data-loader worker inherited this handler. KeyboardInterrupt makes torch's worker loop exit
        # quietly (status 0); dying by the signal instead would make torch raise "worker killed" in the main
        # process before the main process's own handler could stop the run cleanly.
        raise KeyboardInterrupt
    if _depth > 0:
        if _pending is None:
            _pending = signum
        return
    raise RunInterrupted(signum)


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch gives its workers a SIGTERM handler that dies by the signal unless it
    came from the main process, and the main process then raises "worker killed by signal" (a traceback) over
    our clean stop. A scheduler signals every process of the job, so while a run is guarded the workers use our
    handler instead, and exit quietly."""
    if _owner_pid is not None:
        signal.signal(signal.SIGTERM, _handler)


@contextmanager
def stop_signals_handled() -> Iterator[None]:
    """Install the handlers for the block (main thread only; elsewhere this does nothing)."""
    global _owner_pid, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    previous_owner = _owner_pid
    _owner_pid, _pending = os.getpid(), None
    for s in HANDLED:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _owner_pid = previous_owner


def install_at_startup() -> None:
    """The `slca` process's first act, before torch and the rest are imported (which takes seconds): from here on
    SIGINT / SIGTERM raise ``RunInterrupted``, so a stop while starting ends in one line saying where it was
    (cli.main), never an import's traceback. Main thread only."""
    global _owner_pid
    if threading.current_thread() is not threading.main_thread():
        return
    _owner_pid = os.getpid()
    for s in HANDLED:
        signal.signal(s, _handler)


def interrupt_in_chain(exc: Optional[BaseException]) -> Optional[KeyboardInterrupt]:
    """The KeyboardInterrupt behind ``exc`` (Typer turns one into a silent ``Exit(130)``) that no one has reported
    yet, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return None if getattr(exc, "reported", False) else exc
        exc = exc.__cause__ or exc.__context__
    return None


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


def startup_interrupt_message(stop: BaseException) -> str:
    """One line for a stop outside a seed's run (those name the task and the resume command: guard.py)."""
    import sys
    from . import stages
    name = getattr(stop, "signal_name", "SIGINT")
    command = " ".join(sys.argv[1:2])
    where = stages.describe() if stages.current() else "starting: loading libraries"
    kept = ("what had finished is kept" if "task" in stages.current() else
            "no task was being trained or written, nothing is lost")
    return f"interrupted by {name} during `slca {command}` ({where}); {kept}: run the same command again"
