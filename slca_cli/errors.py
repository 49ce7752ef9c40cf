"""The one exception type users see: a one-line message naming the problem and the fix."""

_WORKER_MARK = "Original Traceback"


class SlcaError(Exception):
    """Bad input or a damaged file; the CLI prints the message on one line and exits with 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(_unwrap_worker_message(str(message)).split()))


def _unwrap_worker_message(message: str) -> str:
    """A DataLoader worker re-raises our error in the main process as ``SlcaError("Caught SlcaError in
    DataLoader worker process 0.\\nOriginal Traceback ...")``; keep only the original one-line message."""
    if _WORKER_MARK not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    head, sep, original = last.partition(f"{SlcaError.__name__}: ")
    return original if sep else message
