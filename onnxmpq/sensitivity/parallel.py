"""Spreading a sensitivity sweep over workers: the candidates are dealt round-robin to the workers,
each runs the whole probe sweep for its share with onnxruntime threads = cores / workers, and the
tables are merged layer by layer.

Executors: `process` (local worker processes) and `ray` (Ray tasks: `ray.init(address=...)` joins a
running cluster when an address is given or RAY_ADDRESS is set, else starts a local one), so a sweep
can use every machine of a cluster. Ray is an optional dependency (`pip install ray`)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from onnxmpq import sensitivity
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import runtime
from onnxmpq.sensitivity.probe import Only
from onnxmpq.types import Candidate, LayerScores, Probes, QuantOptions, Rounding, SensitivityTable


def _worker(threads: int, args: tuple, kwargs: dict) -> list[SensitivityTable]:
    runtime.THREADS = threads
    return sensitivity.measure(*args, **kwargs)


def _on_ray(jobs, address: str | None) -> list[list[SensitivityTable]]:
    """Runs each job as a Ray task (one CPU each) and gathers the results in order."""
    try:
        import ray
    except ImportError:
        raise OnnxmpqError("--executor ray needs the ray package.", "pip install ray, or use --executor process.") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(_worker)
        return ray.get([task.remote(1, job, {}) for job in jobs])
    finally:
        if started:
            ray.shutdown()


def merge(parts: Sequence[Sequence[SensitivityTable]], candidates: Sequence[Candidate]) -> list[SensitivityTable]:
    """Tables of the same metrics over disjoint candidate sets -> one table per metric (rows by unit name,
    in the order the first part that has a unit lists it; `candidates` first, then the units' own)."""
    merged = []
    for tables in zip(*parts):
        first = tables[0]
        rows: dict[str, LayerScores] = {}
        for table in tables:
            for row in table.layers:
                old = rows.get(row.name)
                rows[row.name] = row if old is None else LayerScores(
                    old.name, old.op_type, {**old.scores, **row.scores}, old.extra or row.extra)
        keys = tuple(dict.fromkeys([c.key for c in candidates] + [k for t in tables for k in t.candidates]))
        ordered = tuple(LayerScores(r.name, r.op_type, {k: r.scores[k] for k in keys if k in r.scores}, r.extra)
                        for r in rows.values())
        merged.append(SensitivityTable(first.metric, keys, ordered, first.samples,
                                       max(t.time_s for t in tables), first.rounding, first.probes))
    return merged


def measure(model, batches, metrics: Sequence[str], candidates: Sequence[Candidate], stats, options: QuantOptions,
            rounding: Rounding, *, workers: int = 1, naive: bool = False, executor: str = "process",
            address: str | None = None, on_layer: Callable[[str], object] | None = None,
            probes: Probes = Probes.EXACT, only: Only = None) -> list[SensitivityTable]:
    """`sensitivity.measure`, on `workers` processes or Ray tasks when there are several candidates; fast
    probes run in this process (their cost is per unit: splitting the candidates would not share it)."""
    workers = max(1, min(workers, len(candidates)))
    if (workers == 1 and executor == "process") or probes == Probes.FAST:
        return sensitivity.measure(model, batches, metrics, candidates, stats, options, rounding, naive, on_layer,
                                   probes=probes, only=only)
    shares = [list(candidates[i::workers]) for i in range(workers)]
    acts = [c.act_bits for c in candidates]
    jobs = [(model, batches, metrics, share, stats, options, rounding, naive, None, acts if i == 0 else (), probes,
             only)
            for i, share in enumerate(shares)]
    if executor == "ray":
        parts = _on_ray(jobs, address)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = [f.result() for f in [pool.submit(_worker, threads, job, {}) for job in jobs]]
    if on_layer:
        for unit in model.points(options).units:
            on_layer(unit.name)
    return merge(parts, candidates)
