"""`onnxmpq sensitivity` through `onnxmpq.cli.main`: the JSON contract, the plot, and bad input.

Bad input must give exit 1 and exactly one line on stderr (starting "error:") with no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_cnn, model, node, vi

from onnxmpq.cli.main import main
from onnxmpq.graph import model as graph

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE_KEYS = {"metric", "candidates", "samples", "time_s", "rounding", "probes", "layers"}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, *needles: str):
    assert code == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_table(table: dict, metric: str, candidates: list[str], layers: list[tuple[str, str]], samples: int,
                 probes: str):
    assert set(table) == TABLE_KEYS
    assert table["metric"] == metric and table["candidates"] == candidates
    assert table["samples"] == samples and table["rounding"] == "nearest" and table["probes"] == probes
    assert isinstance(table["time_s"], float) and table["time_s"] >= 0
    assert [(l["name"], l["op_type"]) for l in table["layers"]] == layers
    for layer in table["layers"]:
        assert list(layer["scores"]) == candidates
        assert all(isinstance(v, float) and v >= 0 for v in layer["scores"].values())


@pytest.fixture
def tiny(tmp_path):
    """The cnn, 16 calibration samples for it, and a one-Relu model with its own samples."""
    cnn = tmp_path / "cnn.onnx"
    onnx.save(build_cnn(), str(cnn))
    calib = tmp_path / "cnn.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    relu = tmp_path / "relu.onnx"
    onnx.save(model([node("Relu", ["x"], ["y"], "relu")], [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 3, 8, 8])]),
              str(relu))
    return cnn, calib, relu


CNN_LAYERS = [("conv1", "Conv"), ("conv2", "Conv"), ("fc", "Gemm")]


def test_resnet_sqnr_kl_json_file_and_plot(tmp_path, capsys):
    out_json, png = tmp_path / "t.json", tmp_path / "p.png"
    code, out, err = run(capsys, "sensitivity", RESNET, "--calib", CALIB, "--metric", "sqnr,kl", "--bits", "2,4,8",
                         "--rounding", "nearest", "--limit", 32, "-o", out_json, "--plot", png, "--json")
    assert code == 0, err
    printed = json.loads(out)
    assert json.loads(out_json.read_text()) == printed
    layers = [(s.name, s.op_type) for s in graph.load(RESNET).layers]
    assert len(layers) == 20
    assert isinstance(printed, list) and [t["metric"] for t in printed] == ["sqnr", "kl"]
    for table in printed:
        assert_table(table, table["metric"], ["w2", "w4", "w8"], layers, 32, "fast")  # sqnr and kl: fast by default
        for layer in table["layers"]:
            assert layer["scores"]["w2"] > layer["scores"]["w8"]
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_single_metric_prints_one_table_with_extras(tiny, capsys):
    cnn, calib, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "--metric", "output-entropy", "--bits", "4,8",
                         "--json")
    assert code == 0, err
    table = json.loads(out)
    assert isinstance(table, dict)
    assert set(table) == TABLE_KEYS and table["candidates"] == ["w4", "w8"] and table["samples"] == 16
    assert [(l["name"], l["op_type"]) for l in table["layers"]] == CNN_LAYERS
    assert all(set(l) == {"name", "op_type", "scores", "entropy"} and l["entropy"] > 0 for l in table["layers"])


def test_separate_weight_and_activation_candidates(tiny, capsys):
    cnn, calib, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "--bits", "2,8", "--act-bits", "2,8",
                         "--separate", "--rounding", "nearest", "--probes", "exact", "--json")
    assert code == 0, err
    table = json.loads(out)
    assert_table(table, "sqnr", ["w2", "w8", "a2", "a8"], CNN_LAYERS, 16, "exact")
    for layer in table["layers"]:
        assert layer["scores"]["w2"] > layer["scores"]["w8"] and layer["scores"]["a2"] > layer["scores"]["a8"]


def test_weight_entropy_runs_without_calibration_and_plots(tiny, tmp_path, capsys):
    cnn, _, _ = tiny
    png = tmp_path / "we.png"
    code, out, err = run(capsys, "sensitivity", cnn, "--metric", "weight-entropy", "--bits", "2,4,16", "--plot", png,
                         "--json")
    assert code == 0, err
    table = json.loads(out)
    assert_table(table, "weight-entropy", ["w2", "w4", "w16"], CNN_LAYERS, 0, "exact")
    for layer in table["layers"]:
        assert layer["scores"]["w2"] > layer["scores"]["w4"] > layer["scores"]["w16"] == 0.0
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("args, expected", [
    (["--bits", "2,4"], "nearest"),
    (["--bits", "2,4", "--rounding", "auto"], "gptq"),
    (["--bits", "8", "--rounding", "auto"], "nearest"),
    (["--bits", "2,4", "--rounding", "gptq"], "gptq"),
    (["--bits", "2,4", "--metric", "weight-entropy", "--rounding", "auto"], "nearest"),
], ids=["default-nearest", "auto-low-bits", "auto-8-bits", "gptq", "weight-entropy-is-data-free"])
def test_rounding_recorded_is_the_rounding_used(tiny, capsys, args, expected):
    """Nearest by default (as quantize's probes); `auto` is GPTQ below 8 bits when data is used, else
    nearest; weight-entropy never reads the data (its codes are nearest with or without --calib), so its
    table must not claim gptq."""
    cnn, calib, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, *args, "--json")
    assert code == 0, err
    assert json.loads(out)["rounding"] == expected


def test_human_table_lists_every_layer(tiny, capsys):
    cnn, calib, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "--bits", "2,4")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("sqnr (16 samples")
    assert lines[1].split() == ["layer", "w2", "w4"]
    assert [line.split()[0] for line in lines[2:]] == ["conv1", "conv2", "fc"]


@pytest.mark.parametrize("args, needles", [
    (["--metric", "sqnr,snr"], ["unknown metric 'snr'", "sqnr"]),
    (["--bits", "1"], ["'1'", "2 to 16"]),
    (["--bits", "2,17"], ["'17'", "2 to 16"]),
    (["--bits", "four"], ["'four'"]),
    (["--act-bits", "17"], ["'17'", "--act-bits"]),
], ids=["unknown-metric", "bits-1", "bits-17", "bits-word", "act-bits-17"])
def test_bad_options_are_one_line_user_errors(tiny, capsys, args, needles):
    cnn, calib, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, *args)
    assert_user_error(code, out, err, *needles)
    assert out == ""


@pytest.mark.parametrize("metric", ["sqnr", "weight-entropy"])
def test_model_without_quantizable_layer_is_a_user_error(tiny, tmp_path, capsys, metric):
    _, _, relu = tiny
    calib = tmp_path / "relu.npz"
    np.savez(calib, x=np.ones((4, 3, 8, 8), np.float32))
    code, out, err = run(capsys, "sensitivity", relu, "--calib", calib, "--metric", metric)
    assert_user_error(code, out, err, "no quantizable layer")


@pytest.mark.parametrize("metrics", ["sqnr", "kl", "output-entropy", "mutual-info", "weight-entropy,sqnr"])
def test_data_metrics_without_calibration_are_a_user_error(tiny, capsys, metrics):
    cnn, _, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--metric", metrics)
    assert_user_error(code, out, err, "--calib")


def test_missing_model_file_is_a_user_error(tmp_path, capsys):
    code, out, err = run(capsys, "sensitivity", tmp_path / "nope.onnx", "--metric", "weight-entropy")
    assert_user_error(code, out, err, "does not exist")


# --- output paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["model", "calib"])
def test_table_output_never_overwrites_an_input(tiny, capsys, which):
    """Like `quantize`, `sensitivity -o` must refuse to write over the model or the calibration data."""
    cnn, calib, _ = tiny
    target = cnn if which == "model" else calib
    before = target.read_bytes()
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "-o", target)
    assert target.read_bytes() == before, "the input file was overwritten by the table"
    assert_user_error(code, out, err)


def test_table_output_into_a_missing_folder_is_a_user_error(tiny, tmp_path, capsys):
    cnn, calib, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "-o", tmp_path / "missing" / "t.json")
    assert_user_error(code, out, err, "does not exist")


def test_plot_into_a_missing_folder_is_a_user_error(tiny, tmp_path, capsys):
    cnn, calib, _ = tiny
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "--plot", tmp_path / "missing" / "p.png")
    assert_user_error(code, out, err)


def test_plot_path_without_png_suffix_gives_a_png_or_a_user_error(tiny, tmp_path, capsys):
    """`--plot` "writes a PNG": any file name either gets a PNG or a one-line error, never a traceback."""
    cnn, calib, _ = tiny
    target = tmp_path / "plot.txt"
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "--plot", target)
    if code == 0:
        assert target.read_bytes()[:8] == PNG_MAGIC
    else:
        assert_user_error(code, out, err)


# --- asking for nothing: no candidate, no metric ----------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--plot", "PLOT"]], ids=["table", "plot"])
def test_no_candidate_bits_is_a_user_error(tiny, tmp_path, capsys, extra):
    """`--bits float` leaves no candidate to probe: a user error, not an empty table (or a crash in the plot)."""
    cnn, calib, _ = tiny
    extra = [str(tmp_path / "p.png") if e == "PLOT" else e for e in extra]
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "--bits", "float", *extra)
    assert_user_error(code, out, err)


@pytest.mark.parametrize("extra", [[], ["--plot", "PLOT"]], ids=["table", "plot"])
def test_empty_metric_list_is_a_user_error(tiny, tmp_path, capsys, extra):
    """`--metric ,` names no metric: a user error, not `[]` (or an IndexError in the plot)."""
    cnn, calib, _ = tiny
    extra = [str(tmp_path / "p.png") if e == "PLOT" else e for e in extra]
    code, out, err = run(capsys, "sensitivity", cnn, "--calib", calib, "--metric", ",", *extra)
    assert_user_error(code, out, err)


# --- cache through the CLI --------------------------------------------------------------------------


def test_cache_folder_reused_and_a_non_object_entry_rebuilt(tiny, tmp_path, capsys):
    cnn, calib, _ = tiny
    folder = tmp_path / "cache"
    args = ["sensitivity", cnn, "--calib", calib, "--bits", "2,4", "--cache", folder, "--json"]
    code, first, err = run(capsys, *args)
    assert code == 0, err
    (entry,) = folder.glob("*.json")
    code, second, err = run(capsys, *args)
    assert code == 0 and second == first and err == ""
    entry.write_text("[]")  # valid JSON, but not an entry
    code, third, err = run(capsys, *args)
    assert "Traceback" not in err
    assert code == 0, err
    assert "warning" in err and entry.name in err
    assert json.loads(third)["layers"] == json.loads(first)["layers"]
