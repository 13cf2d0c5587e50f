"""The graph editor behind `quantize.build`: adds initializers and Q/DQ nodes, rewires consumers, and puts
the nodes back in topological order. Knows ONNX, not onnxmpq's choices.

Names of new tensors and nodes are derived from the tensor they quantize and made unique; the float
tensors keep their names (a probe fed at a cut of float values still runs through every Q/DQ after it).
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
from numpy.typing import ArrayLike
from onnx import TensorProto, helper, numpy_helper

from onnxmpq.calibrate.ranges import ActParams
from onnxmpq.errors import InternalError, OnnxmpqError
from onnxmpq.graph.model import keep_initializers, names_read, node_reads, short_name
from onnxmpq.rounding import QuantizedWeight
from onnxmpq.write.formats import pack


class Editor:
    """Edits one graph in place (see the module docstring)."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.graph = proto.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.nodes = {n.name: n for n in self.graph.node}
        self.node_names = set(self.nodes)
        self.taken = set(self.inits) | set(self.nodes) | {i.name for i in self.graph.input}
        self.taken |= {o for n in self.graph.node for o in n.output}
        self.added: list[onnx.NodeProto] = []
        self.replaced: set[str] = set()
        self._arrays: dict[str, np.ndarray] = {}
        values = list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output)
        self.float_types = {v.name: v.type.tensor_type.elem_type for v in values}
        self.float_types.update({t.name: t.data_type for t in self.graph.initializer})

    # ---------------------------------------------------------------- names, constants, nodes

    def name(self, base: str) -> str:
        """A new unique tensor/node name from `base`; a base over MAX_NAME characters (exporters such as
        tf2onnx join every fused op's name into one) keeps its head and tail around 8 hex digits of its
        hash, so each Q/DQ pair does not repeat it (on Basic Pitch the names were most of the file)."""
        base = re.sub(r"[^A-Za-z0-9_./:-]", "_", base)
        if len(base) > MAX_NAME:
            base = short_name(base)
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def init(self, base: str, tensor: TensorProto) -> str:
        tensor.name = self.name(base)
        self.graph.initializer.append(tensor)
        return tensor.name

    def node(self, op_type: str, inputs: Iterable[str], base: str, **attrs: Any) -> str:
        """Adds a one-output node named like its output (node and tensor names are apart in ONNX); returns
        the output's name."""
        out = self.name(base)
        name = out if out not in self.node_names else self.name(f"{out}_node")
        self.node_names.add(name)
        self.added.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def scale(self, values: ArrayLike, like: str) -> TensorProto:
        """Scales in the float type of the tensor `like` (float32 or float16), as DequantizeLinear needs."""
        dtype = self.float_types.get(like, TensorProto.FLOAT)
        if dtype not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            raise OnnxmpqError(f"tensor {like!r} is {TensorProto.DataType.Name(dtype)}; onnxmpq quantizes "
                               "float32 and float16 models.", "export the model in float32.")
        return numpy_helper.from_array(np.asarray(values, np.float16 if dtype == TensorProto.FLOAT16 else np.float32))

    # ---------------------------------------------------------------- activations

    def qdq(self, tensor: str, params: ActParams) -> str:
        """Q then DQ of `tensor` with `params`; returns the DQ's output."""
        fmt = params.fmt
        base = f"{tensor}_a{fmt.bits}"
        s = self.init(f"{base}_scale", self.scale(params.scale, tensor))
        z = self.init(f"{base}_zero_point",
                      helper.make_tensor("", fmt.onnx_type, [], pack(np.array([params.zero_point]), fmt), raw=True))
        q = self.node("QuantizeLinear", [tensor, s, z], f"{base}_q")
        return self.node("DequantizeLinear", [q, s, z], f"{base}_dq")

    def guard(self, tensor: str) -> str:
        """Max(tensor, tensor): the same values through a node that onnxruntime neither folds nor moves a Q
        across (it does both for Identity, Reshape and Mul by 1), so that it cannot fuse the producer and
        the Q after it into a kernel that rejects their type (a 4-bit QLinearConv)."""
        return self.node("Max", [tensor, tensor], f"{tensor}_guard")

    def rewire(self, tensor: str, new: str, nodes: Iterable[str]) -> None:
        """Makes the named nodes read `new` where they read `tensor`."""
        for name in nodes:
            node = self.nodes[name]
            for i, value in enumerate(node.input):
                if value == tensor:
                    node.input[i] = new

    def rename_output(self, tensor: str) -> str:
        """Gives the producer of graph output `tensor` a new output name (its DQ will write `tensor`)."""
        new = self.name(f"{tensor}_float")
        for node in self.graph.node:
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = new
        for value in self.graph.value_info:
            if value.name == tensor:
                value.name = new
        return new

    def retarget(self, output: str, tensor: str) -> None:
        """Makes the node that writes `output` (an added DQ) write `tensor` instead."""
        for node in self.added:
            for i, out in enumerate(node.output):
                if out == output:
                    node.output[i] = tensor

    # ---------------------------------------------------------------- weights and biases

    def weight_codes(self, base: str, qweight: QuantizedWeight, like: str, cast: bool,
                     zero_point: bool = True) -> tuple[str, str, str | None]:
        """Initializers of packed codes, float scales and zero points (INT8 when the codes are cast; none
        without `zero_point`): (codes, scale, zero point) names."""
        fmt = qweight.fmt
        codes = helper.make_tensor("", fmt.onnx_type, qweight.codes.shape, pack(qweight.codes, fmt), raw=True)
        channels = qweight.scale.size
        q_name = self.init(f"{base}_q{fmt.bits}", codes)
        s_name = self.init(f"{q_name}_scale", self.scale(qweight.scale, like))
        if not zero_point:
            return q_name, s_name, None
        zeros = np.zeros(channels, np.int8)
        z = helper.make_tensor("", TensorProto.INT8 if cast else fmt.onnx_type, [channels],
                               zeros.tobytes() if cast else pack(zeros, fmt), raw=True)
        return q_name, s_name, self.init(f"{q_name}_zero_point", z)

    def dequantized_weight(self, weight: str, layer: str, qweight: QuantizedWeight, guard: bool, cast: bool) -> str:
        """DQ(codes) (through a Cast to INT8, and a shape-preserving Reshape guard, when asked): the tensor a
        layer reads in place of `weight`."""
        q_name, s_name, z_name = self.weight_codes(f"{weight}_{layer}", qweight, weight, cast)
        assert z_name is not None, "weight_codes writes a zero point unless told not to"
        if cast:
            q_name = self.node("Cast", [q_name], f"{q_name}_int8", to=TensorProto.INT8)
        out = self.node("DequantizeLinear", [q_name, s_name, z_name], f"{q_name}_dq", axis=qweight.axis)
        if guard:
            shape = self.init(f"{q_name}_shape", numpy_helper.from_array(np.array(qweight.codes.shape, np.int64)))
            out = self.node("Reshape", [out, shape], f"{out}_guard")
        self.replaced.add(weight)
        return out

    def int32_bias(self, bias: str, layer: str, input_scale: float, qweight: QuantizedWeight) -> str | None:
        """b_q = round(b / (s_x s_w)) as INT32, dequantized with s_x s_w; None where it cannot line up."""
        values = self.array(bias).astype(np.float64).reshape(-1)
        scale = (np.float64(input_scale) * qweight.scale.astype(np.float64)).astype(np.float32)
        if values.size != scale.size or self.float_types.get(bias, TensorProto.FLOAT) != TensorProto.FLOAT:
            return None  # a grouped ConvTranspose's bias does not line up with per-axis scales: stays float
        limit = np.iinfo(np.int32)
        codes = np.clip(np.rint(values / np.maximum(scale.astype(np.float64), 1e-30)), limit.min, limit.max)
        q_name = self.init(f"{bias}_{layer}_int32", numpy_helper.from_array(codes.astype(np.int32)))
        s_name = self.init(f"{q_name}_scale", numpy_helper.from_array(scale))
        self.replaced.add(bias)
        return self.node("DequantizeLinear", [q_name, s_name], f"{q_name}_dq", axis=0)

    def replace_input(self, node_name: str, old: str, new: str) -> None:
        node = self.nodes[node_name]
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
                return

    # ---------------------------------------------------------------- finish

    def finish(self) -> None:
        """Topological order (added nodes right after what they read), float weights nothing reads dropped."""
        original = list(self.graph.node)
        keys = {id(n): float(i) for i, n in enumerate(original)}
        produced = {o: keys[id(n)] for n in original for o in n.output}
        for k, node in enumerate(self.added):
            keys[id(node)] = max([produced.get(i, -1.0) for i in node.input if i] + [-1.0]) + 1e-6 * (k + 1)
            produced.update({o: keys[id(node)] for o in node.output})
        nodes = toposort(original + self.added, lambda n: keys[id(n)])
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = names_read(self.graph)
        keep_initializers(self.graph, {t.name for t in self.graph.initializer
                                       if t.name not in self.replaced or t.name in used})
        share_constants(self.graph)
        self.proto.ir_version = max(self.proto.ir_version, _min_ir(self.proto))


