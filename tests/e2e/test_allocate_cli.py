"""`onnxmpq quantize --budget ...` through `onnxmpq.cli.main`: the JSON report, exit codes 1 and 2 with
one stderr line, the --bits / --method / --cache options, and budgets checked on the written model.

`--metric weight-entropy` needs no probes and `--rounding nearest` skips GPTQ, so each run takes about
a second on ResNet-20.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxmpq.cli.main import main
from onnxmpq.pipeline import api

ROOT = Path(__file__).resolve().parents[2]
RESNET = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
FAST = ["--metric", "weight-entropy", "--rounding", "nearest", "--limit", "32", "-q"]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def quantize(capsys, out: Path, *args) -> tuple[int, str, str]:
    return run(capsys, "quantize", RESNET, "-o", out, "--calib", CALIB, *args)


def one_error_line(err: str, out: str) -> str:
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_avg_bits_budget_json(capsys, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, err = quantize(capsys, out, "--budget", "avg-bits=4", "--json", *FAST)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["avg_weight_bits"] <= 4 + 1e-9
    bits = {layer["weight_bits"] for layer in report["layers"]}
    assert len(bits) > 1 and None not in bits and bits <= set(range(2, 9))
    assert {layer["act_bits"] for layer in report["layers"]} == {8}
    alloc = report["allocation"]
    assert alloc["solver"].startswith("ilp") and alloc["status"] == "optimal"
    assert alloc["budgets"] == [{"kind": "avg-bits", "value": 4.0, "relative": False}]
    assert alloc["metric"] == "weight-entropy" and "cache_dir" not in alloc
    assert out.exists() and api.inspect(out)["avg_weight_bits"] == pytest.approx(report["avg_weight_bits"])


def test_impossible_budget_exit_2(capsys, tmp_path):
    out = tmp_path / "q.onnx"
    code, stdout, err = quantize(capsys, out, "--budget", "avg-bits=1.5", *FAST)
    assert code == 2
    line = one_error_line(err, stdout)
    assert "avg-bits=1.5" in line and "smallest achievable is 2 " in line
    assert not out.exists()


def test_bits_option_sets_the_candidates(capsys, tmp_path):
    code, stdout, err = quantize(capsys, tmp_path / "q.onnx", "--budget", "avg-bits=3", "--bits", "4,8", *FAST)
    assert code == 2
    assert "smallest achievable is 4 " in one_error_line(err, stdout)
    code, stdout, err = quantize(capsys, tmp_path / "q.onnx", "--budget", "avg-bits=5", "--bits", "4,8", "--json",
                                 *FAST)
    assert code == 0, err
    report = json.loads(stdout)
    assert {layer["weight_bits"] for layer in report["layers"]} <= {4, 8}
    assert report["avg_weight_bits"] <= 5 + 1e-9


def test_greedy_method_and_two_budgets(capsys, tmp_path):
    code, stdout, err = quantize(capsys, tmp_path / "q.onnx", "--budget", "avg-bits=5", "--budget", "bitops=0.4x",
                                 "--method", "greedy", "--json", *FAST)
    assert code == 0, err
    report = json.loads(stdout)
    w8a8 = sum(layer["macs"] * 64 for layer in report["layers"])
    assert report["avg_weight_bits"] <= 5 + 1e-9
    assert report["bitops"] <= 0.4 * w8a8 * (1 + 1e-9)
    assert report["allocation"]["solver"] == "greedy" and report["allocation"]["status"] == "feasible"
    assert [b["kind"] for b in report["allocation"]["budgets"]] == ["avg-bits", "bitops"]


def test_weight_bytes_budget_holds_in_written_model(capsys, tmp_path):
    code, stdout, err = quantize(capsys, tmp_path / "q.onnx", "--budget", "weight-bytes=100KB", "--json", *FAST)
    assert code == 0, err
    assert json.loads(stdout)["weight_bytes"] <= 100_000


def test_weight_bytes_budget_holds_with_int4_container(capsys, tmp_path):
    """With --int2-container int4 a 2-bit layer is stored in INT4 (2 codes a byte): the budget's cost model
    must count that, so the written model still meets the budget, and a budget only packed INT2 could
    meet is refused (the smallest INT4-container size of ResNet-20 is all layers at 4 bits)."""
    code, _, err = quantize(capsys, tmp_path / "q.onnx", "--budget", "weight-bytes=100KB",
                            "--int2-container", "int4", "--json", *FAST)
    assert code == 2 and "smallest achievable" in err
    code, stdout, err = quantize(capsys, tmp_path / "q.onnx", "--budget", "weight-bytes=140KB",
                                 "--int2-container", "int4", "--json", *FAST)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["weight_bytes"] <= 140_000, (report["weight_bytes"], report["allocation"]["costs"])


def test_cache_is_written_and_reused(capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    code, first, err = quantize(capsys, tmp_path / "a.onnx", "--budget", "avg-bits=4", "--cache", cache, "--json",
                                *FAST)
    assert code == 0, err
    assert any(cache.iterdir())

    from onnxmpq.sensitivity import parallel

    def no_probes(*args, **kwargs):
        raise AssertionError("the sensitivity was measured again despite the cache")

    monkeypatch.setattr(parallel, "measure", no_probes)
    code, second, err = quantize(capsys, tmp_path / "b.onnx", "--budget", "avg-bits=4", "--cache", cache, "--json",
                                 *FAST)
    assert code == 0, err
    bits = [[layer["weight_bits"] for layer in json.loads(text)["layers"]] for text in (first, second)]
    assert bits[0] == bits[1]


@pytest.mark.parametrize("args, needle", [
    (["--budget", "size=3"], "size=3"),
    (["--budget", "avg-bits=3KB"], "KB"),
    (["--budget", "avg-bits=3.5e"], "3.5e"),
    (["-a", "8,16"], "--budget"),
    (["--budget", "avg-bits=4", "--method", "simplex"], "simplex"),
    (["--budget", "avg-bits=4", "--metric", "nonsense"], "nonsense"),
])
def test_user_errors_exit_1(capsys, tmp_path, args, needle):
    out = tmp_path / "q.onnx"
    code, stdout, err = quantize(capsys, out, *args, "-q")
    assert code == 1, (stdout, err)
    if err.startswith("error: "):
        assert needle in one_error_line(err, stdout)
    else:  # click's own usage error (bad --method choice)
        assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_budget_without_calibration_exit_1(capsys, tmp_path):
    code, stdout, err = run(capsys, "quantize", RESNET, "-o", tmp_path / "q.onnx", "--budget", "avg-bits=4",
                            "--metric", "weight-entropy", "-q")
    assert code == 1
    assert "--calib" in one_error_line(err, stdout)
