"""Tiny ONNX models built in code, shared by the tests of graph, ops, write, verify and report.

Each builder returns an `onnx.ModelProto` (float32, batch dimension "N") and is exposed as a fixture of
the same name; `MODELS` lists the single-layer-kind builders for parametrized tests.

Tiers: tests/<package>/test_<module>.py mirror the package (the unit tier, `make test-fast`); tests/e2e/
drive the CLI and real models end to end and carry the `e2e` marker, as do unit-file tests marked `@pytest.mark.e2e`
(a real model's sweep); `slow` ones run only with `make test-all`.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxmpq import types
from onnxmpq.calibrate.ranges import Histogram

F = TensorProto.FLOAT


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ is in the end-to-end tier."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def arr(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def model(nodes, inputs, outputs, inits=(), opset=13, name="g"):
    inits = [numpy_helper.from_array(a, n) for n, a in dict(inits).items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def node(op, ins, outs, name="", **attrs):
    return helper.make_node(op, ins, outs, name=name, **attrs)


# --- builders ---------------------------------------------------------------------------------------


def build_cnn(opset=13):
    """x(N,3,8,8) -Conv3x3(8)+b- Relu -Conv3x3/2(4)- Flatten -Gemm(10, transB)+b- y(N,10)."""
    return model(
        [node("Conv", ["x", "W1", "B1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
         node("Relu", ["c1"], ["r1"], "relu1"),
         node("Conv", ["r1", "W2"], ["c2"], "conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
         node("Flatten", ["c2"], ["f"], "flatten"),
         node("Gemm", ["f", "W3", "B3"], ["y"], "fc", transB=1)],
        [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10])],
        {"W1": arr(1, 8, 3, 3, 3, scale=0.3), "B1": arr(2, 8, scale=0.1), "W2": arr(3, 4, 8, 3, 3, scale=0.2),
         "W3": arr(4, 10, 64, scale=0.2), "B3": arr(5, 10, scale=0.1)}, opset)


def build_grouped():
    """x(N,4,6,6) -Conv(6, group 2, 3x3)- -depthwise Conv(6, group 6, 3x3, pad 1)- y(N,6,4,4)."""
    return model(
        [node("Conv", ["x", "Wg"], ["g"], "grouped", group=2),
         node("Conv", ["g", "Wd", "Bd"], ["y"], "depthwise", group=6, pads=[1, 1, 1, 1])],
        [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 6, 4, 4])],
        {"Wg": arr(6, 6, 2, 3, 3, scale=0.3), "Wd": arr(7, 6, 1, 3, 3, scale=0.5), "Bd": arr(8, 6, scale=0.1)})


def build_convtranspose():
    """x(N,4,5,5) -ConvTranspose(W (4,3,3,3), stride 2)- y(N,3,11,11)."""
    return model([node("ConvTranspose", ["x", "Wt", "Bt"], ["y"], "deconv", strides=[2, 2])],
                 [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 3, 11, 11])],
                 {"Wt": arr(9, 4, 3, 3, 3, scale=0.3), "Bt": arr(10, 3, scale=0.1)})


def build_matmul_right():
    """x(N,6,8) @ Wr(8,5) -> y(N,6,5)."""
    return model([node("MatMul", ["x", "Wr"], ["y"], "mm_right")], [vi("x", ["N", 6, 8])], [vi("y", ["N", 6, 5])],
                 {"Wr": arr(11, 8, 5, scale=0.4)})


def build_matmul_left():
    """Wl(5,6) @ x(N,6,7) -> y(N,5,7)."""
    return model([node("MatMul", ["Wl", "x"], ["y"], "mm_left")], [vi("x", ["N", 6, 7])], [vi("y", ["N", 5, 7])],
                 {"Wl": arr(12, 5, 6, scale=0.4)})


def build_gemm(trans_b=0):
    """x(N,8) -Gemm(B (8,5), or (5,8) with transB=1)+C- y(N,5)."""
    w = arr(13, 8, 5, scale=0.4)
    return model([node("Gemm", ["x", "Wgemm", "Cgemm"], ["y"], f"gemm_t{trans_b}", transB=trans_b)],
                 [vi("x", ["N", 8])], [vi("y", ["N", 5])],
                 {"Wgemm": w.T.copy() if trans_b else w, "Cgemm": arr(14, 5, scale=0.1)})


def build_constant_weights():
    """x(N,2,4,4) -Conv(W from a Constant node, B from a value_floats Constant)- y(N,3,2,2)."""
    w = helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(arr(15, 3, 2, 3, 3)))
    b = helper.make_node("Constant", [], ["Bc"], value_floats=[0.1, -0.2, 0.3])
    return model([w, b, node("Conv", ["x", "Wc", "Bc"], ["y"], "conv_c")],
                 [vi("x", ["N", 2, 4, 4])], [vi("y", ["N", 3, 2, 2])])


def build_if_model():
    """x(N,2,4,4) -Conv- h; If(cond): then Conv(h) else Identity(h) -> y."""
    then = helper.make_graph([node("Conv", ["h", "Wthen"], ["t"], "conv_in_then", pads=[1, 1, 1, 1])], "then", [],
                             [vi("t", ["N", 2, 4, 4])], [numpy_helper.from_array(arr(16, 2, 2, 3, 3), "Wthen")])
    other = helper.make_graph([node("Identity", ["h"], ["e"], "id_else")], "else", [], [vi("e", ["N", 2, 4, 4])])
    return model([node("Conv", ["x", "Wtop"], ["h"], "conv_top", pads=[1, 1, 1, 1]),
                  node("If", ["cond"], ["y"], "branch", then_branch=then, else_branch=other)],
                 [vi("x", ["N", 2, 4, 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", ["N", 2, 4, 4])],
                 {"Wtop": arr(17, 2, 2, 3, 3)})


def build_unnamed():
    """Two unnamed Convs, then two Relus both named "dup" and a Gemm named "Conv_0"."""
    return model([node("Conv", ["x", "Wa"], ["a"]), node("Relu", ["a"], ["b"], "dup"),
                  node("Conv", ["b", "Wb"], ["c"]), node("Relu", ["c"], ["d"], "dup"),
                  node("Flatten", ["d"], ["e"], "flat"), node("Gemm", ["e", "Wf"], ["y"], "Conv_0", transB=1)],
                 [vi("x", ["N", 2, 3, 3])], [vi("y", ["N", 4])],
                 {"Wa": arr(18, 2, 2, 1, 1), "Wb": arr(19, 2, 2, 1, 1), "Wf": arr(20, 4, 18)})


MODELS = {"cnn": build_cnn, "grouped": build_grouped, "convtranspose": build_convtranspose,
          "matmul_right": build_matmul_right, "matmul_left": build_matmul_left,
          "gemm_t0": lambda: build_gemm(0), "gemm_t1": lambda: build_gemm(1)}


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def cnn():
    return build_cnn()


@pytest.fixture
def if_model():
    return build_if_model()


@pytest.fixture
def constant_weights():
    return build_constant_weights()


@pytest.fixture
def unnamed():
    return build_unnamed()


@pytest.fixture
def external_model(tmp_path):
    """The cnn saved with every tensor over 64 bytes in `weights.data` beside `model.onnx`; returns the path."""
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(build_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.data", size_threshold=64)
    return path


# --- helpers ----------------------------------------------------------------------------------------


def feed_for(proto: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input (dynamic dims = `batch`; booleans are True)."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in proto.graph.input:
        ttype = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in ttype.shape.dim]
        if ttype.elem_type == TensorProto.BOOL:
            out[value.name] = np.ones(dims, dtype=bool)
        else:
            dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
            out[value.name] = rng.normal(size=dims).astype(dtype)
    return out


def activation_stats(proto: onnx.ModelProto, feed: dict[str, np.ndarray], names, logits=None) -> dict:
    """Exact statistics of the named tensors, or of each group {name: [tensors]} (one histogram over its
    tensors; row maxima for the groups in `logits`), computed with onnx's reference evaluator (not
    onnxruntime)."""
    values = ReferenceEvaluator(proto).run(None, feed, intermediate=True)
    values = {**feed, **values}
    groups = names if isinstance(names, dict) else {name: [name] for name in names}
    stats = {}
    for name, members in groups.items():
        hist = Histogram(name, floor_axis=(logits or {}).get(name))
        for member in members:
            hist.update(values[member])
        stats[name] = hist.stats()
    return stats


def uniform(m, wb, ab, options=None) -> dict:
    """Every unit of the loaded model `m` at (wb, ab): weight bits for its weighted layers only."""
    from onnxmpq.types import Candidate, QuantOptions

    options = options or QuantOptions()
    return {u.name: Candidate(wb if u.layer else None, ab) for u in m.points(options).units}


def group_stats(m, feed, options=None) -> dict:
    """Exact statistics of every tensor group of the loaded model `m` (see `activation_stats`)."""
    from onnxmpq.types import QuantOptions

    options = options or QuantOptions()
    points = m.points(options)
    return activation_stats(m.proto, feed, points.groups(), points.logits)


class ArraySource:
    """A DataSource over in-memory arrays (what `calibrate.read` gives, for tests that skip the readers)."""

    def __init__(self, **arrays):
        self.arrays = arrays

    def batches(self, batch_size):
        n = len(next(iter(self.arrays.values())))
        for i in range(0, n, batch_size):
            yield types.Batch({k: v[i:i + batch_size] for k, v in self.arrays.items()})

    def __len__(self):
        return len(next(iter(self.arrays.values())))


# ---------------------------------------------------------------- shared helpers of the CLI and checker tests


def cli(*args) -> tuple[int, str, str]:
    """Runs `onnxmpq ARGS` in-process: (exit code, stdout, stderr)."""
    from onnxmpq.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, out: str) -> str:
    """The single `error: ...` line a failed command prints (no traceback anywhere)."""
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def ort_reader(samples: np.ndarray, name: str = "input"):
    """onnxruntime's CalibrationDataReader over `samples`, one sample per batch."""
    from onnxruntime import quantization

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{name: samples[i:i + 1]} for i in range(len(samples))])

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


