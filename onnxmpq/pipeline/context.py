"""One run's shared state, built once per invocation and handed to every stage.

`RunContext(model, calib, limit=256, holdout=True)` reads the data once (at most `limit` + HELD_OUT
samples, checked against the model's inputs) and keeps it in memory as two `Samples`:

    calibration = samples[:limit]              (statistics, sensitivity probes, GPTQ)
    held_out    = samples[limit:limit + HELD_OUT]   (verification, --max-drop, the threshold search, Pareto)

When the data has no sample beyond `limit`, the last fifth of it (at most HELD_OUT) is held out
instead, so a written model is never scored on the samples it was fitted to; with fewer than MIN_SPLIT
samples nothing is held out and the judge scores the calibration samples (`Fidelity.held_out` says so).
Without `holdout` every sample read calibrates.

Besides the data the context owns:
- the model, specialised once for the data's shapes (MACs and BitOps of dynamic dims count the real
  input size, the same in the problem, the report and the budget check);
- activation statistics, collected in one float pass per set of tensor groups and memoised per group;
- the float model's outputs on the held-out samples (`judge`), computed once.

`passes` counts the work done (data reads, statistics passes, float reference runs) for tests and
the report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from onnxmpq import calibrate, progress
from onnxmpq.calibrate.readers import DataSource, Preprocess
from onnxmpq.errors import OnnxmpqError, option
from onnxmpq.graph import model as graph
from onnxmpq.graph.model import Model
from onnxmpq.pipeline.config import DEFAULT_LIMIT
from onnxmpq.types import Batch, QuantOptions, TensorStats
from onnxmpq.verify.judge import Judge

HELD_OUT = 256        # held-out samples at most
MIN_SPLIT = 5         # fewer samples than this are not split
READ_BATCH = 64

StatsKey = tuple[str, tuple[str, ...], int | None]   # a tensor group: name, members, Softmax axis


@dataclass(frozen=True)
class Samples:
    """Checked samples held in memory; a DataSource. `chunks` are runs of samples of one shape each
    (input name -> array with the samples on dim 0): a folder of test cases may mix sizes.

    `batches(n)` re-cuts them into batches of n (of `fixed_batch` for a model whose inputs fix it)."""

    chunks: tuple[Mapping[str, np.ndarray], ...]
    fixed_batch: int | None = None

    def __len__(self) -> int:
        return sum(_count(c) for c in self.chunks)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OnnxmpqError(f"batch size must be a positive integer, got {batch_size!r}.", "use e.g. 32.")
        step = self.fixed_batch or batch_size
        for chunk in self.chunks:
            for start in range(0, _count(chunk), step):
                yield Batch({k: v[start:start + step] for k, v in chunk.items()})

    def feeds(self, batch_size: int = READ_BATCH) -> list[dict[str, np.ndarray]]:
        return [dict(b.inputs) for b in self.batches(batch_size)]

    def first(self) -> dict[str, np.ndarray]:
        """The first sample as a feed of batch 1."""
        return {k: v[:1] for k, v in self.chunks[0].items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The first sample's input shapes."""
        return {k: tuple(v.shape) for k, v in self.chunks[0].items()}

    def slice(self, start: int, stop: int) -> Samples:
        """Samples start..stop-1, in order."""
        out, seen = [], 0
        for chunk in self.chunks:
            n = _count(chunk)
            lo, hi = max(start - seen, 0), min(stop - seen, n)
            if lo < hi:
                out.append({k: v[lo:hi] for k, v in chunk.items()})
            seen += n
        return Samples(tuple(out), self.fixed_batch)

    @classmethod
    def gather(cls, batches: Iterable[Batch], count: int, fixed_batch: int | None = None) -> Samples:
        """The first `count` samples of `batches`, consecutive batches of one shape joined."""
        runs: list[dict[str, list[np.ndarray]]] = []
        seen = 0
        for batch in batches:
            take = min(batch.size, count - seen)
            arrays = {k: v[:take] for k, v in batch.inputs.items()}
            if not runs or any(runs[-1][k][0].shape[1:] != v.shape[1:] for k, v in arrays.items()):
                runs.append({k: [] for k in arrays})
            for k, v in arrays.items():
                runs[-1][k].append(v)
            seen += take
            if seen >= count:
                break
        return cls(tuple({k: np.concatenate(v) for k, v in run.items()} for run in runs), fixed_batch)


