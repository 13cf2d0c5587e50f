"""Calibration: read the user's samples and collect streaming statistics of activation tensors.

`read(source, model)` opens any supported source (see `readers`); `collect(model, source, groups)` runs
the float model once over it in onnxruntime, asking for the named intermediate tensors as extra
outputs, and folds each batch into one `Histogram` per group of tensors that share a scale before the
next batch is read, so memory holds one batch of activations and O(bins) per group. Where a batch's
activations exceed STATS_BUDGET (every tensor of a 224x224 CNN at batch 32: about 0.8 GB, and the
histograms' index arrays as much again) the later batches run in slices that fit it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import onnx

from onnxmpq.calibrate.ranges import ActParams, Histogram, act_params, choose_range
from onnxmpq.calibrate.readers import READERS, DataSource, Preprocess, check_batch, open_source
from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph import runtime
from onnxmpq.graph.model import Model
from onnxmpq.types import TensorStats

__all__ = ["READERS", "ActParams", "DataSource", "Histogram", "Preprocess", "act_params", "check_batch",
           "choose_range", "collect", "read", "with_outputs"]


def read(source: object, model: Model, *, limit: int | None = None, preprocess: Preprocess | None = None,
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


STATS_BUDGET = 256 << 20  # bytes of fetched activations per onnxruntime call of the statistics pass


def collect(model: Model, source: DataSource, groups: Mapping[str, Sequence[str]] | Sequence[str], *,
            batch_size: int = 32, on_batch: Callable[[int], object] | None = None,
            logits: Mapping[str, int] | None = None) -> dict[str, TensorStats]:
    """Streams `source` through the float model and returns the statistics of each group: one histogram
    over the values of all its tensors (a list of names stands for one group per tensor). Groups in
    `logits` (`points.Points.logits`: group -> Softmax axis) also record their smallest row maximum."""
    if not isinstance(groups, Mapping):
        groups = {name: [name] for name in groups}
    feeds = {spec.name for spec in model.inputs}
    fetch = list(dict.fromkeys(t for members in groups.values() for t in members if t not in feeds))
    sess = runtime.session(with_outputs(model.proto, fetch), arena=False)
    hists = {name: Histogram(name, floor_axis=(logits or {}).get(name)) for name in groups}
    # samples per call whose fetched tensors fit STATS_BUDGET, from a first run of one sample (not
    # counted); a model whose inputs fix the batch size takes its batches whole
    step = None if fetch and not getattr(source, "fixed_batch", None) else 1 << 30
    seen = 0
    for batch in source.batches(batch_size):
        if step is None:
            one = runtime.run(sess, {k: v[:1] for k, v in batch.inputs.items()}, fetch)
            step = max(1, int(STATS_BUDGET // max(sum(v.nbytes for v in one), 1)))
            del one
        for start in range(0, batch.size, step):
            inputs = {k: v[start:start + step] for k, v in batch.inputs.items()} if step < batch.size \
                else dict(batch.inputs)
            outputs = dict(zip(fetch, runtime.run(sess, inputs, fetch))) if fetch else {}
            for name, members in groups.items():
                for t in members:
                    hists[name].update(inputs[t] if t in feeds else outputs[t])
        seen += batch.size
        if on_batch:
            on_batch(batch.size)
    if seen == 0:
        raise OnnxmpqError("the calibration set is empty.", "give at least one sample (256 is a good default).")
    return {name: hist.stats() for name, hist in hists.items()}

