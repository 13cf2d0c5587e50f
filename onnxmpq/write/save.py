"""Write models, JSON and text safely.

Every file is written to a temporary name in the destination folder and renamed into place, so an
existing file is replaced only by a complete new one and an interrupted run leaves the old one intact.
Models over 2 GB (or over `external_threshold`) are written with their tensors in `NAME.data` beside
them. A written model is re-read and passed through `onnx.checker.check_model(full_check=True)` before
it is renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxmpq.errors import InternalError, OnnxmpqError
from onnxmpq.graph import runtime
from onnxmpq.write import staging

PROTO_LIMIT = 2**31 - 1
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A full disk, a file-size limit (RLIMIT_FSIZE) or an I/O error while staging: one clear error."""
    try:
        yield
    except OSError as exc:
        raise OnnxmpqError(f"cannot write {str(path)!r}: {exc.strerror or exc}; nothing was written.",
                           "free space (or raise the file-size limit) or choose another folder.") from None


def _check_loads(proto: onnx.ModelProto, staged: Path) -> None:
    """The staged model must load in onnxruntime's CPU provider (graph optimisations off: only the load
    is checked). Skipped when the model imports an op domain beyond onnxruntime's CPU ones (its ops are
    the user's runtime's); an op onnxruntime's CPU provider has no kernel for (NOT_IMPLEMENTED: a CUDA-
    only com.microsoft op) is left to the user's runtime too. What is refused: a model onnxruntime
    cannot even read, such as one declaring an opset newer than it supports."""
    if any(i.domain not in STANDARD_DOMAINS for i in proto.opset_import):
        return
    try:
        runtime.session(staged, threads=1, optimize=False)
    except OnnxmpqError as exc:
        if "NOT_IMPLEMENTED" in exc.message or "Could not find an implementation" in exc.message:
            return
        opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), None)
        hint = (f"the model declares opset {opset}: export it at an opset this onnxruntime supports, or update "
                "onnxruntime." if "opset" in exc.message.lower() else "report this with the model to onnxmpq.")
        raise OnnxmpqError(f"the quantized model would not load in onnxruntime {_ort_version()} ({exc.message}); "
                           "nothing was written.", hint) from None


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, external_threshold: int = PROTO_LIMIT) -> int:
    """Checks and writes `proto` to `path` atomically; returns the bytes on disk (model + external data)."""
    path = Path(path)
    with staging.folder(path) as tmp:
        staged = tmp / path.name
        data_name = path.name + ".data"
        external = proto.ByteSize() > external_threshold
        with _write_errors(path):
            if external:
                copy = onnx.ModelProto()
                copy.CopyFrom(proto)  # onnx.save rewrites the tensors it externalises
                onnx.save(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                          location=data_name, size_threshold=0)
            else:
                onnx.save(proto, str(staged))
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise InternalError(f"onnxmpq wrote an invalid model: {exc}") from exc
        _check_loads(proto, staged)
        size = staged.stat().st_size
        if (tmp / data_name).exists():
            size += (tmp / data_name).stat().st_size
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(staged, path)
        return size


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Writes `data` to `path` atomically: into a fresh file of a staging folder (`onnxmpq.write.staging`: made
    by mkdtemp, mode 0700, a name no one can plant a link at), then renamed over `path`, which replaces
    a link at `path` by the file instead of writing through it."""
    path = Path(path)
    with staging.folder(path) as tmp:
        staged = tmp / path.name
        with _write_errors(path), open(staged, "xb") as stream:
            stream.write(data)
        os.replace(staged, path)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Writes `text` as UTF-8 atomically (see write_bytes)."""
    write_bytes(text.encode("utf-8"), path)


def write_json(obj, path: str | os.PathLike) -> None:
    """Writes `obj` as indented JSON atomically (see write_bytes)."""
    write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)
