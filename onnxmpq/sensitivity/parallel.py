"""Spreading a sensitivity sweep over worker processes: the candidates are dealt round-robin to the
workers, each runs the whole probe sweep for its share with onnxruntime threads = cores / workers,
and the tables are merged layer by layer."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence

from onnxmpq import runtime
from onnxmpq.types import Candidate, LayerScores, QuantOptions, Rounding, SensitivityTable


def _worker(threads: int, args: tuple, kwargs: dict) -> list[SensitivityTable]:
    from onnxmpq import sensitivity
    runtime.THREADS = threads
    return sensitivity.measure(*args, **kwargs)


def merge(parts: Sequence[Sequence[SensitivityTable]], candidates: Sequence[Candidate]) -> list[SensitivityTable]:
    """Tables of the same metrics over disjoint candidate sets -> one table per metric."""
    merged = []
    for tables in zip(*parts):
        first = tables[0]
        layers = []
        for rows in zip(*(t.layers for t in tables)):
            found = {k: v for row in rows for k, v in row.scores.items()}
            scores = {c.key: found[c.key] for c in candidates}
            layers.append(LayerScores(rows[0].name, rows[0].op_type, scores, rows[0].extra))
        merged.append(SensitivityTable(first.metric, tuple(c.key for c in candidates), tuple(layers), first.samples,
                                       max(t.time_s for t in tables), first.rounding))
    return merged


def measure(model, batches, metrics: Sequence[str], candidates: Sequence[Candidate], stats, options: QuantOptions,
            rounding: Rounding, *, workers: int = 1, naive: bool = False,
            on_layer: Callable[[str], None] | None = None) -> list[SensitivityTable]:
    """`sensitivity.measure`, on `workers` processes when there are several candidates to share."""
    from onnxmpq import sensitivity
    workers = max(1, min(workers, len(candidates)))
    if workers == 1:
        return sensitivity.measure(model, batches, metrics, candidates, stats, options, rounding, naive, on_layer)
    shares = [list(candidates[i::workers]) for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_worker, threads, (model, batches, metrics, share, stats, options, rounding, naive), {})
                   for share in shares]
        parts = [f.result() for f in futures]
    if on_layer:
        for spec in model.layers:
            on_layer(spec.name)
    return merge(parts, candidates)
