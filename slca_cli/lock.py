"""One writer per run folder: a lock file naming the process that holds it, taken over when that process is gone.

The lock is ``<seed folder>/.slca.lock``, created atomically (a hard link of a fully written file, so it is never
seen half written) and holding JSON: pid, host, when it started, the command, a random token. A lock is stale when
its process is known to be dead: same machine (host name, boot id and pid namespace all equal) and the pid is not
running or is a newer process with the same pid. A lock from another machine cannot be checked that way, so the
holder touches the file every ``HEARTBEAT_SECONDS`` and a lock untouched for ``STALE_AFTER_SECONDS`` is stale: a
job preempted on one node and restarted on another gets its folder back a few minutes later."""
from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .errors import SlcaError

LOCK_NAME = ".slca.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """Host name + boot id + pid namespace: two processes with equal ids can see each other's pids."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{_read_first_line('/proc/sys/kernel/random/boot_id')}/{namespace}"


def process_start_ticks(pid: int) -> Optional[int]:
    """When ``pid`` started, in clock ticks since boot (Linux), to tell a reused pid from the original."""
    text = _read_first_line(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the whole line; fields[0] here is field 3
    except (IndexError, ValueError):
        return None


def pid_running(pid: int) -> bool:
    if pid <= 0:  # kill(0 or -1, 0) asks about a whole process group, or every process: never one holder
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock for the block; refuses with a SlcaError naming the holder."""

    def __init__(self, folder: Path, log: Callable[[str], None] = print):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.log = log
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    # -- what we write --------------------------------------------------------------------------------------
    def _record(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "machine": machine_id(),
                "process_start": process_start_ticks(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(shlex.quote(a) for a in ["slca"] + sys.argv[1:]), "token": self.token}

    def _try_create(self) -> bool:
        """Create the lock with its content in one step; False when a lock file is already there."""
        tmp = self.folder / f".slca.lock.{os.getpid()}.{self.token[:8]}.tmp"
        tmp.write_text(json.dumps(self._record()) + "\n", encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(tmp.read_text(encoding="utf-8"))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    # -- what we find ---------------------------------------------------------------------------------------
    def _read_holder(self) -> Optional[Dict[str, Any]]:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return holder if isinstance(holder, dict) else None

    def _age(self) -> float:
        try:
            return time.time() - self.path.lstat().st_mtime
        except OSError:
            return 0.0

    def stale_reason(self, holder: Optional[Dict[str, Any]]) -> Optional[str]:
        """Why the lock found on disk may be taken over, or None while its holder may still be running."""
        age = self._age()
        if holder is None:
            return f"unreadable lock file, untouched for {age:.0f} s" if age > 10 else None
        pid = holder.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # slca never writes such a lock
            return f"the lock file names no process (pid {pid!r})"
        if holder.get("machine") == machine_id():
            if not pid_running(pid):
                return f"process {pid} on {holder.get('host')} is no longer running"
            started = holder.get("process_start")
            now = process_start_ticks(pid)
            if started is not None and now is not None and started != now:
                return f"process {pid} on {holder.get('host')} has exited (its pid now belongs to another process)"
            return None
        if age > STALE_AFTER_SECONDS:
            return f"process {pid} on {holder.get('host')} has not touched the lock for {age:.0f} s"
        return None

    def _busy_error(self, holder: Optional[Dict[str, Any]]) -> SlcaError:
        if holder is None:
            who = "another process (the lock file is being written or is unreadable)"
        else:
            who = (f"slca process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}, "
                   f"alive {self._age():.0f} s ago: {holder.get('command')})")
        return SlcaError(f"{self.folder} is in use by {who}; wait for it to finish or choose another --out. If that "
                         f"process is gone, delete {self.path}")

    def _take_over(self, holder: Optional[Dict[str, Any]]) -> bool:
        """Move the stale lock aside; False when someone else replaced it in the meantime (then look again)."""
        aside = self.folder / f".slca.lock.stale.{os.getpid()}.{self.token[:8]}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        moved = None
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            pass
        if holder is not None and (not isinstance(moved, dict) or moved.get("token") != holder.get("token")):
            try:  # we moved a fresh lock of another process: put it back
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # -- public ---------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            if self._try_create():
                self._start_heartbeat()
                return
            holder = self._read_holder()
            reason = self.stale_reason(holder)
            if reason is None:
                if not self.path.exists() and not self.path.is_symlink():
                    continue  # released between our attempts
                raise self._busy_error(holder)
            if self._take_over(holder):
                self.log(f"warning: took over the lock of {self.folder}: {reason}")
        raise SlcaError(f"could not lock {self.folder}: other processes keep creating {self.path}; choose another "
                        f"--out")

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
            self._heartbeat = None
        holder = self._read_holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    os.utime(self.path)
                except OSError:
                    pass
        self._stop.clear()
        self._heartbeat = threading.Thread(target=beat, name="slca-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except OSError:
            # Already failing (e.g. the file system turned read-only): report that first failure, not the lock's;
            # the lock left behind names a dead process and is taken over by the next run.
            if exc_type is None:
                raise
