"""Tests of the calibration/evaluation data readers (onnxmpq.calibrate.readers, .arrays, .images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper
from PIL import Image

from onnxmpq.calibrate import images as images_module
from onnxmpq.calibrate.readers import READERS, Preprocess, check_batch, detect_reader, open_source
from onnxmpq.errors import OnnxmpqError
from onnxmpq.types import InputSpec

F32 = np.dtype(np.float32)
CIFAR = Path(__file__).resolve().parents[2] / "data" / "cifar10-test"


def spec(name: str = "x", shape=(None, 3, 4, 4), dtype=F32) -> InputSpec:
    return InputSpec(name, np.dtype(dtype), tuple(shape))


X = [spec()]
XY = [spec("x", (None, 3)), spec("y", (None, 2), np.int64)]


def collect(source, batch_size):
    batches = list(source.batches(batch_size))
    return batches, [b.size for b in batches]


def cat(batches, key):
    return np.concatenate([b.inputs[key] for b in batches])


def cat_labels(batches):
    return np.concatenate([b.labels for b in batches])


def save_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


# --- npz / npy / folder -------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_batches_with_labels(tmp_path, compressed):
    x = np.random.default_rng(0).normal(size=(10, 3, 4, 4)).astype(np.float32)
    labels = np.arange(10) % 3
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, labels=labels)
    source = open_source(path, X)
    assert isinstance(source.reader, READERS.get("npz"))
    assert len(source) == 10
    batches, sizes = collect(source, 4)
    assert sizes == [4, 4, 2]
    assert all(b.inputs["x"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(cat(batches, "x"), x)
    np.testing.assert_array_equal(cat_labels(batches), labels)
    # a second pass gives the same data
    np.testing.assert_array_equal(cat(list(source.batches(3)), "x"), x)


def test_npz_two_inputs_cast_and_limit(tmp_path):
    x, y = np.random.default_rng(1).normal(size=(9, 3)), np.arange(18, dtype=np.int32).reshape(9, 2)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    source = open_source(tmp_path / "d.npz", XY, limit=5)
    assert len(source) == 5
    batches, sizes = collect(source, 4)
    assert sizes == [4, 1]
    assert batches[0].labels is None
    assert batches[0].inputs["x"].dtype == np.float32  # float64 data cast to the model's float32
    assert batches[0].inputs["y"].dtype == np.int64  # int32 widened to int64
    np.testing.assert_allclose(cat(batches, "x"), x[:5].astype(np.float32))
    np.testing.assert_array_equal(cat(batches, "y"), y[:5])


def test_npz_fortran_order_array(tmp_path):
    x = np.asfortranarray(np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32))
    np.savez(tmp_path / "d.npz", x=x)
    batches, sizes = collect(open_source(tmp_path / "d.npz", [spec("x", (None, 3))]), 2)
    assert sizes == [2, 2, 1]
    np.testing.assert_array_equal(cat(batches, "x"), x)


def test_npz_single_sample_without_batch_axis(tmp_path):
    x = np.ones((3, 4, 4), np.float32)
    np.savez(tmp_path / "one.npz", x=x, labels=np.array(2))
    batches, sizes = collect(open_source(tmp_path / "one.npz", X), 8)
    assert sizes == [1]
    assert batches[0].inputs["x"].shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(batches[0].labels, [2])


def test_npz_missing_input_name_lists_found_and_expected(tmp_path):
    np.savez(tmp_path / "d.npz", image=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(OnnxmpqError) as info:
        open_source(tmp_path / "d.npz", X)
    text = str(info.value)
    assert "no array for model input(s) 'x'" in text
    assert "unexpected key(s) 'image'" in text
    assert "keys found: image" in info.value.hint and "(x)" in info.value.hint


def test_npz_without_input_arrays_and_zero_samples(tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(OnnxmpqError, match="holds no input arrays"):
        open_source(tmp_path / "empty.npz", X)
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    with pytest.raises(OnnxmpqError, match=r"holds no input arrays \(keys: labels\)"):
        open_source(tmp_path / "labels.npz", X)
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(OnnxmpqError, match="holds 0 samples"):
        open_source(tmp_path / "zero.npz", X)


def test_npz_sample_count_mismatch_and_float_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 4, 4), np.float32), labels=np.arange(3))
    with pytest.raises(OnnxmpqError, match=r"different numbers of samples \(x: 4, labels: 3\)"):
        open_source(tmp_path / "d.npz", X)
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 3, 4, 4), np.float32), labels=np.array([0.0, 1.0]))
    with pytest.raises(OnnxmpqError, match="labels .* have dtype float64, not integer"):
        list(open_source(tmp_path / "f.npz", X).batches(2))


def test_npz_refuses_pickled_objects(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(OnnxmpqError, match="never unpickles"):
        open_source(tmp_path / "o.npz", [spec("x", (None,))])


def test_npy_single_input_memory_mapped(tmp_path):
    x = np.random.default_rng(3).normal(size=(7, 3, 4, 4))
    np.save(tmp_path / "d.npy", x)
    source = open_source(tmp_path / "d.npy", X)
    assert len(source) == 7
    batches, sizes = collect(source, 3)
    assert sizes == [3, 3, 1]
    assert batches[0].inputs["x"].dtype == np.float32 and batches[0].labels is None
    np.testing.assert_allclose(cat(batches, "x"), x.astype(np.float32))


def test_npy_for_two_input_model_is_an_error(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((2, 3)))
    with pytest.raises(OnnxmpqError, match=r"holds one array but the model has 2 inputs \(x, y\)") as info:
        open_source(tmp_path / "d.npy", XY)
    assert "npz" in info.value.hint


def test_folder_of_npz_and_npy_in_sorted_order(tmp_path):
    rng = np.random.default_rng(4)
    parts = [rng.normal(size=(n, 3, 4, 4)).astype(np.float32) for n in (3, 1, 4)]
    np.savez(tmp_path / "b.npz", x=parts[1])
    np.save(tmp_path / "a.npy", parts[0])
    np.savez(tmp_path / "c.npz", x=parts[2])
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_source(tmp_path, X)
    assert isinstance(source.reader, READERS.get("folder"))
    assert len(source) == 8
    batches, sizes = collect(source, 3)
    assert sizes == [3, 3, 2]
    np.testing.assert_array_equal(cat(batches, "x"), np.concatenate(parts))


def test_folder_labels_must_be_all_or_none(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 4, 4), np.float32), labels=np.array([0, 1]))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3, 4, 4), np.float32), labels=np.array([1, 0]))
    batches, _ = collect(open_source(tmp_path, X), 3)
    np.testing.assert_array_equal(cat_labels(batches), [0, 1, 1, 0])
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(OnnxmpqError, match="some samples come with labels and others without"):
        list(open_source(tmp_path, X).batches(3))


def test_missing_path_empty_folder_and_unknown_files(tmp_path):
    with pytest.raises(OnnxmpqError, match="does not exist"):
        open_source(tmp_path / "nope.npz", X)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxmpqError, match=r"holds no usable data \(it is empty\)") as info:
        open_source(tmp_path / "empty", X)
    assert ".npz/.npy" in info.value.hint
    junk = tmp_path / "junk"
    (junk / "sub").mkdir(parents=True)
    (junk / "a.txt").write_text("x")
    (junk / "b.txt").write_text("x")
    with pytest.raises(OnnxmpqError, match=r"found 2 \.txt file\(s\), 1 sub-folder\(s\) without images"):
        open_source(junk, X)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(OnnxmpqError, match="is not a .npz or .npy file"):
        open_source(tmp_path / "data.csv", X)


def test_reader_by_name_and_unknown_reader(tmp_path):
    np.savez(tmp_path / "d.bin", x=np.zeros((2, 3, 4, 4), np.float32))  # savez appends .npz
    assert len(open_source(tmp_path / "d.bin.npz", X, reader="npz")) == 2
    with pytest.raises(OnnxmpqError, match="unknown data reader 'csv'"):
        open_source(tmp_path / "d.bin.npz", X, reader="csv")
    with pytest.raises(OnnxmpqError, match="cannot read data from a int"):
        open_source(3, X)


def test_bad_limit_and_batch_size(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(OnnxmpqError, match="limit must be a positive integer"):
        open_source(tmp_path / "d.npz", X, limit=0)
    with pytest.raises(OnnxmpqError, match="batch size must be a positive integer"):
        list(open_source(tmp_path / "d.npz", X).batches(0))


# --- ONNX test data -----------------------------------------------------------------------------


def write_test_set(folder: Path, tensors) -> None:
    folder.mkdir(parents=True)
    for i, (name, array) in enumerate(tensors):
        (folder / f"input_{i}.pb").write_bytes(numpy_helper.from_array(array, name).SerializeToString())
    (folder / "output_0.pb").write_bytes(numpy_helper.from_array(np.zeros(1, np.float32), "out").SerializeToString())


def test_onnx_test_data_by_name_and_by_index(tmp_path):
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(3)]
    ys = [np.full((2, 2), i, np.int64) for i in range(3)]
    # set 0 names its tensors in reverse file order; set 1 is unnamed (index order); set 10 sorts last
    write_test_set(tmp_path / "test_data_set_0", [("y", ys[0]), ("x", xs[0])])
    write_test_set(tmp_path / "test_data_set_1", [("", xs[1]), ("", ys[1])])
    write_test_set(tmp_path / "test_data_set_10", [("x", xs[2]), ("y", ys[2])])
    source = open_source(tmp_path, XY)
    assert isinstance(source.reader, READERS.get("onnx-test-data"))
    assert len(source) == 6
    batches, sizes = collect(source, 4)
    assert sizes == [4, 2]
    np.testing.assert_array_equal(cat(batches, "x"), np.concatenate(xs))
    np.testing.assert_array_equal(cat(batches, "y"), np.concatenate(ys))
    one = open_source(tmp_path / "test_data_set_1", XY)
    np.testing.assert_array_equal(next(iter(one.batches(8))).inputs["y"], ys[1])


def test_onnx_test_data_single_sample_and_bad_proto(tmp_path):
    write_test_set(tmp_path / "test_data_set_0", [("x", np.ones((3, 4, 4), np.float32))])
    batches, sizes = collect(open_source(tmp_path, X), 2)
    assert sizes == [1] and batches[0].inputs["x"].shape == (1, 3, 4, 4)
    (tmp_path / "test_data_set_0" / "input_0.pb").write_bytes(b"\xff\xff not a proto")
    with pytest.raises(OnnxmpqError, match="is not a serialized onnx.TensorProto"):
        list(open_source(tmp_path, X, reader="onnx-test-data").batches(2))


# --- python reader ------------------------------------------------------------------------------


class DictReader:
    """onnxruntime CalibrationDataReader-like: one dict of batch 1 per get_next()."""

    def __init__(self, n: int, labels: bool = False):
        self.data = [np.full((1, 3), i, np.float32) for i in range(n)]
        self.labels = labels
        self.calls = 0
        self._it = iter(self.data)

    def get_next(self):
        self.calls += 1
        x = next(self._it, None)
        if x is None:
            return None
        return {"x": x, "labels": np.array([int(x[0, 0])])} if self.labels else {"x": x}


class RewindReader(DictReader):
    def rewind(self):
        self._it = iter(self.data)


def test_python_reader_with_rewind_groups_and_repeats():
    obj = RewindReader(7, labels=True)
    source = open_source(obj, [spec("x", (None, 3))])
    assert isinstance(source.reader, READERS.get("python"))
    assert len(source) == 0  # unknown
    for _ in range(2):
        batches, sizes = collect(source, 3)
        assert sizes == [3, 3, 1]
        np.testing.assert_array_equal(cat(batches, "x")[:, 0], np.arange(7))
        np.testing.assert_array_equal(cat_labels(batches), np.arange(7))


def test_python_reader_without_rewind_only_once():
    source = open_source(DictReader(4), [spec("x", (None, 3))])
    _, sizes = collect(source, 2)
    assert sizes == [2, 2]
    with pytest.raises(OnnxmpqError, match="cannot be rewound") as info:
        list(source.batches(2))
    assert "rewind()" in info.value.hint


def test_python_reader_limit_stops_reading():
    obj = DictReader(100)
    batches, sizes = collect(open_source(obj, [spec("x", (None, 3))], limit=5), 2)
    assert sizes == [2, 2, 1]
    assert obj.calls <= 6


def test_python_reader_splits_and_keeps_unmergeable_shapes_apart():
    class Items:
        def __init__(self, items):
            self.items = list(items)

        def __len__(self):
            return sum(len(i["x"]) for i in self.items)

        def get_next(self):
            return self.items.pop(0) if self.items else None

    chunks = [np.full((2, 3), i, np.float32) for i in range(3)]
    source = open_source(Items({"x": c} for c in chunks), [spec("x", (None, 3))])
    assert len(source) == 6
    batches, sizes = collect(source, 4)  # dicts of 2 are re-cut into 4 + 2
    assert sizes == [4, 2]
    np.testing.assert_array_equal(cat(batches, "x")[:, 0], [0, 0, 1, 1, 2, 2])
    # a dynamic dim that changes (e.g. sequence length) starts a new batch instead of failing
    seqs = [np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32), np.zeros((1, 5), np.float32)]
    batches, sizes = collect(open_source(Items({"x": c} for c in seqs), [spec("x", (None, None))]), 4)
    assert sizes == [2, 1]
    assert [b.inputs["x"].shape[1] for b in batches] == [3, 5]


def test_python_reader_with_no_samples_is_an_error():
    with pytest.raises(OnnxmpqError, match="yielded no samples"):
        list(open_source(DictReader(0), [spec("x", (None, 3))]).batches(2))


def test_python_reader_bad_items():
    class Bad:
        def get_next(self):
            return [1, 2, 3]

    with pytest.raises(OnnxmpqError, match="returned a list, not a dict"):
        list(open_source(Bad(), X).batches(2))
    with pytest.raises(OnnxmpqError, match="has no get_next"):
        open_source(object(), X, reader="python")


# --- check_batch --------------------------------------------------------------------------------


def test_check_batch_accepts_and_casts():
    out = check_batch({"x": np.zeros((5, 3, 4, 4)), "y": np.zeros((7, 2), np.int32)}, [X[0], XY[1]])
    assert list(out) == ["x", "y"]
    assert out["x"].dtype == np.float32 and out["x"].shape[0] == 5
    assert out["y"].dtype == np.int64


def test_check_batch_missing_and_unexpected_names():
    with pytest.raises(OnnxmpqError) as info:
        check_batch({"x": np.zeros((1, 3)), "z": np.zeros((1, 2))}, XY)
    assert "missing input(s) 'y'" in str(info.value) and "unexpected key(s) 'z'" in str(info.value)
    assert "the model's inputs are: x, y" in info.value.hint


def test_check_batch_wrong_rank_and_static_dim():
    with pytest.raises(OnnxmpqError, match=r"'x' has rank 3 .* expects rank 4 \(\?, 3, 4, 4\)"):
        check_batch({"x": np.zeros((2, 4, 4), np.float32)}, X)
    with pytest.raises(OnnxmpqError, match=r"'x' has size 5 in dim 2 .* expects 4"):
        check_batch({"x": np.zeros((2, 3, 5, 4), np.float32)}, X)
    with pytest.raises(OnnxmpqError, match=r"'x' has size 1 in dim 1 .* expects 3"):
        check_batch({"x": np.zeros((2, 1, 4, 4), np.float32)}, X)
    # dim 0 is the batch: any size even when the model's is static; a dynamic dim accepts anything
    assert check_batch({"x": np.zeros((5, 3, 4, 4), np.float32)}, [spec("x", (1, 3, 4, 4))])["x"].shape[0] == 5
    assert check_batch({"x": np.zeros((2, 7), np.float32)}, [spec("x", (None, None))])["x"].shape == (2, 7)


def test_check_batch_wrong_dtype():
    with pytest.raises(OnnxmpqError, match="'x' has dtype uint8 but the model expects float32"):
        check_batch({"x": np.zeros((2, 3, 4, 4), np.uint8)}, X)
    with pytest.raises(OnnxmpqError, match="'y' has dtype float32 but the model expects int64"):
        check_batch({"x": np.zeros((1, 3)), "y": np.zeros((1, 2), np.float32)}, XY)
    with pytest.raises(OnnxmpqError, match="'y' has dtype uint64 but the model expects int64"):
        check_batch({"x": np.zeros((1, 3)), "y": np.zeros((1, 2), np.uint64)}, XY)


def test_check_batch_nan_and_inf_counted():
    x = np.zeros((2, 3, 4, 4), np.float32)
    x[0, 0, 0, :3] = np.nan
    x[1, 2, 3, 3] = -np.inf
    with pytest.raises(OnnxmpqError, match=r"'x' has 4 NaN/Inf value\(s\) \(of 96\)"):
        check_batch({"x": x}, X)
    with pytest.raises(OnnxmpqError, match=r"'x' has 1 NaN/Inf"):  # overflows when cast to float32
        big = np.zeros((1, 3, 4, 4))
        big[0, 0, 0, 0] = 1e300
        check_batch({"x": big}, X)


def test_nan_beyond_the_limit_is_not_read(tmp_path):
    x = np.zeros((6, 3, 4, 4), np.float32)
    x[5] = np.nan
    np.savez(tmp_path / "d.npz", x=x)
    _, sizes = collect(open_source(tmp_path / "d.npz", X, limit=5), 5)
    assert sizes == [5]
    with pytest.raises(OnnxmpqError, match="NaN/Inf"):
        list(open_source(tmp_path / "d.npz", X).batches(5))


# --- Preprocess ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"resize": "crop"}, "Preprocess.resize must be one of 'stretch', 'shorter', 'none'"),
        ({"crop": "top"}, "Preprocess.crop must be one of 'center', 'none'"),
        ({"layout": "CHW"}, "Preprocess.layout must be one of 'NCHW', 'NHWC'"),
        ({"channel_order": "RGBA"}, "Preprocess.channel_order must be one of 'RGB', 'BGR', 'L'"),
        ({"size": (0, 3)}, "Preprocess.size must be None or (height, width)"),
        ({"scale": -1.0}, "Preprocess.scale must be one number > 0"),
        ({"std": (1.0, 0.0, 1.0)}, "Preprocess.std must be > 0"),
        ({"mean": (0.1, 0.2)}, "Preprocess.mean needs 1 or 3 values"),
        ({"mean": (0.1, 0.2, 0.3), "channel_order": "L"}, "Preprocess.mean needs 1 or 1 values"),
    ],
)
def test_preprocess_validation(kwargs, fragment):
    with pytest.raises(OnnxmpqError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Preprocess(**kwargs)


def test_preprocess_from_metadata():
    assert Preprocess.from_metadata({"other": "1"}) is None
    doc = {"size": [8, 6], "mean": [0.5, 0.5, 0.5], "std": [0.25], "channel_order": "BGR", "layout": "NHWC"}
    pre = Preprocess.from_metadata({"onnxmpq.preprocess": json.dumps(doc)})
    assert pre == Preprocess(size=(8, 6), mean=(0.5, 0.5, 0.5), std=(0.25,), channel_order="BGR", layout="NHWC")
    with pytest.raises(OnnxmpqError, match="not valid JSON"):
        Preprocess.from_metadata({"onnxmpq.preprocess": "{size: 3"})
    with pytest.raises(OnnxmpqError, match="unknown field.*sizes"):
        Preprocess.from_metadata({"onnxmpq.preprocess": '{"sizes": [3, 3]}'})
    with pytest.raises(OnnxmpqError, match="Preprocess.resize must be one of"):
        Preprocess.from_metadata({"onnxmpq.preprocess": '{"resize": "fit"}'})


# --- images -------------------------------------------------------------------------------------

PIXELS = np.array([[[10, 20, 30], [40, 50, 60], [70, 80, 90]],
                   [[100, 110, 120], [130, 140, 150], [160, 170, 180]]], np.uint8)  # 2x3 RGB
MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)


def hand_normalised(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) expected values: (p / 255 - mean) / std, computed element by element."""
    out = np.empty(pixels.shape, np.float64)
    for h in range(pixels.shape[0]):
        for w in range(pixels.shape[1]):
            for c in range(3):
                out[h, w, c] = (pixels[h, w, c] / 255 - MEAN[c]) / STD[c]
    return out


