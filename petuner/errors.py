"""The one exception type users see: a bad input, stated in one line before expensive work starts."""


class PetunerError(Exception):
    """A user-facing error; its message is one line naming the bad value and what is allowed.

    The CLI and ``train.py`` print it without a traceback and exit with status 2.
    """


class ConfigError(PetunerError):
    """The composed configuration is invalid."""


def first_line(err: BaseException) -> str:
    """An exception's own message, one line of it (or the exception's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
