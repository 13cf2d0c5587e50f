"""Checks of a loaded model's structure that onnxmpq relies on, each failing with what is wrong where
(a damaged or hand-edited file), before any stage reads a tensor:

- every tensor has one writer (ONNX graphs are in SSA form);
- a node's required (single) inputs have names: "" marks only an omitted optional input;
- every initializer and tensor attribute holds the bytes its dims and type need:
  n = prod(dims) elements take n * itemsize bytes, ceil(n * bits / 8) for the sub-byte types (2, 4, 6 bits),
  as raw data or packed in int32_data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import onnx
from onnx import TensorProto

from onnxmpq.errors import OnnxmpqError

_BITS = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2, "FLOAT6E2M3": 6, "FLOAT6E3M2": 6}
_SUBBYTE = {getattr(TensorProto, name): bits for name, bits in _BITS.items() if hasattr(TensorProto, name)}
_UNSIZED = (TensorProto.STRING, TensorProto.UNDEFINED)


def check_single_writers(graph: onnx.GraphProto) -> None:
    """ONNX graphs are in SSA form: every tensor has one producer (a node output, input or initializer)."""
    seen = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for name in node.output:
            if name and name in seen:
                raise OnnxmpqError(f"tensor {name!r} is written twice (node {node.name!r} and an earlier one); "
                                   "ONNX graphs give every tensor one producer.", "export the model again.")
            seen.add(name)


def check_required_inputs(graph: onnx.GraphProto, opset: int) -> None:
    """A node of the standard domain whose required input is named "" (only optional ones may be)."""
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or "" not in node.input:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            continue
        for i, name in enumerate(node.input):
            if name == "" and i < len(schema.inputs) and \
                    schema.inputs[i].option == onnx.defs.OpSchema.FormalParameterOption.Single:
                raise OnnxmpqError(f"node {node.name!r} ({node.op_type}) has no tensor for its required input {i} "
                                   f"({schema.inputs[i].name!r}).", "export the model again; the file is damaged.")


def check_tensor_sizes(tensors: Iterable[TensorProto]) -> None:
    """Every tensor held in the file (raw data or typed fields) has the size its dims and type say."""
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type in _UNSIZED:
            continue
        n = math.prod(tensor.dims)
        if tensor.HasField("raw_data"):
            bits = _SUBBYTE.get(tensor.data_type)
            if bits:
                want = math.ceil(n * bits / 8)
            else:
                try:
                    want = n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                except (KeyError, ValueError, TypeError):
                    continue
            have = len(tensor.raw_data)
        else:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type) if tensor.data_type else None
            if field is None:
                continue
            have, want = len(getattr(tensor, field)), n
            if tensor.data_type in _SUBBYTE:  # int32_data holds one packed byte per element
                want = math.ceil(n * _SUBBYTE[tensor.data_type] / 8)
            elif tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
                want = 2 * n
        if have != want:
            dims = "x".join(map(str, tensor.dims)) or "scalar"
            raise OnnxmpqError(f"tensor {tensor.name!r} ({dims}, {TensorProto.DataType.Name(tensor.data_type)}) "
                               f"holds {have} {'bytes' if tensor.HasField('raw_data') else 'values'} where its "
                               f"shape needs {want}.", "the file is truncated or damaged; export the model again.")
