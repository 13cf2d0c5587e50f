"""onnxruntime sessions on the CPU provider, with errors turned into user errors, and the census of the
kernels a model really runs on after onnxruntime's load-time optimisation."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxmpq.errors import OnnxmpqError

_PROTO_LIMIT = 2**31 - 1
THREADS: int | None = None  # intra-op threads of every session; None = onnxruntime's default (all cores)


def session(model: onnx.ModelProto | str | os.PathLike[str], threads: int | None = None,
            optimize: bool = True, spin: bool = True, arena: bool = True) -> ort.InferenceSession:
    """A CPU InferenceSession at the default optimisation level (all optimisations) unless `optimize=False`;
    `spin=False` stops idle worker threads from spin-waiting (timing several sessions in turn);
    `arena=False` allocates every tensor of a run on its own and frees it after the run, instead of in
    onnxruntime's arena, which grows by powers of two to the largest run's peak and keeps it while the
    session lives (on a 224x224 CNN at batch 32, gigabytes per session)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
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


FLOAT_KERNELS = frozenset({"Conv", "FusedConv", "NchwcConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm",
                           "FusedGemm"})
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention"})


@dataclass(frozen=True)
class Census:
    """The ops onnxruntime's CPU provider runs after its load-time optimisation, and how many of the
    compute-heavy ones (Conv, MatMul, Gemm) run on float kernels and how many on integer ones."""

    ops: Mapping[str, int]
    float_compute: int
    int_compute: int

    def to_dict(self) -> dict[str, object]:
        return {"ops": dict(self.ops), "float_compute": self.float_compute, "int_compute": self.int_compute}


def census(model: onnx.ModelProto | str | os.PathLike[str]) -> Census:
    """Loads `model` at the default optimisation level with `optimized_model_filepath` set and counts the
    ops of the graph onnxruntime really runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="onnxmpq-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        try:
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OnnxmpqError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0][:300]}",
                               "check that the model runs in onnxruntime's CPU provider as exported.") from None
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    ops = Counter(node.op_type for node in optimized.graph.node)
    return Census(dict(ops.most_common()), sum(ops[k] for k in FLOAT_KERNELS), sum(ops[k] for k in INTEGER_KERNELS))


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """Runs one batch; an onnxruntime failure becomes a user error naming the cause."""
    try:
        values: list[np.ndarray] = sess.run(outputs, feed)
        return values
    except Exception as exc:
        raise OnnxmpqError(f"onnxruntime failed on a batch: {str(exc).splitlines()[0][:300]}",
                           "check the input shapes and dtypes against the model's inputs.") from None
