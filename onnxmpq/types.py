"""Frozen dataclasses exchanged between the pipeline stages; no logic beyond validation.

Data flow: path -> `graph.load` -> (ModelProto, [LayerSpec]) -> `calibrate` -> {tensor: TensorStats}
-> `quantize.build(..., {layer: Candidate})` -> QDQ ModelProto + `Report`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (a dim is an int when static, else None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Batch:
    """One calibration or evaluation batch: arrays keyed by input name, labels when the source has them."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


@dataclass(frozen=True)
class LayerSpec:
    """A quantizable layer.

    Attributes:
        name: ONNX node name, the stable id used everywhere (unnamed nodes get a generated name).
        op_type: Conv, ConvTranspose, Gemm, MatMul or Gather (an embedding table).
        weight: initializer name of the weight.
        activation: name of the input tensor that is quantized as the activation (a Gather's indices,
            which stay integers).
        output: name of the layer's output tensor.
        params: number of weight elements.
        macs: multiply-accumulates per sample (batch dimension 1; dynamic dims other than batch as 1).
        channel_axis: axis of the weight that indexes output channels (per-channel scales live there).
        bias: initializer name of the bias, if any.
    """

    name: str
    op_type: str
    weight: str
    activation: str
    output: str
    params: int
    macs: int
    channel_axis: int
    bias: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A precision for one layer: weight bits and activation bits (None = that side stays float)."""

    weight_bits: int | None
    act_bits: int | None

    @property
    def key(self) -> str:
        w = f"w{self.weight_bits}" if self.weight_bits else ""
        a = f"a{self.act_bits}" if self.act_bits else ""
        return (w + a) or "float"


class WeightRange(StrEnum):
    """How the per-channel weight scale is chosen."""

    MSE = "mse"
    MINMAX = "minmax"


class Rounding(StrEnum):
    """How float weights reach their integer grid: round to nearest, GPTQ with a float-target re-fit,
    or `auto`: GPTQ when some layer has fewer than 8 weight bits and calibration data is given (where
    it decides accuracy: BENCHMARKS.md), nearest otherwise (at 8 bits it gains nothing and costs time)."""

    AUTO = "auto"
    NEAREST = "nearest"
    GPTQ = "gptq"

    def resolve(self, weight_bits: Iterable[int | None], have_data: bool = True) -> Rounding:
        """The rounding `auto` stands for, given the weight widths in play."""
        if self != Rounding.AUTO:
            return self
        low = any(b is not None and b < 8 for b in weight_bits)
        return Rounding.GPTQ if low and have_data else Rounding.NEAREST


class Probes(StrEnum):
    """How the sensitivity sweep measures: `exact`, one network run per unit and candidate; or `fast`,
    one run per unit with noise of known power, scaled to every candidate by the unit's own output error
    (`onnxmpq.sensitivity.fast`)."""

    FAST = "fast"
    EXACT = "exact"


class ActRange(StrEnum):
    """How an activation tensor's [min, max] range is chosen from its calibration histogram."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"


@dataclass(frozen=True)
class TensorStats:
    """Streaming statistics of one activation tensor over the calibration set.

    `hist[i]` counts values in [edges[i], edges[i+1]); `min`/`max` are exact; `zeros` counts exact
    zeros (ReLU outputs), which every asymmetric grid represents without error; `floor`, for a
    Softmax's logits only, is the smallest maximum of a row (over the Softmax axis) seen. `ranges`
    keeps the ranges already chosen from these statistics (`calibrate.ranges.choose_range`: every
    model built from one run's statistics asks for the same ones).
    """

    name: str
    min: float
    max: float
    hist: np.ndarray
    edges: np.ndarray
    count: int = 0
    zeros: int = 0
    floor: float | None = None
    ranges: dict[tuple[object, ...], tuple[float, float]] = field(default_factory=dict, init=False, compare=False, repr=False)


class Scope(StrEnum):
    """Which tensors carry Q/DQ (`onnxmpq.graph.points`): every tensor an integer kernel reads or writes
    (graph), or only the weighted layers' weights and activation inputs (layers, the older form)."""

    GRAPH = "graph"
    LAYERS = "layers"


@dataclass(frozen=True)
class QuantOptions:
    """Settings of the QDQ writer that are not per layer."""

    weight_range: WeightRange = WeightRange.MINMAX
    act_range: ActRange = ActRange.MSE
    percentile: float = 99.99
    int2_container: str = "int2"
    bias: str = "auto"             # float | int32 | auto (int32 where the input is quantized, weights <= 8 bits)
    weight_layout: str = "auto"    # native | int8-cast | auto (see write.build.cast_to_int8)
    scope: Scope = Scope.GRAPH
    integer_ops: frozenset[str] = frozenset()  # op types the target runs on integers beyond onnxruntime's
    tie_ops: frozenset[str] = frozenset()      # op types whose inputs and output share one scale (a profile's tie)


@dataclass(frozen=True)
class LayerScores:
    """One layer's row of a sensitivity table: a degradation per candidate key (larger = worse), plus
    per-layer facts a metric keeps (the raw output entropy of the float layer, for the threshold method)."""

    name: str
    op_type: str
    scores: Mapping[str, float]
    extra: Mapping[str, float] | None = None


@dataclass(frozen=True)
class SensitivityTable:
    """What the sensitivity stage hands the allocators: one metric, layers in network order.

    JSON form (a contract): {"metric", "candidates", "samples", "time_s", "rounding", "probes",
    "layers": [{"name", "op_type", "scores": {candidate: score}, ...extra}]}.
    """

    metric: str
    candidates: tuple[str, ...]
    layers: tuple[LayerScores, ...]
    samples: int
    time_s: float
    rounding: str = "nearest"
    probes: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        layers = [{"name": l.name, "op_type": l.op_type, "scores": dict(l.scores), **dict(l.extra or {})}
                  for l in self.layers]
        return {"metric": self.metric, "candidates": list(self.candidates), "samples": self.samples,
                "time_s": self.time_s, "rounding": self.rounding, "probes": self.probes, "layers": layers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityTable:
        layers = tuple(LayerScores(l["name"], l["op_type"], dict(l["scores"]),
                                   {k: v for k, v in l.items() if k not in ("name", "op_type", "scores")} or None)
                       for l in data["layers"])
        return cls(data["metric"], tuple(data["candidates"]), layers, int(data["samples"]),
                   float(data["time_s"]), data.get("rounding", "nearest"), data.get("probes", "exact"))
