"""A depthwise ImageNet CNN in the EfficientNet-Lite0 style, built with onnx.helper, as a latency subject.

Structure (EfficientNet-Lite0: no squeeze-excite, ReLU6, fixed stem and head): 224x224x3 NCHW input
with a free batch dimension; stem Conv 3x3/2 to 32 channels + ReLU6 (Clip 0..6); MBConv blocks of
1x1 expand Conv + ReLU6 (left out at expand ratio 1, as in the first stage), depthwise kxk Conv + ReLU6,
1x1 project Conv, and a residual Add where stride 1 keeps the shape; head 1x1 Conv to 1280 + ReLU6,
GlobalAveragePool, Flatten, Gemm to 1000 classes. 49 Conv layers, about 4.65M parameters.

The weights are random (He-normal, fixed seed) with a BatchNorm-like per-channel scale and shift folded
into each Conv: the model has the real layer shapes and op mix but classifies nothing, so it serves
latency and structure measurements, never accuracy ones. Its calibration set is normal noise of the
shape of normalised images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STEM, HEAD, CLASSES, SIZE = 32, 1280, 1000, 224
# (expand ratio, kernel, stride of the first repeat, output channels, repeats): EfficientNet-Lite0
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
OPSET, SEED, CALIB_IMAGES = 13, 0, 32
INPUT = "input"


class _Builder:
    """Collects nodes and initializers; every Conv gets folded BN-like weights."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.bounds: tuple[str, str] | None = None

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def _const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        """A Conv with He-normal weights times a per-channel scale in [0.5, 1.5] and a small bias."""
        name = self._name("conv")
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        w *= self.rng.uniform(0.5, 1.5, (cout, 1, 1, 1))
        b = self.rng.normal(0.0, 0.1, cout)
        out = f"{name}_out"
        self.nodes.append(helper.make_node(
            "Conv", [x, self._const(f"{name}.weight", w), self._const(f"{name}.bias", b)], [out], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=group))
        return out

    def relu6(self, x: str) -> str:
        if not self.bounds:  # the Clip bounds, shared by every ReLU6
            self.bounds = (self._const("zero", np.array(0.0)), self._const("six", np.array(6.0)))
        name = self._name("relu6")
        self.nodes.append(helper.make_node("Clip", [x, *self.bounds], [f"{name}_out"], name=name))
        return f"{name}_out"

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def mbconv(self, x: str, cin: int, cout: int, expand: int, k: int, stride: int) -> str:
        mid = cin * expand
        h = self.relu6(self.conv(x, cin, mid, 1)) if expand != 1 else x
        h = self.relu6(self.conv(h, mid, mid, k, stride, group=mid))
        h = self.conv(h, mid, cout, 1)
        return self.op("Add", [h, x]) if stride == 1 and cin == cout else h

    def head(self, x: str, cin: int) -> str:
        h = self.relu6(self.conv(x, cin, HEAD, 1))
        h = self.op("Flatten", [self.op("GlobalAveragePool", [h])], axis=1)
        w = self.rng.standard_normal((CLASSES, HEAD)) * np.sqrt(1.0 / HEAD)
        return self.op("Gemm", [h, self._const("fc.weight", w), self._const("fc.bias", np.zeros(CLASSES))],
                       transB=1)


def build(seed: int = SEED) -> onnx.ModelProto:
    """The EfficientNet-Lite0-style model with random weights from `seed`."""
    b = _Builder(seed)
    x = b.relu6(b.conv(INPUT, 3, STEM, 3, 2))
    cin = STEM
    for expand, k, stride, cout, repeats in STAGES:
        for i in range(repeats):
            x = b.mbconv(x, cin, cout, expand, k, stride if i == 0 else 1)
            cin = cout
    logits = b.head(x, cin)
    graph = helper.make_graph(
        b.nodes, "effnet_lite0_random",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", CLASSES])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxmpq-bench")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def calibration(n: int = CALIB_IMAGES, seed: int = SEED) -> np.ndarray:
    """n images of standard normal noise (what normalised ImageNet inputs look like in mean and spread)."""
    return np.random.default_rng(seed + 1).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def ensure(folder: Path) -> tuple[Path, Path]:
    """(model path, calibration .npz path) under `folder`, written on first use."""
    model, calib = folder / "effnet_lite0.onnx", folder / "effnet_lite0_calib32.npz"
    folder.mkdir(parents=True, exist_ok=True)
    if not model.exists():
        onnx.save(build(), str(model))
    if not calib.exists():
        np.savez(calib, **{INPUT: calibration()})
    return model, calib


def stats(model: onnx.ModelProto) -> dict:
    """Conv count, depthwise Conv count and parameter count of a built model."""
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in ("zero", "six"))
    return {"conv": len(convs), "depthwise": len(depthwise), "params": params}