def test_image_numerics_nchw(tmp_path):
    save_png(tmp_path / "img" / "a.png", PIXELS)
    pre = Preprocess(size=(2, 3), mean=MEAN, std=STD)
    batch = next(iter(open_source(tmp_path / "img", [spec("x", (None, 3, 2, 3))], preprocess=pre).batches(4)))
    x = batch.inputs["x"]
    assert x.shape == (1, 3, 2, 3) and x.dtype == np.float32 and batch.labels is None
    np.testing.assert_allclose(x[0], hand_normalised(PIXELS).transpose(2, 0, 1), rtol=1e-6)


def test_image_numerics_nhwc_bgr_and_size_from_model(tmp_path):
    save_png(tmp_path / "img" / "a.png", PIXELS)
    pre = Preprocess(mean=MEAN, std=STD, layout="NHWC", channel_order="BGR")
    x = next(iter(open_source(tmp_path / "img", [spec("x", (1, 2, 3, 3))], preprocess=pre).batches(1))).inputs["x"]
    assert x.shape == (1, 2, 3, 3)
    # channels reversed before mean/std: channel 0 is blue normalised with MEAN[0], STD[0]
    bgr = PIXELS[:, :, ::-1]
    np.testing.assert_allclose(x[0], hand_normalised(bgr), rtol=1e-6)
    assert x[0, 0, 0, 0] == pytest.approx((30 / 255 - 0.1) / 0.5, rel=1e-6)


