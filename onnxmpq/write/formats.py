"""The integer formats of onnxmpq: which ONNX type stores a width, its integer range, and packing.

Weights are signed and symmetric on the restricted grid q in [-(2^(b-1) - 1), 2^(b-1) - 1] (so 2 bits is
ternary {-1, 0, 1}); activations are unsigned and asymmetric on [0, 2^b - 1]. A width without an ONNX type
of its own (3, 5, 6, 7, 9..15) is stored in the next wider type with the narrowed range:

| bits  | weight type | activation type | opset |
|-------|-------------|-----------------|-------|
| 2     | INT2        | UINT4           | 25 (21 in an INT4 container) |
| 3, 4  | INT4        | UINT4           | 21    |
| 5..8  | INT8        | UINT8           | 13    |
| 9..16 | INT16       | UINT16          | 21    |
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from onnxmpq.errors import OnnxmpqError

WEIGHT_BITS = range(2, 17)
ACT_BITS = range(2, 17)

_SIGNED = {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8, 16: TensorProto.INT16}
_UNSIGNED = {4: TensorProto.UINT4, 8: TensorProto.UINT8, 16: TensorProto.UINT16}
_OPSET: dict[int, int] = {TensorProto.INT2: 25, TensorProto.INT4: 21, TensorProto.UINT4: 21, TensorProto.INT16: 21,
          TensorProto.UINT16: 21, TensorProto.INT8: 13, TensorProto.UINT8: 13, TensorProto.INT32: 13}
_NUMPY: dict[int, type[np.integer]] = {TensorProto.INT2: np.int8, TensorProto.INT4: np.int8, TensorProto.INT8: np.int8,
          TensorProto.INT16: np.int16, TensorProto.UINT4: np.uint8, TensorProto.UINT8: np.uint8,
          TensorProto.UINT16: np.uint16}
_CONTAINER_BITS: dict[int, int] = {TensorProto.INT2: 2, TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8,
                   TensorProto.UINT8: 8, TensorProto.INT16: 16, TensorProto.UINT16: 16}


@dataclass(frozen=True)
class IntFormat:
    """An integer grid and the ONNX type that stores it."""

    bits: int
    onnx_type: int
    qmin: int
    qmax: int

    @property
    def container_bits(self) -> int:
        return _CONTAINER_BITS[self.onnx_type]

    @property
    def opset(self) -> int:
        return _OPSET[self.onnx_type]

    @property
    def numpy_dtype(self) -> type[np.integer]:
        return _NUMPY[self.onnx_type]

    @property
    def type_name(self) -> str:
        name: str = TensorProto.DataType.Name(self.onnx_type)  # protobuf's enum wrapper has no stubs here
        return name

    def storage_bytes(self, count: int) -> int:
        """Bytes that `count` values take in the file (sub-byte types are packed)."""
        return (count * self.container_bits + 7) // 8


def weight_format(bits: int, int2_container: bool = False) -> IntFormat:
    """Signed symmetric restricted grid of `bits` bits; `int2_container` stores 2 bits in INT4."""
    _check_bits(bits, "weight")
    container = next(c for c in (2, 4, 8, 16) if c >= bits)
    if container == 2 and int2_container:
        container = 4
    qmax = 2 ** (bits - 1) - 1
    return IntFormat(bits, _SIGNED[container], -qmax, qmax)


def act_format(bits: int) -> IntFormat:
    """Unsigned asymmetric grid [0, 2^bits - 1]."""
    _check_bits(bits, "activation")
    container = next(c for c in (4, 8, 16) if c >= bits)
    return IntFormat(bits, _UNSIGNED[container], 0, 2 ** bits - 1)


def _check_bits(bits: int, what: str) -> None:
    if not isinstance(bits, (int, np.integer)) or bits not in WEIGHT_BITS:
        raise OnnxmpqError(f"{what} bit-width {bits!r} is not supported.", "use a whole number from 2 to 16.")


def pack(values: np.ndarray, fmt: IntFormat) -> bytes:
    """Raw little-endian bytes of `values` as ONNX stores `fmt`: sub-byte types packed low bits first.

    INT4/UINT4 hold two values a byte (element 2i in the low nibble), INT2 four (element 4i in bits 0-1).
    """
    flat = np.ascontiguousarray(values).reshape(-1)
    per_byte = 8 // fmt.container_bits if fmt.container_bits < 8 else 0
    if not per_byte:
        return flat.astype(np.dtype(fmt.numpy_dtype).newbyteorder("<")).tobytes()
    mask = (1 << fmt.container_bits) - 1
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: flat.size] = flat.astype(np.int16) & mask
    groups = padded.reshape(-1, per_byte).astype(np.uint8)
    shifts = np.arange(per_byte, dtype=np.uint8) * fmt.container_bits
    packed: bytes = np.bitwise_or.reduce(groups << shifts, axis=1).astype(np.uint8).tobytes()
    return packed


MIN_WRITE_OPSET = 21


def required_opset(formats: Iterable[IntFormat]) -> int:
    """Opset of a written model: 21 (the first whose Q/DQ take INT4 and INT16, and one that
    onnx's reference evaluator implements) or 25 when a format needs it (INT2)."""
    return max([MIN_WRITE_OPSET] + [f.opset for f in formats])
