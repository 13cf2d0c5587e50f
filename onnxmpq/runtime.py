"""onnxruntime sessions on the CPU provider, with errors turned into user errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxmpq.errors import OnnxmpqError

_PROTO_LIMIT = 2**31 - 1
THREADS: int | None = None  # intra-op threads of every session; None = onnxruntime's default (all cores)


def session(model: onnx.ModelProto | str | os.PathLike, threads: int | None = None,
            optimize: bool = True, spin: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession at the default optimisation level (all optimisations) unless `optimize=False`;
    `spin=False` stops idle worker threads from spin-waiting (timing several sessions in turn)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = threads or THREADS
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() > _PROTO_LIMIT:
                return _session_from_large(model, options)
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
        raise OnnxmpqError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0][:300]}",
                           "check that the model runs in onnxruntime's CPU provider as exported.") from None


def _session_from_large(model: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    with tempfile.TemporaryDirectory(prefix="onnxmpq-") as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save rewrites the tensors it externalises
        onnx.save(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """Runs one batch; an onnxruntime failure becomes a user error naming the cause."""
    try:
        return sess.run(outputs, feed)
    except Exception as exc:
        raise OnnxmpqError(f"onnxruntime failed on a batch: {str(exc).splitlines()[0][:300]}",
                           "check the input shapes and dtypes against the model's inputs.") from None
