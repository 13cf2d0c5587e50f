"""Tests of onnxmpq.formats: bit-width -> ONNX type, integer grids, sub-byte packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxmpq.errors import OnnxmpqError
from onnxmpq.write.formats import act_format, pack, required_opset, weight_format


def signed_type(bits):
    return TensorProto.INT2 if bits == 2 else TensorProto.INT4 if bits <= 4 else \
        TensorProto.INT8 if bits <= 8 else TensorProto.INT16


def unsigned_type(bits):
    return TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8 if bits <= 8 else TensorProto.UINT16


@pytest.mark.parametrize("bits", range(2, 17))
def test_weight_format_is_restricted_symmetric_grid(bits):
    fmt = weight_format(bits)
    assert fmt.bits == bits
    assert fmt.qmax == 2 ** (bits - 1) - 1 and fmt.qmin == -fmt.qmax
    assert fmt.onnx_type == signed_type(bits)
    assert fmt.container_bits >= bits
    info = np.iinfo(fmt.numpy_dtype)
    assert info.min <= fmt.qmin and fmt.qmax <= info.max


@pytest.mark.parametrize("bits", range(2, 17))
def test_act_format_is_unsigned_full_range(bits):
    fmt = act_format(bits)
    assert (fmt.qmin, fmt.qmax) == (0, 2**bits - 1)
    assert fmt.onnx_type == unsigned_type(bits)
    assert np.iinfo(fmt.numpy_dtype).max >= fmt.qmax and np.iinfo(fmt.numpy_dtype).min == 0


def test_two_bit_weights_are_ternary_and_int2_container_is_int4():
    assert (weight_format(2).qmin, weight_format(2).qmax) == (-1, 1)
    assert weight_format(2).onnx_type == TensorProto.INT2
    assert weight_format(2, int2_container=True).onnx_type == TensorProto.INT4
    assert weight_format(2, int2_container=True).qmax == 1
    assert weight_format(4, int2_container=True).onnx_type == TensorProto.INT4
    assert weight_format(8, int2_container=True).onnx_type == TensorProto.INT8


@pytest.mark.parametrize("bad", [0, 1, 17, 32, -4, 4.0, "8", None, True])
def test_unsupported_widths_are_user_errors(bad):
    with pytest.raises(OnnxmpqError):
        weight_format(bad)
    with pytest.raises(OnnxmpqError):
        act_format(bad)


def test_numpy_integer_widths_are_accepted():
    assert weight_format(np.int64(4)).qmax == 7


@pytest.mark.parametrize("bits, per_byte", [(2, 4), (3, 2), (4, 2), (6, 1), (8, 1), (12, 0.5), (16, 0.5)])
@pytest.mark.parametrize("count", [0, 1, 5, 8, 1001])
def test_storage_bytes(bits, per_byte, count):
    assert weight_format(bits).storage_bytes(count) == math.ceil(count / per_byte)


def test_opsets_and_type_names():
    assert weight_format(2).opset == 25 and weight_format(2).type_name == "INT2"
    assert weight_format(4).opset == 21 and weight_format(3).type_name == "INT4"
    assert weight_format(8).opset == 13 and act_format(8).type_name == "UINT8"
    assert weight_format(16).opset == 21 and act_format(16).type_name == "UINT16"
    assert required_opset([]) == 21
    assert required_opset([weight_format(8), act_format(8)]) == 21
    assert required_opset([weight_format(4), weight_format(2)]) == 25
    assert required_opset([weight_format(2, int2_container=True)]) == 21


# --- packing: hand-computed bytes --------------------------------------------------------------------


def test_pack_int4_low_nibble_first():
    # 1 -> 0x1, -1 -> 0xF, 7 -> 0x7, -7 -> 0x9, 3 -> 0x3 (padding nibble 0)
    assert pack(np.array([1, -1, 7, -7, 3], np.int8), weight_format(4)) == bytes([0xF1, 0x97, 0x03])


def test_pack_int2_four_per_byte():
    # [1, -1, 0, 1] -> 0b01_00_11_01 = 0x4D; [-1] -> 0b11
    assert pack(np.array([1, -1, 0, 1, -1], np.int8), weight_format(2)) == bytes([0x4D, 0x03])


def test_pack_uint4_and_wide_types_little_endian():
    assert pack(np.array([15, 0, 5]), act_format(4)) == bytes([0x0F, 0x05])
    assert pack(np.array([-3, 127], np.int8), weight_format(8)) == bytes([0xFD, 0x7F])
    assert pack(np.array([-2, 300], np.int16), weight_format(16)) == bytes([0xFE, 0xFF, 0x2C, 0x01])
    assert pack(np.array([65535, 1]), act_format(16)) == bytes([0xFF, 0xFF, 0x01, 0x00])
    assert pack(np.array([[1, 2], [3, 4]], np.int8), weight_format(8)) == bytes([1, 2, 3, 4])


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 8, 11, 16]), signed=st.booleans(),
       shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_packed_tensor_round_trips_through_numpy_helper(bits, signed, shape, seed):
    fmt = weight_format(bits) if signed else act_format(bits)
    values = np.random.default_rng(seed).integers(fmt.qmin, fmt.qmax + 1, size=shape)
    data = pack(values, fmt)
    assert len(data) == fmt.storage_bytes(values.size)
    tensor = helper.make_tensor("t", fmt.onnx_type, list(values.shape), data, raw=True)
    back = numpy_helper.to_array(tensor)
    assert back.shape == values.shape
    np.testing.assert_array_equal(back.astype(np.int64), values)