def _count(chunk: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(chunk.values())).shape[0]) if chunk else 0


def split_sizes(read: int, limit: int, holdout: bool) -> tuple[int, int]:
    """(calibration, held-out) sample counts for `read` samples read with at most `limit` calibrating."""
    if not holdout:
        return min(read, limit), 0
    if read > limit:
        return limit, min(read - limit, HELD_OUT)
    held = min(HELD_OUT, read // 5) if read >= MIN_SPLIT else 0
    return read - held, held


class RunContext:
    """The model, the data and what is computed from them once per run (see the module docstring)."""

    def __init__(self, model: Model, calib: object = None, *, limit: int | None = None, holdout: bool = False,
                 preprocess: Preprocess | None = None, batch_size: int = 32):
        self.limit = DEFAULT_LIMIT if limit is None else limit
        if self.limit < 1:
            raise OnnxmpqError(f"limit must be at least 1 sample, got {self.limit}.", "use e.g. 256.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OnnxmpqError(f"batch size must be a positive integer, got {batch_size!r}.", "use e.g. 32.")
        self.batch_size = batch_size
        self.passes: Counter[str] = Counter()
        self._stats: dict[StatsKey, TensorStats] = {}
        self.calibration: Samples | None = None
        self.held_out: Samples | None = None
        self.model = model
        if calib is None:
            return
        samples = self._read(calibrate.read(calib, model, preprocess=preprocess),
                             self.limit + (HELD_OUT if holdout else 0))
        used, held = split_sizes(len(samples), self.limit, holdout)
        self.calibration = samples.slice(0, used)
        self.held_out = samples.slice(used, used + held) if held else None
        self.model = graph.specialize(model, samples.shapes())

    def _read(self, source: DataSource, count: int) -> Samples:
        """The first `count` samples of `source`, read in one pass."""
        self.passes["read"] += 1
        samples = Samples.gather(source.batches(min(READ_BATCH, count)), count, getattr(source, "fixed_batch", None))
        if not len(samples):
            raise OnnxmpqError("the calibration set is empty.", "give at least one sample (256 is a good default).")
        return samples

    @property
    def has_data(self) -> bool:
        return self.calibration is not None

    def require_data(self, what: str) -> Samples:
        """The calibration samples, or a clear error naming `what` needs them."""
        if self.calibration is None:
            raise OnnxmpqError(f"{what} needs calibration data.", f"pass calibration data ({option('data.calib')}).")
        return self.calibration

    def stats(self, options: QuantOptions, names: Iterable[str] | None = None) -> dict[str, TensorStats]:
        """Statistics of the tensor groups the named units read or write (every group when `names` is
        None). The first call collects every group of the model's points in one float pass; later calls
        collect only groups not seen yet."""
        points = self.model.points(options)
        wanted = points.groups() if names is None else points.groups_of(names)
        if not wanted:
            return {}
        def key(group: str, members: Sequence[str]) -> StatsKey:
            return group, tuple(members), points.logits.get(group)

        missing = {g: m for g, m in points.groups().items() if key(g, m) not in self._stats}
        if any(key(g, m) not in self._stats for g, m in wanted.items()):
            source = self.require_data("quantizing activations")
            self.passes["stats"] += 1
            with progress.bar("calibrate", len(source)) as advance:
                found = calibrate.collect(self.model, source, missing, batch_size=self.batch_size,
                                          on_batch=advance, logits=points.logits)
            self._stats.update({key(g, missing[g]): s for g, s in found.items()})
        return {g: self._stats[key(g, m)] for g, m in wanted.items()}

    @cached_property
    def judge(self) -> Judge:
        """Scores models against the float model's outputs on the held-out samples (computed once)."""
        samples = self.held_out or self.require_data("scoring a model")
        self.passes["reference"] += 1
        return Judge(self.model.proto, samples.feeds(self.batch_size), held_out=self.held_out is not None)

    def first(self) -> dict[str, np.ndarray]:
        """One sample (batch 1), for timing."""
        return (self.held_out or self.require_data("timing a model")).first()
