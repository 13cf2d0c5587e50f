"""A persistent cache of sensitivity tables, keyed by what decides them.

key = sha256(model bytes, calibration arrays, settings); an entry is `DIR/<key>.json` holding the key,
the tables and a sha256 checksum of the tables. An entry whose key or checksum does not match, or that
does not parse, is reported and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from onnxmpq import __version__, progress
from onnxmpq.export import write_json
from onnxmpq.types import SensitivityTable


def cache_key(proto: onnx.ModelProto, batches: Sequence[dict], settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(proto.SerializeToString(deterministic=True))
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode())
            digest.update(array.tobytes())
    digest.update(json.dumps({**settings, "version": __version__}, sort_keys=True).encode())
    return digest.hexdigest()


def _checksum(tables: list[dict]) -> str:
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def load(directory: str | Path, key: str) -> list[SensitivityTable] | None:
    """The cached tables, or None when absent, stale or corrupt (then a line on stderr says so)."""
    path = Path(directory) / f"{key}.json"
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict) or entry.get("key") != key or entry.get("checksum") != _checksum(entry["tables"]):
            raise ValueError("key or checksum mismatch")
        return [SensitivityTable.from_dict(t) for t in entry["tables"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        progress.log(f"warning: sensitivity cache entry {path.name} is unusable ({exc}); rebuilding it")
        return None


def store(directory: str | Path, key: str, tables: Sequence[SensitivityTable]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = [t.to_dict() for t in tables]
    write_json({"key": key, "checksum": _checksum(data), "tables": data}, directory / f"{key}.json")
