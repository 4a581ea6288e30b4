"""The two kinds of failure the CLI tells apart (DESIGN.md: exit 2 for bad input, 1 for the rest)."""


class CanaryflowError(Exception):
    """Something went wrong that is not the user's input: exit code 1."""

    exit_code = 1


class BadInputError(CanaryflowError):
    """A malformed dataset, an unknown model, a config typo, an oversized request: exit code 2."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """What an exception says, in the one line an error message has room for."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
