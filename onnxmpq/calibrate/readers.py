"""Calibration and evaluation data: pick a reader for a path or object, stream checked batches.

Example:
    >>> source = open_source("calib.npz", inputs, limit=512)
    >>> for batch in source.batches(32):
    ...     session.run(None, dict(batch.inputs))

Readers (registered in `READERS`): "npz", "npy", "folder" (a folder of .npz/.npy), "onnx-test-data"
(test_data_set_*/input_*.pb), "images" (image folder, optional class sub-folders) and "python" (an
object with onnxruntime's CalibrationDataReader interface). The array readers live in `arrays`, the
image reader and `Preprocess` in `images`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onnxmpq import paths
from onnxmpq.calibrate.arrays import (
    ARRAY_SUFFIXES,
    ArrayFolderReader,
    NpyReader,
    NpzReader,
    OnnxTestDataReader,
    add_batch_axis,
    find_test_sets,
    rebatch,
)
from onnxmpq.calibrate.images import IMAGE_SUFFIXES, ImageFolderReader, Preprocess, has_images
from onnxmpq.errors import OnnxmpqError, option
from onnxmpq.registry import Registry
from onnxmpq.types import Batch, InputSpec

__all__ = ["READERS", "DataSource", "Preprocess", "check_batch", "detect_reader", "open_source"]

_EXPECTED = "a .npz or .npy file, a folder of them, an ONNX test-data folder, or an image folder"


class DataSource(Protocol):
    """A stream of batches; iterating it twice yields the same data (except non-rewindable objects)."""

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yields batches of `batch_size` samples (the last may be smaller), loading one at a time."""
        ...

    def __len__(self) -> int:
        """Number of samples, or 0 when unknown (Python readers without __len__).

        Python's len() rejects negative values, so "unknown" is 0: a source that really has no
        samples is an error when iterated, never a valid empty source.
        """
        ...


class Reader(DataSource, Protocol):
    """What `READERS` holds the classes of: a data source opened on a path (a Python object for "python")."""

    @classmethod
    def open(cls, source: Any, inputs: Sequence[InputSpec], *, limit: int | None = None,
             preprocess: Preprocess | None = None, labels_key: str = "labels") -> Reader: ...


READERS: Registry[type[Reader]] = Registry("data reader")


