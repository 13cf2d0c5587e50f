"""integrity.check_tensor_sizes: every legitimate storage form passes, a tensor short of its dims fails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph.integrity import check_tensor_sizes


def raw(dtype: int, dims, nbytes: int) -> TensorProto:
    tensor = TensorProto(name="t", data_type=dtype, dims=dims)
    tensor.raw_data = b"\x01" * nbytes
    return tensor


@pytest.mark.parametrize("tensor", [
    raw(TensorProto.FLOAT, [2, 3], 24), raw(TensorProto.INT8, [5], 5), raw(TensorProto.FLOAT16, [3], 6),
    raw(TensorProto.INT4, [5], 3), raw(TensorProto.UINT4, [4], 2), raw(TensorProto.INT2, [5], 2),
    raw(TensorProto.FLOAT4E2M1, [15], 8), raw(TensorProto.FLOAT6E2M3, [4], 3), raw(TensorProto.FLOAT, [0, 4], 0),
    helper.make_tensor("t", TensorProto.FLOAT16, [3], np.ones(3, np.float16)),  # int32_data
    helper.make_tensor("t", TensorProto.INT4, [5], [1, 2, 3, 4, 5]),          # packed into int32_data
    helper.make_tensor("t", TensorProto.BOOL, [2], [True, False]),
    helper.make_tensor("t", TensorProto.STRING, [2], [b"a", b"b"]),
    onnx.numpy_helper.from_array(np.float32(3.0), "scalar"),
], ids=lambda t: f"{TensorProto.DataType.Name(t.data_type)}{list(t.dims)}{'raw' if t.HasField('raw_data') else ''}")
def test_legitimate_tensors_pass(tensor):
    check_tensor_sizes([tensor])


@pytest.mark.parametrize("tensor", [raw(TensorProto.FLOAT, [2, 3], 20), raw(TensorProto.INT4, [5], 2),
                                    TensorProto(name="t", data_type=TensorProto.FLOAT, dims=[3], float_data=[1.0, 2.0])],
                         ids=["float-raw", "int4-raw", "float-typed"])
def test_a_tensor_short_of_its_dims_fails(tensor):
    with pytest.raises(OnnxmpqError, match="where its shape needs"):
        check_tensor_sizes([tensor])
