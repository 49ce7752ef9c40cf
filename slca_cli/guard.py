"""What surrounds one seed's run: the folder lock, clean stops on SIGINT / SIGTERM, and out-of-memory errors
turned into advice. Used by the CLI around ``runner.run_seed``."""
from __future__ import annotations

import errno
import shlex
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import torch

from . import stages
from .checkpoint import STATE_FILE, task_dir_name
from .errors import SlcaError
from .lock import RunLock
from .recovery import tidy_run_folder
from .signals import RunInterrupted, stop_signals_handled

_OOM_TYPES = tuple({t for t in (getattr(torch, "OutOfMemoryError", None),
                                getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None})


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OOM error, or the RuntimeError that older builds, cuDNN and MPS raise for it."""
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same arguments plus ``--resume``."""
    args: List[str] = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return " ".join(shlex.quote(a) for a in ["slca"] + args)


def saved_summary(run_dir: Path) -> str:
    """Which task folders are there (not re-hashed: a stop signal leaves little time)."""
    done = 0
    while (Path(run_dir) / task_dir_name(done) / STATE_FILE).is_file():
        done += 1
    if done == 0:
        return f"no task of {run_dir} had finished"
    last = "task-01" if done == 1 else f"task-01 ... {task_dir_name(done - 1)}"
    return f"{last} of {run_dir} are saved" if done > 1 else f"{last} of {run_dir} is saved"


def interrupt_message(stop: BaseException, seed: int, run_dir: Path, argv: Sequence[str]) -> str:
    """One line: which signal, where the run was, what is saved, and the command that continues it."""
    name = stop.signal_name if isinstance(stop, RunInterrupted) else "SIGINT"
    return (f"interrupted by {name} during seed {seed}, {stages.describe()}; {saved_summary(run_dir)}. "
            f"Resume with: {resume_command(argv)}")


def oom_message(exc: BaseException, seed: int, run_dir: Path, batch_size: int, memory: str, hint: str = "") -> str:
    """Where memory ran out and which flag to lower."""
    where = stages.describe()
    stage = stages.current().get("stage")
    if stage in ("statistics", "evaluate"):
        advice = (f"lower --batch-size (now {batch_size}); it changes the experiment, so use another --out, or "
                  f"free {memory} memory and --resume")
    else:
        advice = (f"lower --batch-size (now {batch_size}; a different experiment, so use another --out) or use "
                  f"--precision bf16, then --resume")
    return f"out of {memory} memory during seed {seed}, {where}; {advice}{hint}. {saved_summary(run_dir)}"


@contextmanager
def guarded_seed(run_dir: Path, seed: int, batch_size: int, log: Callable[[str], None] = print,
                 is_main_process: bool = True, wait_for_everyone: Callable[[], None] = lambda: None
                 ) -> Iterator[None]:
    """Lock ``run_dir`` (repairing what a crash left in it) and turn SIGINT / SIGTERM into ``RunInterrupted``,
    out-of-memory and file-system errors (disk full, permissions) into a one-line SlcaError. With several
    processes (accelerate launch) the main one holds the lock and repairs; the others wait for it."""
    stages.reset()
    try:
        with (RunLock(run_dir, log=log) if is_main_process else nullcontext()), stop_signals_handled(), \
                background_failures_quiet(log):
            if is_main_process:
                for message in tidy_run_folder(run_dir):
                    log(message)
            wait_for_everyone()
            yield
    except MemoryError:
        raise SlcaError(oom_message(MemoryError(), seed, run_dir, batch_size, "host")) from None
    except OSError as exc:
        if exc.errno == errno.ENOMEM:  # e.g. forking loader workers
            raise SlcaError(oom_message(exc, seed, run_dir, batch_size, "host", "; fewer --workers also help")) \
                from None
        what = f"{exc.strerror or exc.__class__.__name__}" + (f": {exc.filename}" if exc.filename else "")
        raise SlcaError(f"{what} during seed {seed}, {stages.describe()}; {saved_summary(run_dir)}. Fix it (free "
                        f"disk space, permissions, --out) and add --resume") from None
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise SlcaError(oom_message(exc, seed, run_dir, batch_size, "GPU")) from None


@contextmanager
def background_failures_quiet(log: Callable[[str], None]) -> Iterator[None]:
    """An exception in a background thread (TensorBoard's event writer on a full disk) prints no traceback: the
    same failure reaches the run through the main thread and is reported there in one line. When the run
    succeeds anyway, each such failure is one warning line."""
    failures: List[str] = []
    previous = threading.excepthook

    def hook(args) -> None:
        if args.exc_type is not SystemExit:
            failures.append(f"{args.thread.name if args.thread else 'a thread'}: "
                            f"{args.exc_type.__name__}: {args.exc_value}")
    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
    for failure in failures:
        log(f"warning: a background thread failed ({failure})")


def stop_exit_code(stop: BaseException) -> int:
    """130 for SIGINT (and a plain KeyboardInterrupt), 143 for SIGTERM."""
    return getattr(stop, "exit_code", 130)