def _dims(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _check_dtype(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Returns `array` in the model's dtype: equal, float->float, or a safe integer widening."""
    want = np.dtype(spec.dtype)
    if array.dtype == want:
        return array
    floats = np.issubdtype(array.dtype, np.floating) and np.issubdtype(want, np.floating)
    ints = np.issubdtype(array.dtype, np.integer) and np.issubdtype(want, np.integer)
    if floats or (ints and np.can_cast(array.dtype, want, "safe")):
        with np.errstate(over="ignore"):
            return array.astype(want)
    raise OnnxmpqError(
        f"input {spec.name!r} has dtype {array.dtype} but the model expects {want}.",
        f"convert the data to {want} (already normalised as the model expects); "
        "image files are converted for you by the images reader.",
    )


def _check_array(value: Any, spec: InputSpec) -> np.ndarray:
    array = np.asarray(value)
    expected = _dims(spec.shape)
    if array.ndim != len(spec.shape):
        raise OnnxmpqError(
            f"input {spec.name!r} has rank {array.ndim} (shape {array.shape}) but the model expects "
            f"rank {len(spec.shape)} {expected}.",
            "store the samples along dim 0 with the model's per-sample shape.",
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
        if axis > 0 and want is not None and got != want:
            raise OnnxmpqError(
                f"input {spec.name!r} has size {got} in dim {axis} (shape {array.shape}) but the model "
                f"expects {want} {expected}.",
                "resize or reshape the data to the model's input shape.",
            )
    if array.dtype.hasobject or array.dtype.kind not in "biuf":
        raise OnnxmpqError(f"input {spec.name!r} has non-numeric dtype {array.dtype}.",
                           "give numeric numpy arrays.")
    array = _check_dtype(array, spec)
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise OnnxmpqError(f"input {spec.name!r} has {bad} NaN/Inf value(s) (of {array.size}).",
                               "clean the data; NaN/Inf would poison the calibration ranges.")
    return array


def check_batch(batch: Mapping[str, Any], inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Validates one batch against the model inputs and returns the arrays in the model's dtypes.

    Args:
        batch: input name -> array (dim 0 is the batch and may have any size).
        inputs: the model's inputs.

    Returns:
        input name -> array, in the order of `inputs`; float data is cast to the model's float dtype
        (e.g. float64 -> float32), integer data widened when that is safe.

    Raises:
        OnnxmpqError: a model input is missing or a key is unexpected; an array's rank, a static dim
            other than dim 0, or its dtype does not match (integer data for a float input included);
            float data has NaN or Inf values.
    """
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in batch]
    unexpected = [k for k in batch if k not in names]
    if missing or unexpected:
        parts = [f"missing input(s) {', '.join(map(repr, missing))}" if missing else "",
                 f"unexpected key(s) {', '.join(map(repr, unexpected))}" if unexpected else ""]
        raise OnnxmpqError(
            f"data does not match the model inputs: {'; '.join(p for p in parts if p)}.",
            f"the model's inputs are: {', '.join(names)}; name the arrays after them.",
        )
    return {spec.name: _check_array(batch[spec.name], spec) for spec in inputs}


def _check_labels(labels: Any, size: int) -> np.ndarray | None:
    if labels is None:
        return None
    array: np.ndarray = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer) or array.shape != (size,):
        raise OnnxmpqError(
            f"labels must be {size} integer class indices for a batch of {size}, got dtype {array.dtype} "
            f"and shape {array.shape}.",
            "give one integer label per sample.",
        )
    return array


@dataclass(frozen=True)
class CheckedSource:
    """What `open_source` returns: a reader whose batches are checked against the model inputs.

    Attributes:
        reader: the underlying reader (e.g. `ImageFolderReader`, which has `classes`).
        inputs: the model inputs every batch is checked against.
        limit: the maximum number of samples to yield, or None for all.
    """

    reader: Any
    inputs: tuple[InputSpec, ...]
    limit: int | None = None

    @property
    def fixed_batch(self) -> int | None:
        """The batch size every model input declares statically on dim 0 (an export at batch 1), if any."""
        sizes = {spec.shape[0] for spec in self.inputs if spec.shape}
        return next(iter(sizes)) if len(sizes) == 1 and isinstance(next(iter(sizes)), int) else None

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yields checked batches of `batch_size` samples, stopping after `limit` samples; a model whose
        inputs fix the batch size gets batches of that size whatever is asked (every stage feeds it)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OnnxmpqError(f"batch size must be a positive integer, got {batch_size!r}.", "use e.g. 32.")
        batch_size = self.fixed_batch or batch_size
        limit, seen = self.limit, 0
        for batch in self.reader.batches(batch_size if limit is None else min(batch_size, limit)):
            arrays = {k: np.asarray(v) for k, v in batch.inputs.items()}
            size, labels = (Batch(arrays).size if arrays else 0), batch.labels
            if limit is not None and seen + size > limit:
                size = limit - seen
                arrays = {k: v[:size] for k, v in arrays.items()}
                labels = None if labels is None else np.asarray(labels)[:size]
            yield Batch(check_batch(arrays, self.inputs), _check_labels(labels, size))
            seen += size
            if limit is not None and seen >= limit:
                return
        if not seen:
            raise OnnxmpqError(f"the data source ({type(self.reader).__name__}) yielded no samples.",
                               "check that the data is not empty.")

    def __len__(self) -> int:
        """Number of samples that `batches` yields, capped by `limit`; 0 when unknown."""
        n = len(self.reader)
        return n if self.limit is None else min(n, self.limit)


class PythonReader:
    """Wraps an object with `get_next()` (dict of input name -> array, or None at the end).

    The dicts are concatenated along dim 0 into batches; a `labels_key` entry that is not a model
    input becomes the labels. If the object has `rewind()`, every `batches()` call rewinds it first;
    otherwise it can be iterated only once.
    """

    def __init__(self, obj: Any, inputs: Sequence[InputSpec], labels_key: str):
        self.obj = obj
        self.inputs = tuple(inputs)
        self.labels_key = labels_key
        self._used = False

    @classmethod
    def open(cls, source: Any, inputs: Sequence[InputSpec], *, limit: int | None = None,
             preprocess: Preprocess | None = None, labels_key: str = "labels") -> PythonReader:
        if not callable(getattr(source, "get_next", None)):
            raise OnnxmpqError(f"{type(source).__name__} object has no get_next() method.",
                               "pass an onnxruntime CalibrationDataReader-like object, or a data path.")
        return cls(source, inputs, labels_key)

    def __len__(self) -> int:
        """len() of the wrapped object when it has one, else 0 (unknown)."""
        try:
            return max(0, len(self.obj))
        except TypeError:
            return 0

    def _chunks(self) -> Iterator[Batch]:
        names = {s.name for s in self.inputs}
        while (item := self.obj.get_next()) is not None:
            if not isinstance(item, Mapping):
                raise OnnxmpqError(f"get_next() returned a {type(item).__name__}, not a dict.",
                                   "return {input name: array} per call, and None at the end.")
            arrays = {k: np.asarray(v) for k, v in item.items() if k in names or k != self.labels_key}
            labels = item.get(self.labels_key) if self.labels_key not in names else None
            yield Batch(add_batch_axis(arrays, self.inputs), None if labels is None else np.asarray(labels).reshape(-1))

    def batches(self, batch_size: int) -> Iterator[Batch]:
        rewind = getattr(self.obj, "rewind", None)
        if callable(rewind):
            rewind()
        elif self._used:
            raise OnnxmpqError(
                f"the Python data reader ({type(self.obj).__name__}) cannot be rewound to read it again.",
                "give it a rewind() method, or pass a path to the data instead.",
            )
        self._used = True
        return rebatch(self._chunks(), batch_size)


READERS.register("npz")(NpzReader)
READERS.register("npy")(NpyReader)
READERS.register("folder")(ArrayFolderReader)
READERS.register("onnx-test-data")(OnnxTestDataReader)
READERS.register("images")(ImageFolderReader)
READERS.register("python")(PythonReader)


def _describe(folder: Path) -> str:
    """A short inventory of a folder for error messages, e.g. "3 .txt files, 2 sub-folders"."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries:
        return "it is empty"
    dirs = sum(p.is_dir() for p in entries)
    kinds = Counter(p.suffix.lower() or "no-extension" for p in entries if not p.is_dir())
    parts = [f"{n} {kind} file(s)" for kind, n in sorted(kinds.items())]
    if dirs:
        parts.append(f"{dirs} sub-folder(s) without images")
    return "found " + ", ".join(parts)


def _detect_path(path: Path) -> str:
    if not path.exists():
        raise OnnxmpqError(f"data path {str(path)!r} does not exist.", f"pass {_EXPECTED}.")
    if not path.is_file() and not path.is_dir():
        raise OnnxmpqError(f"data path {str(path)!r} is {paths.kind(path)}, not a file or folder.", f"pass {_EXPECTED}.")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in ARRAY_SUFFIXES:
            return suffix[1:]
        raise OnnxmpqError(f"data file {str(path)!r} is not a .npz or .npy file.",
                           f"pass {_EXPECTED} (image files go in a folder).")
    if find_test_sets(path):
        return "onnx-test-data"
    if any(p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES for p in path.iterdir()):
        return "folder"
    if has_images(path):
        return "images"
    raise OnnxmpqError(
        f"data folder {str(path)!r} holds no usable data ({_describe(path)}).",
        f"expected .npz/.npy files, test_data_set_*/input_*.pb, or images ({', '.join(IMAGE_SUFFIXES)}) "
        "directly or in class sub-folders.",
    )


def detect_reader(path_or_object: Any) -> str:
    """The name of the reader for a path (by file type and folder contents) or a Python object."""
    if isinstance(path_or_object, (str, os.PathLike)):
        return _detect_path(Path(path_or_object))
    if callable(getattr(path_or_object, "get_next", None)):
        return "python"
    raise OnnxmpqError(f"cannot read data from a {type(path_or_object).__name__}.",
                       f"pass {_EXPECTED}, or an object with get_next().")


def _check_batch_first(inputs: Sequence[InputSpec]) -> None:
    """Every input carries the samples on dim 0. An input whose dim 0 is fixed while another input's is
    dynamic holds its batch elsewhere (a recurrent state [layers, N, hidden]): refused with its axis."""
    if not any(spec.shape and spec.shape[0] is None for spec in inputs):
        return
    for spec in inputs:
        if spec.shape and spec.shape[0] is not None and None in spec.shape[1:]:
            axis = spec.shape.index(None, 1)
            raise OnnxmpqError(
                f"model input {spec.name!r} has shape {_dims(spec.shape)}: its dim 0 is fixed while other inputs "
                f"have a dynamic batch, so its samples run along axis {axis}; onnxmpq feeds every input with the "
                "samples on dim 0.",
                f"export the model with {spec.name!r} batch-first (a Transpose inside the model), or quantize "
                f"without {option('data.calib')} (weights only).")


def open_source(path_or_object: Any, inputs: Sequence[InputSpec], *, limit: int | None = None,
                preprocess: Preprocess | None = None, reader: str | None = None,
                labels_key: str = "labels") -> CheckedSource:
    """Opens calibration or evaluation data with the reader that fits it.

    Args:
        path_or_object: a .npz file, a .npy file, a folder of .npz/.npy, a folder containing
            test_data_set_* sub-folders (or one test_data_set folder with input_*.pb), an image folder
            (.jpg/.jpeg/.png/.bmp/.webp directly or in class sub-folders), or an object with get_next().
        inputs: the model inputs; every batch is checked against them.
        limit: the maximum number of samples (image folders with classes spread it over the classes).
        preprocess: image preprocessing (image folders only); None uses `Preprocess()`.
        reader: a reader name from `READERS` to use instead of detecting one.
        labels_key: the key of the integer labels in .npz files and get_next() dicts.

    Returns:
        A `DataSource` whose batches are checked with `check_batch`.

    Raises:
        OnnxmpqError: the path is missing, empty or of no known kind; the data does not fit `inputs`.
    """
    inputs = tuple(inputs)
    if not inputs:
        raise OnnxmpqError("the model has no inputs to feed data to.", "check the model's graph inputs.")
    _check_batch_first(inputs)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise OnnxmpqError(f"the sample limit must be a positive integer, got {limit!r}.", "use e.g. 512.")
    name = reader or detect_reader(path_or_object)
    cls = READERS.get(name)
    if name != "python" and not isinstance(path_or_object, (str, os.PathLike)):
        raise OnnxmpqError(f"reader {name!r} reads a path, got a {type(path_or_object).__name__}.",
                           "pass a path, or use reader='python' for objects with get_next().")
    source = path_or_object if name == "python" else Path(path_or_object)
    opened = cls.open(source, inputs, limit=limit, preprocess=preprocess, labels_key=labels_key)
    return CheckedSource(opened, inputs, limit)