def test_image_grayscale_float64_and_uint8_inputs(tmp_path):
    gray = np.array([[0, 51, 102], [153, 204, 255]], np.uint8)
    save_png(tmp_path / "img" / "g.png", gray)
    pre = Preprocess(channel_order="L", mean=(0.5,), std=(0.5,))
    x = next(iter(open_source(tmp_path / "img", [spec("x", (None, 1, 2, 3), np.float64)], preprocess=pre)
                  .batches(1))).inputs["x"]
    assert x.dtype == np.float64
    np.testing.assert_allclose(x[0, 0], (gray / 255 - 0.5) / 0.5, rtol=1e-12)
    raw = next(iter(open_source(tmp_path / "img", [spec("x", (None, 2, 3, 1), np.uint8)],
                                preprocess=Preprocess(channel_order="L", layout="NHWC")).batches(1))).inputs["x"]
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw[0, :, :, 0], gray)


def test_image_center_crop_and_shorter_resize(tmp_path):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    save_png(tmp_path / "img" / "a.png", pixels)
    x = next(iter(open_source(tmp_path / "img", [spec("x", (None, 3, 2, 2))],
                              preprocess=Preprocess(resize="none", scale=1.0)).batches(1))).inputs["x"]
    np.testing.assert_array_equal(x[0], pixels[1:3, 2:4].transpose(2, 0, 1).astype(np.float32))
    flat = np.full((4, 8, 3), 90, np.uint8)
    save_png(tmp_path / "flat" / "a.png", flat)
    x = next(iter(open_source(tmp_path / "flat", [spec("x", (None, 3, 2, 2))],
                              preprocess=Preprocess(resize="shorter", scale=1.0)).batches(1))).inputs["x"]
    np.testing.assert_allclose(x, np.full((1, 3, 2, 2), 90.0))
    with pytest.raises(OnnxmpqError, match=r"is 2x4 after resize='shorter', crop='none'; expected 2x2"):
        list(open_source(tmp_path / "flat", [spec("x", (None, 3, 2, 2))],
                         preprocess=Preprocess(resize="shorter", crop="none")).batches(1))
    with pytest.raises(OnnxmpqError, match="smaller than the 5x5 crop"):
        list(open_source(tmp_path / "flat", [spec("x", (None, 3, 5, 5))],
                         preprocess=Preprocess(resize="none")).batches(1))


