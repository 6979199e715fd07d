"""The project's own error type: bad input from the user, as opposed to a bug."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a flag, a file, a model) that the user can fix.

    Command lines turn only this type into a one-line `prog: error: ...` message with exit status 2; any other
    exception keeps its traceback, because it is a bug.
    """


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type name (for one-line error messages)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
