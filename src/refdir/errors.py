"""One error type for bad input: the CLI prints its message alone, with no traceback."""


class RefdirError(Exception):
    """A user-facing error with one clear message."""
