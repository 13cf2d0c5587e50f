"""Readers of stored arrays: .npz, .npy, folders of them, and ONNX test-data folders (input_*.pb).

All of them stream. A .npy file is memory-mapped; a .npz member is read block by block straight out of
the zip (compressed or not); the blocks are then re-cut into batches of the requested size by `rebatch`.
Pickled (object) arrays are never loaded.
"""

from __future__ import annotations

import contextlib
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.lib.format as npformat
import onnx
from onnx import numpy_helper

from onnxmpq import paths
from onnxmpq.errors import OnnxmpqError, option
from onnxmpq.types import Batch, InputSpec

ARRAY_SUFFIXES = (".npz", ".npy")


def _expected_ranks(inputs: Sequence[InputSpec]) -> dict[str, int]:
    return {s.name: len(s.shape) for s in inputs}


def add_batch_axis(arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Gives a batch axis to arrays stored as one sample (rank one below the model input's rank)."""
    ranks = _expected_ranks(inputs)
    return {k: a[None] if ranks.get(k) == a.ndim + 1 else a for k, a in arrays.items()}


def _batch_size(batch: Batch) -> int:
    sizes: dict[str, int | None] = {k: (a.shape[0] if a.ndim else None) for k, a in batch.inputs.items()}
    distinct = set(sizes.values())
    size = distinct.pop() if len(distinct) == 1 else None
    if size is None:
        listed = ", ".join(f"{k}: {tuple(batch.inputs[k].shape)}" for k in sizes)
        raise OnnxmpqError(f"the arrays of one batch disagree on the number of samples (dim 0): {listed}.",
                           "store every input (and the labels) with the samples along dim 0.")
    if batch.labels is not None and np.shape(batch.labels)[:1] != (size,):
        raise OnnxmpqError(f"there are {np.shape(batch.labels)} labels for {size} samples.",
                           "give exactly one integer label per sample.")
    return size


def _same_layout(a: Batch, b: Batch) -> bool:
    if (a.labels is None) != (b.labels is None):
        raise OnnxmpqError("some samples come with labels and others without.",
                           "give labels for all samples or for none.")
    if a.inputs.keys() != b.inputs.keys():
        return False
    return all(x.shape[1:] == b.inputs[k].shape[1:] and x.dtype == b.inputs[k].dtype for k, x in a.inputs.items())


def _slice(batch: Batch, start: int, stop: int | None) -> Batch:
    labels = None if batch.labels is None else batch.labels[start:stop]
    return Batch({k: a[start:stop] for k, a in batch.inputs.items()}, labels)


def _concat(parts: Sequence[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    inputs = {k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs}
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
    return Batch(inputs, labels)


def _take(pending: list[Batch], n: int) -> tuple[Batch, list[Batch]]:
    """Splits the first `n` samples off a list of chunks; only those are copied."""
    head: list[Batch] = []
    rest: list[Batch] = []
    for chunk in pending:
        size = _batch_size(chunk)
        if n >= size:
            head.append(chunk)
            n -= size
        elif n > 0:
            head.append(_slice(chunk, 0, n))
            rest.append(_slice(chunk, n, None))
            n = 0
        else:
            rest.append(chunk)
    return _concat(head), rest


def rebatch(chunks: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """Re-cuts chunks of any size into batches of `batch_size` samples (the last one may be smaller).

    Chunks whose arrays differ in shape beyond dim 0 (e.g. sequence length) or dtype are not merged:
    the pending samples are yielded first as a smaller batch.
    """
    pending: list[Batch] = []
    count = 0
    for chunk in chunks:
        size = _batch_size(chunk)
        if size == 0:
            continue
        if pending and not _same_layout(pending[0], chunk):
            yield _concat(pending)
            pending, count = [], 0
        pending.append(chunk)
        count += size
        while count >= batch_size:
            batch, pending = _take(pending, batch_size)
            count -= batch_size
            yield batch
    if pending:
        yield _concat(pending)


def _read_exact(stream: IO[bytes], n: int, where: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise OnnxmpqError(f"{where} is truncated.", "re-create the file.")
    return data


def _read_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Reads a .npy header: (shape, fortran_order, dtype); refuses object (pickle) arrays."""
    try:
        version = npformat.read_magic(stream)
        reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, fortran, dtype = reader(stream)
    except ValueError as exc:
        raise OnnxmpqError(f"{where} is not a valid .npy array ({exc}).", "save it with numpy.savez.") from None
    if dtype.hasobject:
        raise OnnxmpqError(f"{where} holds Python objects, which onnxmpq never unpickles.",
                           "save plain numeric arrays.")
    return tuple(shape), bool(fortran), dtype


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise OnnxmpqError(f"{str(path)!r} is not a readable .npz file ({exc}).",
                           "save it with numpy.savez or numpy.savez_compressed.") from None


@contextlib.contextmanager
def _member_errors(where: str) -> Iterator[None]:
    """A damaged zip member as one clear error: a bad CRC or broken deflate stream (BadZipFile,
    zlib.error, EOFError), an encrypted member (RuntimeError), an unknown compression method
    (NotImplementedError)."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise OnnxmpqError(f"{where} is damaged ({type(exc).__name__}: {exc}).", "re-create the file.") from None
    except RuntimeError as exc:
        raise OnnxmpqError(f"{where} cannot be read ({exc}).", "save it unencrypted with numpy.savez.") from None
    except NotImplementedError as exc:
        raise OnnxmpqError(f"{where} uses a compression onnxmpq cannot read ({exc}).",
                           "save it with numpy.savez or numpy.savez_compressed.") from None


def _npz_blocks(path: Path, key: str, rows: int | None) -> Iterator[np.ndarray]:
    """Yields member `key` of an .npz in blocks of `rows` along dim 0 (None: whole), reading sequentially."""
    where = f"array {key!r} in {str(path)!r}"
    with _open_zip(path) as archive, _member_errors(where), archive.open(key + ".npy") as stream:
        shape, fortran, dtype = _read_header(stream, where)
        if fortran or not shape or rows is None:
            data = _read_exact(stream, int(np.prod(shape)) * dtype.itemsize, where)
            yield np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
            return
        row_items = int(np.prod(shape[1:]))
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            data = _read_exact(stream, n * row_items * dtype.itemsize, where)
            yield np.frombuffer(data, dtype).reshape((n, *shape[1:]))


def _labels_array(labels: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise OnnxmpqError(f"labels in {where} have dtype {labels.dtype}, not integer class indices.",
                           "store the labels as an integer array, one class index per sample.")
    return labels.reshape(-1)


def _check_names(found: Sequence[str], inputs: Sequence[InputSpec], where: str, labels_key: str) -> None:
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in found]
    unexpected = [k for k in found if k not in names]
    if missing or unexpected:
        problem = "; ".join(
            part for part in (missing and f"no array for model input(s) {', '.join(map(repr, missing))}",
                              unexpected and f"unexpected key(s) {', '.join(map(repr, unexpected))}") if part
        )
        raise OnnxmpqError(
            f"{where}: {problem}.",
            f"keys found: {', '.join(found) or 'none'}; expected one array per model input "
            f"({', '.join(names)}) plus optional {labels_key!r}.",
        )


def _sample_count(shape: tuple[int, ...], rank: int | None, where: str) -> tuple[int, bool]:
    """(number of samples, stored without batch axis) for an array of `shape` feeding a rank-`rank` input."""
    if rank == 0:
        raise OnnxmpqError(f"{where} feeds a model input of rank 0 (a scalar, no batch axis); onnxmpq feeds "
                           "samples in batches along the first axis.",
                           f"give the model a batched input, or quantize without {option('data.calib')} (weights only).")
    if rank is not None and len(shape) == rank - 1:
        return 1, True
    if not shape:
        raise OnnxmpqError(f"{where} is a scalar but the model input has rank {rank}.",
                           "store the samples along dim 0.")
    return shape[0], False


def _check_counts(counts: Mapping[str, int], where: str) -> int:
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {n}" for k, n in counts.items())
        raise OnnxmpqError(f"the arrays in {where} have different numbers of samples ({listed}).",
                           "store the same number of samples (dim 0) for every input and the labels.")
    return next(iter(counts.values()))


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], bool, np.dtype]]:
    with _open_zip(path) as archive:
        headers = {}
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                with _member_errors(f"{info.filename!r} in {str(path)!r}"), archive.open(info) as stream:
                    headers[info.filename[:-4]] = _read_header(stream, f"{info.filename!r} in {str(path)!r}")
    return headers


def _existing_file(source: paths.PathLike, kind: str) -> Path:
    return paths.regular_file(source, f"{kind} file", "check the data path.")


@dataclass(frozen=True)
class NpzReader:
    """An .npz with one array per model input (samples along dim 0) and optional integer labels.

    Attributes:
        path: the file.
        keys: the input arrays to read.
        labels: the key of the labels array, or None.
        count: number of samples.
        whole: keys stored as a single sample (no batch axis), read whole.
        inputs: the model inputs.
    """

    path: Path
    keys: tuple[str, ...]
    labels: str | None
    count: int
    whole: frozenset[str]
    inputs: tuple[InputSpec, ...]

    @classmethod
    def open(cls, source: paths.PathLike, inputs: Sequence[InputSpec], *, limit: int | None = None,
             preprocess: object = None, labels_key: str = "labels") -> NpzReader:
        """Reads the headers of the .npz and checks its keys and sample counts."""
        path = _existing_file(source, ".npz")
        headers = _npz_headers(path)
        ranks = _expected_ranks(inputs)
        labels = labels_key if labels_key in headers and labels_key not in ranks else None
        keys = [k for k in headers if k != labels]
        if not keys:
            raise OnnxmpqError(f".npz file {str(path)!r} holds no input arrays (keys: {', '.join(headers) or 'none'}).",
                               f"save one array per model input: {', '.join(ranks)}.")
        _check_names(keys, inputs, f".npz file {str(path)!r}", labels_key)
        counts, whole = {}, set()
        for key in keys:
            counts[key], single = _sample_count(headers[key][0], ranks[key], f"array {key!r} in {str(path)!r}")
            if single:
                whole.add(key)
        if labels:
            counts[labels] = int(np.prod(headers[labels][0]))
        count = _check_counts(counts, f"{str(path)!r}")
        if count == 0:
            raise OnnxmpqError(f".npz file {str(path)!r} holds 0 samples.", "save at least one sample.")
        return cls(path, tuple(keys), labels, count, frozenset(whole), tuple(inputs))

    def __len__(self) -> int:
        return self.count

    def chunks(self, rows: int) -> Iterator[Batch]:
        """Yields blocks of up to `rows` samples, read sequentially from the zip."""
        streams = [_npz_blocks(self.path, k, None if k in self.whole else rows) for k in self.keys]
        if self.labels:
            streams.append(_npz_blocks(self.path, self.labels, rows))
        for blocks in zip(*streams):
            arrays = add_batch_axis(dict(zip(self.keys, blocks)), self.inputs)
            labels = _labels_array(blocks[-1], str(self.path)) if self.labels else None
            yield Batch(arrays, labels)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return rebatch(self.chunks(batch_size), batch_size)


@dataclass(frozen=True)
class NpyReader:
    """A .npy holding the only model input, samples along dim 0; memory-mapped and sliced."""

    path: Path
    count: int
    whole: bool
    inputs: tuple[InputSpec, ...]

    @classmethod
    def open(cls, source: paths.PathLike, inputs: Sequence[InputSpec], *, limit: int | None = None,
             preprocess: object = None, labels_key: str = "labels") -> NpyReader:
        """Checks that the model has one input and reads the array's header."""
        path = _existing_file(source, ".npy")
        if len(inputs) != 1:
            names = ", ".join(s.name for s in inputs)
            raise OnnxmpqError(
                f".npy file {str(path)!r} holds one array but the model has {len(inputs)} inputs ({names}).",
                "save an .npz with one array per input name, e.g. numpy.savez(path, name=array, ...).",
            )
        with open(path, "rb") as stream:
            shape, _, _ = _read_header(stream, f".npy file {str(path)!r}")
        count, whole = _sample_count(shape, len(inputs[0].shape), f".npy file {str(path)!r}")
        if count == 0:
            raise OnnxmpqError(f".npy file {str(path)!r} holds 0 samples.", "save at least one sample.")
        return cls(path, count, whole, tuple(inputs))

    def __len__(self) -> int:
        return self.count

    def chunks(self, rows: int) -> Iterator[Batch]:
        """Yields copies of consecutive slices of the memory-mapped array."""
        array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        name = self.inputs[0].name
        if self.whole:
            yield Batch({name: np.array(array)[None]})
            return
        for start in range(0, self.count, rows):
            yield Batch({name: np.array(array[start : start + rows])})

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return rebatch(self.chunks(batch_size), batch_size)


@dataclass(frozen=True)
class ArrayFolderReader:
    """A folder of .npz/.npy files, each holding one or more samples, read in sorted file order."""

    root: Path
    files: tuple[NpzReader | NpyReader, ...]

    @classmethod
    def open(cls, source: paths.PathLike, inputs: Sequence[InputSpec], *, limit: int | None = None,
             preprocess: object = None, labels_key: str = "labels") -> ArrayFolderReader:
        """Opens (headers only) every .npz/.npy file directly inside the folder."""
        root = Path(source)
        if not root.is_dir():
            raise OnnxmpqError(f"data folder {str(root)!r} does not exist.", "check the data path.")
        paths = sorted(
            p for p in root.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in ARRAY_SUFFIXES
        )
        if not paths:
            raise OnnxmpqError(f"data folder {str(root)!r} has no .npz or .npy files.",
                               "put one or more .npz/.npy files (samples along dim 0) in it.")
        files = []
        for path in paths:
            kind = NpzReader if path.suffix.lower() == ".npz" else NpyReader
            files.append(kind.open(path, inputs, labels_key=labels_key))
        return cls(root, tuple(files))

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return rebatch((c for f in self.files for c in f.chunks(batch_size)), batch_size)


_SET_DIR = re.compile(r"test_data_set_(\d+)")
_INPUT_PB = re.compile(r"input_(\d+)\.pb")


def input_protos(folder: Path) -> list[Path]:
    """The input_<i>.pb files of one test set, in numeric order."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _INPUT_PB.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def find_test_sets(root: Path) -> list[Path]:
    """`root` itself when it holds input_*.pb, else its test_data_set_<i> sub-folders with inputs."""
    if input_protos(root):
        return [root]
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _SET_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if input_protos(p)]


def _read_tensor(path: Path) -> onnx.TensorProto:
    try:
        tensor: onnx.TensorProto = onnx.TensorProto.FromString(path.read_bytes())
        return tensor
    except Exception as exc:  # protobuf raises its own DecodeError
        raise OnnxmpqError(f"{str(path)!r} is not a serialized onnx.TensorProto ({exc}).",
                           "re-create it with onnx.numpy_helper.from_array(...).SerializeToString().") from None


def _load_set(folder: Path, inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Reads one test set; a tensor's name field picks its input, else its input_<i> index does."""
    arrays: dict[str, np.ndarray] = {}
    for index, path in enumerate(input_protos(folder)):
        tensor = _read_tensor(path)
        name = tensor.name or (inputs[index].name if index < len(inputs) else f"input_{index}")
        if name in arrays:
            raise OnnxmpqError(f"test set {str(folder)!r} has two tensors for input {name!r}.",
                               "give each input_*.pb a distinct tensor name, or none (index order).")
        arrays[name] = numpy_helper.to_array(tensor, base_dir=str(folder))
    return add_batch_axis(arrays, inputs)


@dataclass(frozen=True)
class OnnxTestDataReader:
    """ONNX test data: test_data_set_*/input_*.pb TensorProtos; each set adds its samples as stored."""

    root: Path
    sets: tuple[Path, ...]
    inputs: tuple[InputSpec, ...]

    @classmethod
    def open(cls, source: paths.PathLike, inputs: Sequence[InputSpec], *, limit: int | None = None,
             preprocess: object = None, labels_key: str = "labels") -> OnnxTestDataReader:
        """Lists the test sets (sorted by number); a test_data_set folder itself is one set."""
        root = Path(source)
        sets = find_test_sets(root) if root.is_dir() else []
        if not sets:
            raise OnnxmpqError(f"{str(root)!r} has no test_data_set_*/input_*.pb files.",
                               "pass an ONNX test-data folder (model folder or one test_data_set_<i>).")
        return cls(root, tuple(sets), tuple(inputs))

    def __len__(self) -> int:
        ranks = _expected_ranks(self.inputs)
        total = 0
        for folder in self.sets:
            first = _read_tensor(input_protos(folder)[0])
            name = first.name or (self.inputs[0].name if self.inputs else "")
            dims = tuple(first.dims)
            total += _sample_count(dims, ranks.get(name), f"{str(folder)!r}")[0]
        return total

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return rebatch((Batch(_load_set(s, self.inputs)) for s in self.sets), batch_size)
