"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PasError(Exception):
    """A user-facing error: bad input named with what was expected."""
