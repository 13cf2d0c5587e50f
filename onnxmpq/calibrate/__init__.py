"""Calibration: read the user's samples and collect streaming statistics of activation tensors.

`read(source, model)` opens any supported source (see `readers`); `collect(model, source, tensors)` runs
the float model once over it in onnxruntime, asking for the named intermediate tensors as extra
outputs, and folds each batch into a `Histogram` before the next one is read, so memory holds one
batch of activations and O(bins) per tensor.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import onnx

from onnxmpq import runtime
from onnxmpq.calibrate.ranges import ActParams, Histogram, act_params, choose_range
from onnxmpq.calibrate.readers import READERS, DataSource, Preprocess, check_batch, open_source
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import Model
from onnxmpq.types import TensorStats

__all__ = ["READERS", "ActParams", "DataSource", "Histogram", "Preprocess", "act_params", "check_batch",
           "choose_range", "collect", "read", "with_outputs"]


def read(source, model: Model, *, limit: int | None = None, preprocess: Preprocess | None = None,
         reader: str | None = None) -> DataSource:
    """Opens a calibration or evaluation source checked against `model`'s inputs.

    Image folders take their preprocessing from `preprocess`, else from the model's
    `onnxmpq.preprocess` metadata, else the defaults of `Preprocess`.
    """
    if preprocess is None:
        preprocess = Preprocess.from_metadata(model.metadata)
    return open_source(source, model.inputs, limit=limit, preprocess=preprocess, reader=reader)


def with_outputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `proto` whose graph also outputs the tensors `names` (types from value_info)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    existing = {o.name for o in copy.graph.output}
    typed = {v.name: v for v in list(copy.graph.value_info) + list(copy.graph.input)}
    for name in names:
        if name in existing:
            continue
        value = typed.get(name)
        if value is not None:
            copy.graph.output.append(value)
        else:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        existing.add(name)
    return copy


def collect(model: Model, source: DataSource, tensors: Sequence[str], *, batch_size: int = 32,
            on_batch: Callable[[int], None] | None = None) -> dict[str, TensorStats]:
    """Streams `source` through the float model and returns the statistics of each tensor in `tensors`."""
    tensors = list(dict.fromkeys(tensors))
    feeds = {spec.name for spec in model.inputs}
    fetch = [t for t in tensors if t not in feeds]
    sess = runtime.session(with_outputs(model.proto, fetch))
    hists = {name: Histogram(name) for name in tensors}
    seen = 0
    for batch in source.batches(batch_size):
        outputs = dict(zip(fetch, runtime.run(sess, dict(batch.inputs), fetch))) if fetch else {}
        for name in tensors:
            hists[name].update(batch.inputs[name] if name in feeds else outputs[name])
        seen += batch.size
        if on_batch:
            on_batch(batch.size)
    if seen == 0:
        raise OnnxmpqError("the calibration set is empty.", "give at least one sample (256 is a good default).")
    return {name: hist.stats() for name, hist in hists.items()}
