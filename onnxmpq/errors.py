"""The two exception types of onnxmpq.

`OnnxmpqError` is a user error: bad input, impossible request. The CLI prints its message (one line,
ending with a hint of what to do) and exits 1, or with `exit_code` when a rule or budget is violated.
`InternalError` is a bug in onnxmpq; it is never caught, so its traceback reaches the bug report.
"""

from __future__ import annotations


class OnnxmpqError(Exception):
    """A user error: the message says what is wrong; `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message


class ConstraintError(OnnxmpqError):
    """A rule or budget cannot be met (exit code 2)."""

    exit_code = 2


class InternalError(Exception):
    """A bug in onnxmpq, never a user's fault; let it surface with its traceback."""
