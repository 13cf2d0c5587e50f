"""Progress on stderr: a tqdm bar on a terminal; on anything else (CI logs, a file) plain lines for the
long stages only, so a run of many minutes is never silent and a short one prints nothing:

- every EVERY seconds of a stage, "stage: done/total units, elapsed s, ETA s" with
  ETA = elapsed * (total - done) / done;
- at its end, when it took at least LINE_AFTER seconds, "stage: done units in elapsed s".

`-q` (QUIET) silences both. Whether quiet or not, `timings()` records each stage's wall time (the
report's `stages`): a stage is a bar's first word ("solve (ilp)" counts as "solve"), summed when it
runs more than once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

QUIET = False
LINE_AFTER = 5.0  # seconds: a shorter stage prints no line on a non-terminal
EVERY = 30.0      # seconds between the lines of a long stage


def enabled() -> bool:
    """Whether a bar is drawn (a terminal and not quiet)."""
    return not QUIET and sys.stderr.isatty()


class _Lines:
    """The non-terminal form of a bar: counts, and prints the lines of the module docstring."""

    def __init__(self, desc: str, total: int | None, unit: str):
        self.desc, self.total, self.unit = desc, total if total and total > 0 else None, unit
        self.done = 0
        self.start = self.last = time.monotonic()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= EVERY:
            self.last = now
            elapsed = now - self.start
            of = f"/{self.total}" if self.total else ""
            eta = (f", ETA {elapsed * (self.total - self.done) / self.done:.0f} s"
                   if self.total and self.done else "")
            log(f"{self.desc}: {self.done}{of} {self.unit}s, {elapsed:.0f} s{eta}")

    def close(self) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed >= LINE_AFTER:
            log(f"{self.desc}: {self.done} {self.unit}s in {elapsed:.1f} s")


# What `bar` yields: advance(n) counts n more units done.
Advance = Callable[[int], object]


def _silent(n: int = 1) -> None:
    """The advance of a quiet run: counts nothing."""


_TIMINGS: list[dict[str, float]] = []


@contextmanager
def timings() -> Iterator[dict[str, float]]:
    """Yields a dict that collects the seconds of every stage (`bar`) ending within the block."""
    found: dict[str, float] = {}
    _TIMINGS.append(found)
    try:
        yield found
    finally:
        _TIMINGS.remove(found)


@contextmanager
def bar(desc: str, total: int | None = None, unit: str = "sample") -> Iterator[Advance]:
    """Yields a callback `advance(n)`: a bar on a terminal, lines elsewhere, nothing when quiet; the
    stage's time goes to every active `timings()`."""
    start = time.monotonic()
    try:
        with _shown(desc, total, unit) as advance:
            yield advance
    finally:
        stage = desc.split()[0] if desc.strip() else desc
        for found in _TIMINGS:
            found[stage] = found.get(stage, 0.0) + time.monotonic() - start


@contextmanager
def _shown(desc: str, total: int | None, unit: str) -> Iterator[Advance]:
    if QUIET:
        yield _silent
        return
    if not enabled():
        lines = _Lines(desc, total, unit)
        yield lines
        lines.close()
        return
    with tqdm(total=total if total and total > 0 else None, desc=desc, unit=unit, file=sys.stderr,
              leave=False, dynamic_ncols=True) as t:
        yield t.update


def log(message: str) -> None:
    """A line of progress on stderr unless quiet."""
    if not QUIET:
        print(message, file=sys.stderr, flush=True)