def test_image_class_folders_give_sorted_labels(tmp_path):
    rng = np.random.default_rng(6)
    for cls, n in (("dog", 2), ("cat", 3), ("ant", 1)):
        for i in range(n):
            save_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (5, 7, 3)))
    (tmp_path / "cat" / "readme.txt").write_text("not an image")
    source = open_source(tmp_path, [spec("x", (None, 3, 4, 4))])
    assert detect_reader(tmp_path) == "images"
    assert source.reader.classes == ("ant", "cat", "dog")
    assert len(source) == 6
    batches, sizes = collect(source, 4)
    assert sizes == [4, 2]
    assert batches[0].inputs["x"].shape == (4, 3, 4, 4)  # stretched from 5x7
    np.testing.assert_array_equal(cat_labels(batches), [0, 1, 1, 1, 2, 2])
    # limit spreads over the classes (round-robin), keeps sorted order
    limited = open_source(tmp_path, [spec("x", (None, 3, 4, 4))], limit=4)
    np.testing.assert_array_equal(cat_labels(list(limited.batches(8))), [0, 1, 1, 2])


def test_image_folder_needs_one_rank4_input_and_matching_channels(tmp_path):
    save_png(tmp_path / "a.png", PIXELS)
    with pytest.raises(OnnxmpqError, match="exactly one rank-4 input"):
        open_source(tmp_path, XY)
    with pytest.raises(OnnxmpqError, match="exactly one rank-4 input"):
        open_source(tmp_path, [spec("x", (None, 3, 4))])
    with pytest.raises(OnnxmpqError, match="has 2 channels in NCHW layout") as info:
        open_source(tmp_path, [spec("x", (None, 2, 3, 4))])
    assert "channel_order" in info.value.hint
    with pytest.raises(OnnxmpqError, match="has 32 channels in NCHW") as info:
        open_source(tmp_path, [spec("x", (None, 32, 32, 3))])
    assert info.value.hint == "set layout='NHWC'."
    with pytest.raises(OnnxmpqError, match="dynamic spatial dims"):
        open_source(tmp_path, [spec("x", (None, 3, None, None))])