def build_encoder(layers: int = 2, d: int = 32, heads: int = 2, seq: int = 8, vocab: int = 50, ffn: int = 64,
                  seed: int = 0, mask: bool = False):
    """A BERT-style encoder: ids(N,S) -Gather(word table)- + position table - LayerNorm, then `layers` blocks
    of self-attention (MatMul+Add projections, Q K^T and P V MatMuls of two activations, Div by sqrt(dh),
    Softmax, residual Add, LayerNorm) and a feed-forward part (MatMul+Add, GELU in its Erf form,
    MatMul+Add, residual Add, LayerNorm); output the hidden states (N,S,D). Opset 17. With `mask`, a
    second input attention_mask (N,S) int64 enters as BERT's exports write it: (1 - Cast(mask)) * -10000,
    unsqueezed to (N,1,1,S) and added to the scaled scores before the Softmax."""
    rng = np.random.default_rng(seed)
    dh = d // heads
    inits: dict[str, np.ndarray] = {}
    nodes = []

    def const(name, array):
        inits[name] = np.asarray(array)
        return name

    def weight(name, *shape, scale=None):
        return const(name, (rng.normal(size=shape) * (scale or 1 / np.sqrt(shape[0]))).astype(np.float32))

    def op(kind, ins, out, **attrs):
        nodes.append(node(kind, ins, [out], out, **attrs))
        return out

    def dense(x, name, k, n):
        y = op("MatMul", [x, weight(f"{name}.W", k, n)], f"{name}/MatMul")
        return op("Add", [y, weight(f"{name}.b", n, scale=0.02)], f"{name}/Add")

    def norm(x, name):
        return op("LayerNormalization", [x, const(f"{name}.g", (1 + 0.1 * rng.normal(size=d)).astype(np.float32)),
                                         weight(f"{name}.b", d, scale=0.02)], f"{name}/LN", axis=-1, epsilon=1e-5)

    def heads_of(x, name):  # (N, S, D) -> (N, H, S, dh)
        r = op("Reshape", [x, const(f"{name}.shape", np.array([0, seq, heads, dh], np.int64))], f"{name}/Reshape")
        return op("Transpose", [r], f"{name}/Transpose", perm=[0, 2, 1, 3])

    words = op("Gather", [weight("emb.words", vocab, d, scale=1.0), "ids"], "emb/Gather", axis=0)
    h = norm(op("Add", [words, weight("emb.positions", seq, d, scale=0.5)], "emb/Add"), "emb")
    if mask:
        keep = op("Cast", ["attention_mask"], "mask/Cast", to=TensorProto.FLOAT)
        neg = op("Mul", [op("Sub", [const("mask.one", np.array(1, np.float32)), keep], "mask/Sub"),
                         const("mask.big", np.array(-10000, np.float32))], "mask/Mul")
        extended = op("Unsqueeze", [neg, const("mask.axes", np.array([1, 2], np.int64))], "mask/Unsqueeze")
    for i in range(layers):
        p = f"l{i}"
        q, k, v = (heads_of(dense(h, f"{p}.{t}", d, d), f"{p}.{t}h") for t in "qkv")
        kt = op("Transpose", [k], f"{p}/kT", perm=[0, 1, 3, 2])
        scores = op("Div", [op("MatMul", [q, kt], f"{p}/QK"), const(f"{p}.sqrt_dh", np.array(np.sqrt(dh), np.float32))],
                    f"{p}/scale")
        if mask:
            scores = op("Add", [scores, extended], f"{p}/mask")
        ctx = op("MatMul", [op("Softmax", [scores], f"{p}/Softmax", axis=-1), v], f"{p}/PV")
        ctx = op("Reshape", [op("Transpose", [ctx], f"{p}/ctxT", perm=[0, 2, 1, 3]),
                             const(f"{p}.ctx_shape", np.array([0, seq, d], np.int64))], f"{p}/ctx")
        h = norm(op("Add", [dense(ctx, f"{p}.o", d, d), h], f"{p}/res1"), f"{p}.ln1")
        up = dense(h, f"{p}.up", d, ffn)
        erf = op("Erf", [op("Div", [up, const(f"{p}.sqrt2", np.array(np.sqrt(2), np.float32))], f"{p}/gelu_div")],
                 f"{p}/gelu_erf")
        gelu = op("Mul", [op("Mul", [up, op("Add", [erf, const(f"{p}.one", np.array(1, np.float32))], f"{p}/gelu_add")],
                             f"{p}/gelu_mul"), const(f"{p}.half", np.array(0.5, np.float32))], f"{p}/gelu")
        h = norm(op("Add", [dense(gelu, f"{p}.down", ffn, d), h], f"{p}/res2"), f"{p}.ln2")
    nodes.append(node("Identity", [h], ["hidden"], "out"))
    inputs = [vi("ids", ["N", seq], TensorProto.INT64)]
    if mask:
        inputs.append(vi("attention_mask", ["N", seq], TensorProto.INT64))
    return model(nodes, inputs, [vi("hidden", ["N", seq, d])], inits, opset=17)
