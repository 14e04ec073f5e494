"""The one error type users see: a single line naming the file, line or key at fault."""

from __future__ import annotations

import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 160, 160, 6, 6, 3


class UserError(Exception):
    """Bad input from the user (a file, a config key, a flag). The CLI prints it as one line."""


class RunStopped(Exception):
    """A run stopped on request (SIGTERM) after saving a checkpoint; ``--resume`` continues it exactly."""


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` for an error line: at most ``limit`` characters, cheap even for a huge or deeply nested
    value (a YAML alias bomb, a megabyte string)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str, limit: int = 2000) -> str:
    """An error message as printed: newlines folded, at most ``limit`` characters."""
    text = " ".join(text.split("\n"))
    return text if len(text) <= limit else text[: limit - 3] + "..."
