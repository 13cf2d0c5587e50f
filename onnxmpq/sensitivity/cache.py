"""A persistent cache of sensitivity tables, keyed by what decides them.

key = sha256(model bytes, calibration arrays, settings); an entry is `DIR/<key>.json` holding the key,
the tables and a sha256 checksum of the tables. An entry whose key or checksum does not match, or that
does not parse, is reported and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxmpq import __version__, paths, progress
from onnxmpq.errors import OnnxmpqError
from onnxmpq.types import SensitivityTable
from onnxmpq.write.save import write_json


def cache_key(proto: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], settings: Mapping[str, object]) -> str:
    digest = hashlib.sha256()
    digest.update(proto.SerializeToString(deterministic=True))
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode())
            digest.update(array.tobytes())
    digest.update(json.dumps({**settings, "version": __version__}, sort_keys=True).encode())
    return digest.hexdigest()


def _checksum(tables: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def load(directory: str | Path, key: str, metrics: Sequence[str] = (),
         candidates: Sequence[str] = ()) -> list[SensitivityTable] | None:
    """The cached tables, or None when absent, stale or corrupt (then a line on stderr says so). An entry
    is used only when it is a regular file (a FIFO there never blocks), its key and checksum match, and
    it holds one table per metric in `metrics`, each listing every one of `candidates` and every layer
    scoring some of them (each a number)."""
    path = Path(directory) / f"{key}.json"
    if paths.kind(path) == "nothing":
        return None
    try:
        entry = json.loads(paths.read_regular(path, "sensitivity cache entry", "remove it."))
        if not isinstance(entry, dict) or entry.get("key") != key or entry.get("checksum") != _checksum(entry["tables"]):
            raise ValueError("key or checksum mismatch")
        tables = [SensitivityTable.from_dict(t) for t in entry["tables"]]
        _check_tables(tables, metrics, candidates)
        return tables
    except (OnnxmpqError, ValueError, KeyError, TypeError, AttributeError) as exc:
        progress.log(f"warning: sensitivity cache entry {path.name} is unusable ({exc}); rebuilding it")
        return None


def _check_tables(tables: Sequence[SensitivityTable], metrics: Sequence[str], candidates: Sequence[str]) -> None:
    if metrics and [t.metric for t in tables] != list(metrics):
        raise ValueError(f"it holds metrics {[t.metric for t in tables]}, not {list(metrics)}")
    for table in tables:
        if not set(candidates) <= set(table.candidates):
            raise ValueError(f"it holds candidates {list(table.candidates)}, not all of {list(candidates)}")
        weighted = {c for c in candidates if c.startswith("w")}
        for layer in table.layers:
            # a unit without weights scores only the aN columns, a weighted layer every asked-for wN(aM)
            keys = set(layer.scores)
            if not isinstance(layer.name, str) or not keys or not keys <= set(table.candidates):
                raise ValueError(f"layer {layer.name!r} scores candidates the table does not list")
            if any(k.startswith("w") for k in keys) and not weighted <= keys:
                raise ValueError(f"layer {layer.name!r} does not score {sorted(weighted - keys)}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in layer.scores.values()):
                raise ValueError(f"layer {layer.name!r} has a score that is not a number")


def store(directory: str | Path, key: str, tables: Sequence[SensitivityTable]) -> None:
    """Writes an entry; a folder or special file where the entry belongs is left alone (with a warning)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.json"
    if paths.kind(path) not in ("nothing", "a file"):
        progress.log(f"warning: sensitivity cache entry {path.name} is {paths.kind(path)}; not caching this table")
        return
    data = [t.to_dict() for t in tables]
    write_json({"key": key, "checksum": _checksum(data), "tables": data}, path)
