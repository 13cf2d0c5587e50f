"""Progress bars on stderr (tqdm), silent when stderr is not a terminal or when asked to be quiet."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm

QUIET = False


def enabled() -> bool:
    return not QUIET and sys.stderr.isatty()


@contextmanager
def bar(desc: str, total: int | None = None, unit: str = "sample"):
    """Yields a callback `advance(n)`; draws a bar only when `enabled()`."""
    if not enabled():
        yield lambda n=1: None
        return
    with tqdm(total=total if total and total > 0 else None, desc=desc, unit=unit, file=sys.stderr,
              leave=False, dynamic_ncols=True) as t:
        yield t.update


def log(message: str) -> None:
    """A line of progress on stderr unless quiet."""
    if not QUIET:
        print(message, file=sys.stderr)
