"""The one exception type users see: a one-line message naming the problem and the fix."""


class SlcaError(Exception):
    """Bad input or a damaged file; the CLI prints the message on one line and exits with 2."""

    def __init__(self, message: str):
        text = str(message)
        if text.startswith("Caught SlcaError in DataLoader worker") and "SlcaError: " in text:
            # torch re-raises a worker's exception with the worker's traceback as its message: keep our line only
            text = text[text.rfind("SlcaError: ") + len("SlcaError: "):]
        super().__init__(" ".join(text.split()))
