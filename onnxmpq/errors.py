"""The two exception types of onnxmpq.

`OnnxmpqError` is a user error: bad input, impossible request. The CLI prints its message (one line,
ending with a hint of what to do) and exits 1, or with `exit_code` when a rule or budget is violated.
`InternalError` is a bug in onnxmpq; it is never caught, so its traceback reaches the bug report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class OnnxmpqError(Exception):
    """A user error: the message says what is wrong; `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message


class ConfigError(OnnxmpqError):
    """A setting with a bad value. `field` is its dotted config path ("search.max_drop"); the message
    names it the way the front end in use does (`option`)."""

    def __init__(self, field: str, problem: str, hint: str | None = None):
        super().__init__(f"{option(field)} {problem}.", f"{hint}." if hint else None)
        self.field, self.problem = field, problem


class ConstraintError(OnnxmpqError):
    """A rule or budget cannot be met (exit code 2)."""

    exit_code = 2


def _field_path(path: str) -> str:
    return path


_NAMER: list[Callable[[str], str]] = [_field_path]


def option(path: str) -> str:
    """How the front end in use names the setting at dotted config path `path`: its flag under the CLI
    (`--max-drop`), the path itself for YAML configs and the Python API (`search.max_drop`)."""
    return _NAMER[-1](path)


@contextmanager
def naming(namer: Callable[[str], str]) -> Iterator[None]:
    """Within the block, settings are named by `namer` (the CLI names them by their flags)."""
    _NAMER.append(namer)
    try:
        yield
    finally:
        _NAMER.pop()


class InternalError(Exception):
    """A bug in onnxmpq, never a user's fault; let it surface with its traceback."""
