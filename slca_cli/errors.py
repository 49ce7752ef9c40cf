"""The one exception type users see: a one-line message naming the problem and the fix."""


class SlcaError(Exception):
    """Bad input or a damaged file; the CLI prints the message on one line and exits with 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