MAX_NAME = 64  # characters of a generated name before it is shortened (see Editor.name)
SHARE_ABOVE = 64  # bytes: identical quantized constants larger than this are stored once


def share_constants(graph: onnx.GraphProto) -> int:
    """Stores identical quantized constants once: initializers written by onnxmpq (read only by
    DequantizeLinear or by the Cast of the INT8-cast layout) with the same type, dims and bytes, e.g. the
    codes and scales of one float weight shared by several Convs and rounded alike (the harmonic stack of
    Basic Pitch reuses 3 weights in 26 Convs). Readers are pointed at the first copy; returns how many
    copies were dropped. Tensors a subgraph reads are left alone."""
    readers: dict[str, set[str]] = {}
    inner: set[str] = set()  # what subgraphs read from this scope (node_reads beyond the node's inputs)
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
        inner.update(set(node_reads(node)) - set(node.input))
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for tensor in graph.initializer:
        ops = readers.get(tensor.name, set())
        if not ops or not ops <= {"DequantizeLinear", "Cast"} or tensor.name in inner \
                or not tensor.HasField("raw_data") or len(tensor.raw_data) <= SHARE_ABOVE:
            continue
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
        alias[tensor.name] = first.setdefault(key, tensor.name)
    alias = {name: kept for name, kept in alias.items() if name != kept}
    if not alias:
        return 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    keep_initializers(graph, {t.name for t in graph.initializer if t.name not in alias})
    return len(alias)


def toposort(nodes: list[onnx.NodeProto], key: Callable[[onnx.NodeProto], float]) -> list[onnx.NodeProto]:
    """Nodes in an order where each one's producers come first; among ready nodes, the smallest `key`."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {producer[t] for t in node_reads(node) if t in producer}
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [(key(nodes[i]), i) for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in users.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (key(nodes[j]), j))
    if len(order) != len(nodes):
        raise InternalError("the quantized graph has a cycle")
    return order


def _min_ir(proto: onnx.ModelProto) -> int:
    ir = helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    uses_int2 = any(t.data_type in (TensorProto.INT2, TensorProto.UINT2) for t in proto.graph.initializer)
    return max(ir, 11 if not uses_int2 else 12)