def test_image_folder_mixed_or_broken(tmp_path):
    save_png(tmp_path / "a.png", PIXELS)
    save_png(tmp_path / "cls" / "b.png", PIXELS)
    with pytest.raises(OnnxmpqError, match="images both directly inside and in sub-folders"):
        open_source(tmp_path, X)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OnnxmpqError, match="bad.jpg' is not a JPEG, PNG"):
        list(open_source(broken, X).batches(1))


def test_image_decoding_is_per_batch(tmp_path, monkeypatch):
    for i in range(10):
        save_png(tmp_path / f"{i:02d}.png", PIXELS)
    decoded = []
    real = images_module._decode
    monkeypatch.setattr(images_module, "_decode", lambda path, mode: decoded.append(path) or real(path, mode))
    batches = open_source(tmp_path, [spec("x", (None, 3, 2, 3))]).batches(3)
    assert decoded == []
    next(batches)
    assert [p.name for p in decoded] == ["00.png", "01.png", "02.png"]
    next(batches)
    assert len(decoded) == 6


def test_cifar_image_folder_with_limit():
    pre = Preprocess(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
    source = open_source(CIFAR, [spec("input", (None, 3, 32, 32))], limit=30, preprocess=pre)
    assert len(source) == 30
    assert len(source.reader.classes) == 10
    batches, sizes = collect(source, 8)
    assert sizes == [8, 8, 8, 6]
    x = cat(batches, "input")
    assert x.shape == (30, 3, 32, 32) and x.dtype == np.float32
    assert -2.5 < x.min() < 0 < x.max() < 2.5  # normalised pixel range
    np.testing.assert_array_equal(np.bincount(cat_labels(batches)), [3] * 10)
