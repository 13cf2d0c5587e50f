"""The deployment commands through the CLI (`onnxmpq.cli.main`, in process): check, profiles, run and
profile-latency on the bundled ResNet-20.

The checker's rules themselves are tested in test_hardware.py; here the command layer is: exit codes
(0 complies / 2 violations / 1 bad input, never a traceback), the text and JSON forms, the YAML round
trip of `profiles`, and `run`'s config file with command-line overrides.

To stay quick every quantization uses nearest rounding and 32 calibration samples, and the calibration
file is the first 96 samples of calibration/cifar10_train256.npz (so the held-out scoring behind
verification and the report's Pareto curve runs on 64 samples, not 224).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ort_reader

from onnxmpq.allocate.latency import LatencyTable
from onnxmpq.cli.main import main
from onnxmpq.hardware import profiles

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
BUILTIN_NAMES = {"any", "cpu-ort", "cpu-ort-integer", "int8-only", "npu-w4a8", "npu-w4w8-a8a16"}
LAYERS = 20  # 19 Conv + 1 Gemm
VIOLATION_LINE = re.compile(r"^  (?P<layer>\S+): \[(?P<rule>[a-z-]+)\] (?P<message>.+) Fix: (?P<fix>.+)$")


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures built lazily inside the test printed
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_clean_error(err: str) -> None:
    assert "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def calib(work) -> Path:
    path = work / "calib96.npz"
    np.savez(path, input=np.load(CALIB)["input"][:96])
    return path


@pytest.fixture(scope="module")
def cache(work) -> Path:
    return work / "cache"


@pytest.fixture(scope="module")
def uniform(work, calib):
    """onnxmpq's uniform W8A8 and W4A8 ResNet-20 by name, built once per module."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            w = {"w8a8": "8", "w4a8": "4"}[name]
            out = work / f"r20_{name}.onnx"
            code = main(["-q", "quantize", str(MODEL), "-o", str(out), "--calib", str(calib), "-w", w, "-a", "8",
                         "--rounding", "nearest", "--limit", "32", "--no-verify"])
            assert code == 0
            built[name] = out
        return built[name]
    return get


@pytest.fixture(scope="module")
def ort_qdq(work) -> Path:
    """ResNet-20 through onnxruntime's own quantize_static (QDQ, per-channel INT8 weights and activations)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    samples = np.load(CALIB)["input"][:4]

    out = work / "r20_ort_qdq.onnx"
    logging.disable(logging.WARNING)  # "consider pre-processing" noise
    try:
        quantization.quantize_static(str(MODEL), str(out), ort_reader(samples), quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, weight_type=quantization.QuantType.QInt8,
                                     activation_type=quantization.QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    return out


# ---------------------------------------------------------------- check


def test_check_w8a8_complies_with_int8_only(capsys, uniform):
    model = uniform("w8a8")
    code, out, err = run(capsys, "check", model, "--profile", "int8-only")
    assert code == 0, err
    assert out.strip() == f"{model}: complies with int8-only"
    code, out, _ = run(capsys, "check", model, "--profile", "int8-only", "--json")
    assert code == 0
    verdict = json.loads(out)
    assert verdict["complies"] is True and verdict["violations"] == [] and verdict["profile"] == "int8-only"


def test_check_w4a8_violates_int8_only_one_line_per_violation(capsys, uniform):
    model = uniform("w4a8")
    code, out, err = run(capsys, "check", model, "--profile", "int8-only")
    assert code == 2, err
    header, *lines = out.rstrip("\n").splitlines()
    assert header == f"{model}: {LAYERS} violation(s) of int8-only"
    assert len(lines) == LAYERS
    code_i, info, _ = run(capsys, "inspect", model, "--json")
    assert code_i == 0
    names = [layer["name"] for layer in json.loads(info)["layers"]]
    parsed = [VIOLATION_LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    assert [m["layer"] for m in parsed] == names
    assert {m["rule"] for m in parsed} == {"pair"}
    assert all("W4A8" in m["message"] for m in parsed)
    # the fix names the precision the profile allows and the flag that sets it
    assert all(f"--layer-bits {m['layer']}=8:8" in m["fix"] for m in parsed)

    code, out, _ = run(capsys, "check", model, "--profile", "int8-only", "--json")
    assert code == 2
    verdict = json.loads(out)
    assert verdict["complies"] is False
    assert len(verdict["violations"]) == len(lines)
    assert [(v["layer"], v["rule"]) for v in verdict["violations"]] == [(m["layer"], m["rule"]) for m in parsed]
    assert verdict["rules"] == {"pair": LAYERS} and verdict["layers"] == LAYERS


def test_check_w4a8_on_npu_w4a8_flags_only_the_gemm(capsys, uniform):
    code, out, _ = run(capsys, "check", uniform("w4a8"), "--profile", "npu-w4a8", "--json")
    assert code == 2
    violations = json.loads(out)["violations"]
    assert [(v["layer"], v["rule"]) for v in violations] == [("/linear/Gemm", "pair")]


def test_check_onnxruntime_quantize_static_qdq_complies_with_int8_only(capsys, ort_qdq):
    code, out, err = run(capsys, "check", ort_qdq, "--profile", "int8-only")
    assert code == 0, out + err
    assert "complies with int8-only" in out
    # the layers were really read (a model with no QDQ layer would comply trivially)
    code, info, _ = run(capsys, "inspect", ort_qdq, "--json")
    layers = json.loads(info)["layers"]
    assert code == 0 and len(layers) == LAYERS
    assert all((l["weight_bits"], l["act_bits"]) == (8, 8) for l in layers)


@pytest.mark.parametrize("kind", ["garbage", "empty", "missing", "folder"])
def test_check_unreadable_model_is_exit_1_without_traceback(tmp_path, capsys, kind):
    path = tmp_path / "model.onnx"
    if kind == "garbage":
        path.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    code, out, err = run(capsys, "check", path, "--profile", "int8-only")
    assert code == 1
    assert "Traceback" not in err and "model.onnx" in err
    assert out == ""


def test_check_unknown_profile_lists_the_builtins(capsys, uniform):
    code, out, err = run(capsys, "check", uniform("w8a8"), "--profile", "int9-only")
    assert code == 1 and out == ""
    one_clean_error(err)
    assert "int9-only" in err
    assert all(name in err for name in BUILTIN_NAMES)


def test_check_yaml_profile_with_unknown_key_names_key_and_line(tmp_path, capsys, uniform):
    path = tmp_path / "target.yaml"
    path.write_text("name: my-npu\n"
                    "ops:\n"
                    "  default: {weights: [8], activations: [8]}\n"
                    "per_chanel: true\n")
    code, out, err = run(capsys, "check", uniform("w8a8"), "--profile", path)
    assert code == 1 and out == ""
    one_clean_error(err)
    assert "per_chanel" in err and "line 4" in err
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: my-npu\n"
                      "ops:\n"
                      "  Conv: {weights: [8], activations: [8]}\n"
                      "  default:\n"
                      "    weights: [8]\n"
                      "    acts: [8]\n")
    code, _, err = run(capsys, "check", uniform("w8a8"), "--profile", nested)
    assert code == 1
    one_clean_error(err)
    assert "acts" in err and "line 6" in err


def test_check_with_a_valid_yaml_profile(tmp_path, capsys, uniform):
    path = tmp_path / "w4conv.yaml"
    path.write_text("name: w4-conv\nops:\n  Conv: {weights: [4], activations: [8]}\n"
                    "  default: {weights: [4, 8], activations: [8]}\nfloat_layers: false\n")
    code, out, _ = run(capsys, "check", uniform("w4a8"), "--profile", path)
    assert code == 0 and "complies with w4-conv" in out
    code, out, _ = run(capsys, "check", uniform("w8a8"), "--profile", path)
    assert code == 2 and f"{LAYERS - 1} violation(s) of w4-conv" in out


# ---------------------------------------------------------------- profiles


def test_profiles_lists_the_five_builtins(capsys):
    code, out, _ = run(capsys, "profiles")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == len(BUILTIN_NAMES)
    assert {line.split()[0] for line in lines} == BUILTIN_NAMES
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every one has a description


def test_profiles_json(capsys):
    code, out, _ = run(capsys, "profiles", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == BUILTIN_NAMES
    assert all(isinstance(v, str) and v for v in data.values())
    code, out, _ = run(capsys, "profiles", "npu-w4a8", "--json")
    assert code == 0 and json.loads(out) == profiles.BUILTINS["npu-w4a8"].to_dict()


@pytest.mark.parametrize("name", sorted(BUILTIN_NAMES))
def test_profiles_show_is_yaml_that_parses_back_to_the_same_profile(capsys, name):
    code, out, _ = run(capsys, "profiles", name)
    assert code == 0
    data = yaml.safe_load(out)
    assert isinstance(data, dict) and data["name"] == name
    back = profiles.parse(out, f"<{name}>")
    assert back.to_dict() == profiles.BUILTINS[name].to_dict()
    assert data == profiles.BUILTINS[name].to_dict()


def test_profiles_show_a_yaml_file_and_an_unknown_name(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nops:\n  default: {weights: [4, 8], activations: [8, float]}\nmax_distinct_bits: 1\n")
    code, out, _ = run(capsys, "profiles", path)
    assert code == 0
    assert profiles.parse(out).to_dict() == profiles.load(path).to_dict()
    assert yaml.safe_load(out)["ops"]["default"]["activations"] == [8, "float"]
    code, out, err = run(capsys, "profiles", "no-such-profile")
    assert code == 1 and out == ""
    one_clean_error(err)


def test_profiles_show_a_yaml_file_with_weight_only_and_integer_pairs(tmp_path, capsys):
    path = tmp_path / "pairs.yaml"
    path.write_text("name: pairs\nops:\n  default: {weights: [4, 8], activations: [8, float]}\n"
                    "pairs: [[4, 8], [8, 8], [8, float]]\n")
    code, out, err = run(capsys, "profiles", path)
    assert code == 0, err
    assert profiles.parse(out).to_dict() == profiles.load(path).to_dict()


def test_the_hint_of_a_malformed_profile_is_a_command_that_works(tmp_path, capsys, uniform):
    path = tmp_path / "list.yaml"
    path.write_text("- Conv\n- Gemm\n")
    code, _, err = run(capsys, "check", uniform("w8a8"), "--profile", path)
    assert code == 1
    one_clean_error(err)
    hinted = re.search(r"`onnxmpq ([^`]+)`", err)
    assert hinted, err
    code, out, err = run(capsys, *hinted.group(1).split())
    assert code == 0, err
    assert yaml.safe_load(out)["name"] == "npu-w4a8"


# ---------------------------------------------------------------- run


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def base_config(work, calib, cache) -> dict:
    return {"model": str(MODEL), "output": str(work / "run" / "r20_run.onnx"), "calib": str(calib),
            "budget": ["avg-bits=4"], "bits": [3, 5], "profile": "cpu-ort", "rounding": "nearest", "limit": 32,
            "cache": str(cache), "report-dir": str(work / "run" / "report"), "stable-report": True,
            "check": {"profile": "cpu-ort"}}


@pytest.fixture(scope="module")
def twice(work, base_config):
    """The full config run twice (same paths): exit codes, stdout and the sha256 of the three files."""
    (work / "run").mkdir()
    config = write_config(work / "run.yaml", base_config)
    output, folder = Path(base_config["output"]), Path(base_config["report-dir"])
    runs = []
    for _ in range(2):
        code = main(["-q", "run", str(config)])
        files = [output, folder / "report.json", folder / "report.html"]
        runs.append({"code": code, "exists": [p.is_file() for p in files],
                     "sha": [sha256(p) if p.is_file() else None for p in files]})
    return runs, output, folder


def test_run_config_end_to_end(twice, capsys):
    runs, output, folder = twice
    assert runs[0]["code"] == 0
    assert all(runs[0]["exists"])
    report = json.loads((folder / "report.json").read_text())
    assert report["output"] == str(output)
    alloc = report["allocation"]
    assert alloc["budgets"] == [{"kind": "avg-bits", "value": 4.0, "relative": False}]
    assert alloc["profile"] == "cpu-ort" and alloc["weight_bits"] == [3, 5] and alloc["samples"] == 32
    assert report["settings"]["rounding"] == "nearest"
    assert 3.5 < report["avg_weight_bits"] <= 4  # candidates 3 and 5: the budget is a ceiling
    assert {l["weight_bits"] for l in report["layers"]} == {3, 5}  # mixed
    assert "time_s" not in report  # stable-report: true reached quantize
    code, out, _ = run(capsys, "check", output, "--profile", "cpu-ort")
    assert code == 0


def test_run_twice_gives_identical_bytes(twice):
    runs, _, _ = twice
    assert [r["code"] for r in runs] == [0, 0]
    first, second = runs[0]["sha"], runs[1]["sha"]
    assert None not in first
    assert first[0] == second[0], "model differs between runs"
    assert first[1] == second[1], "report.json differs between runs"
    assert first[2] == second[2], "report.html differs between runs"


def test_run_prints_the_check_verdict(tmp_path, capsys, base_config, twice):
    _, output, _ = twice
    # cheap run on the cached sensitivity: no report, no verification
    config = {k: v for k, v in base_config.items() if k not in ("report-dir", "stable-report")}
    config.update({"output": str(tmp_path / "m.onnx"), "no-verify": True})
    code, out, err = run(capsys, "-q", "run", write_config(tmp_path / "c.yaml", config))
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"{tmp_path / 'm.onnx'}: complies with cpu-ort"


def test_command_line_option_overrides_the_file(tmp_path, capsys, base_config, twice):
    config = {k: v for k, v in base_config.items() if k not in ("report-dir", "stable-report")}
    config.update({"output": str(tmp_path / "m.onnx"), "no-verify": True})
    path = write_config(tmp_path / "c.yaml", config)
    code, out, err = run(capsys, "-q", "run", path, "--budget", "avg-bits=5", "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["avg_weight_bits"] - 5) < 0.05, report["avg_weight_bits"]
    assert [b["value"] for b in report["allocation"]["budgets"]] == [5.0]  # the file's avg-bits=4 is gone
    assert (tmp_path / "m.onnx").is_file()


def test_run_check_violation_exits_2_after_writing_the_model(tmp_path, capsys, base_config, twice):
    config = {k: v for k, v in base_config.items() if k not in ("report-dir", "stable-report")}
    config.update({"output": str(tmp_path / "mixed.onnx"), "no-verify": True, "check": {"profile": "int8-only"}})
    code, out, err = run(capsys, "-q", "run", write_config(tmp_path / "c.yaml", config))
    assert code == 2, err
    assert (tmp_path / "mixed.onnx").is_file()
    assert f"{tmp_path / 'mixed.onnx'}: {LAYERS} violation(s) of int8-only" in out
    assert sum(1 for line in out.splitlines() if VIOLATION_LINE.match(line)) == LAYERS


def test_run_unknown_key_names_key_and_line(tmp_path, capsys, calib):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {MODEL}\noutput: {tmp_path / 'm.onnx'}\ncalib: {calib}\n"
                    "weight-bits: 8\nweight-bitz: 4\n")
    code, out, err = run(capsys, "-q", "run", path)
    assert code == 1
    one_clean_error(err)
    assert "weight-bitz" in err and "line 5" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("text, words", [
    ("model: {model}\ncalib: {calib}\n", ["output"]),
    ("output: {out}\ncalib: {calib}\n", ["model"]),
    ("", ["model", "output"]),
    ("model: [\n", ["YAML"]),
    ("model: {model}\noutput: {out}\ncheck: {{}}\n", ["check"]),
])
def test_run_bad_config_is_exit_1(tmp_path, capsys, calib, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text.format(model=MODEL, calib=calib, out=tmp_path / "m.onnx"))
    code, out, err = run(capsys, "-q", "run", path)
    assert code == 1
    one_clean_error(err)
    assert all(w in err for w in words)
    assert not (tmp_path / "m.onnx").exists()


def test_run_missing_config_file_is_exit_1(tmp_path, capsys):
    code, _, err = run(capsys, "-q", "run", tmp_path / "none.yaml")
    assert code == 1
    one_clean_error(err)


# Cheap uniform configs (no budget, no verification) for the override bugs below.

def uniform_config(tmp_path: Path, calib: Path, **extra) -> Path:
    data = {"model": str(MODEL), "output": str(tmp_path / "from_file.onnx"), "calib": str(calib),
            "rounding": "nearest", "limit": 32, "no-verify": True, **extra}
    return write_config(tmp_path / "c.yaml", data)


def test_run_short_output_override_is_the_file_checked(tmp_path, capsys, calib):
    path = uniform_config(tmp_path, calib, check={"profile": "int8-only"})
    code, _, err = run(capsys, "-q", "run", path)  # W8A8 from_file.onnx: complies
    assert code == 0, err
    code, out, err = run(capsys, "-q", "run", path, "-o", tmp_path / "w4.onnx", "-w", "4")
    assert (tmp_path / "w4.onnx").is_file()
    assert code == 2, out + err  # the W4A8 model just written breaks int8-only
    assert f"{tmp_path / 'w4.onnx'}: {LAYERS} violation(s)" in out


def test_run_output_equals_override_with_check(tmp_path, capsys, calib):
    path = uniform_config(tmp_path, calib, check={"profile": "int8-only"})
    code, out, err = run(capsys, "-q", "run", path, f"--output={tmp_path / 'new.onnx'}")
    assert code == 0, err
    assert (tmp_path / "new.onnx").is_file() and not (tmp_path / "from_file.onnx").exists()
    assert f"{tmp_path / 'new.onnx'}: complies with int8-only" in out


def test_run_override_value_spelling_an_option_name_keeps_the_file_option(tmp_path, capsys, calib, monkeypatch):
    path = uniform_config(tmp_path, calib, **{"weight-bits": 4})
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "-q", "run", path, "--report", "weight-bits")
    assert code == 0, err
    report = json.loads((tmp_path / "weight-bits").read_text())
    assert report["avg_weight_bits"] == 4.0  # the file's weight-bits: 4 (got 8: the option was dropped)


def test_run_json_with_check_is_one_json_object(tmp_path, capsys, calib):
    path = uniform_config(tmp_path, calib, check={"profile": "int8-only"})
    code, out, err = run(capsys, "-q", "run", path, "--json")
    assert code == 0, err
    json.loads(out)


# ---------------------------------------------------------------- profile-latency


def test_profile_latency_table(work, calib, capsys):
    out_file = work / "latency.json"
    code, out, err = run(capsys, "-q", "profile-latency", MODEL, "--calib", calib, "--bits", "4,8", "--runs", "5",
                         "-o", out_file, "--json")
    assert code == 0, err
    data = json.loads(out_file.read_text())
    assert json.loads(out) == data
    assert data["reference"] == "w8a8" and data["runs"] == 5 and data["batch"] == 1
    assert data["reference_ms"] > 0 and data["float_ms"] > 0
    code_i, info, _ = run(capsys, "inspect", MODEL, "--json")
    assert code_i == 0
    assert list(data["layers"]) == [l["name"] for l in json.loads(info)["layers"]]
    assert len(data["layers"]) == LAYERS
    for name, row in data["layers"].items():
        assert set(row) == {"w4a8", "w8a8"}, name
        assert row["w8a8"] == 0.0, name
        assert np.isfinite(row["w4a8"]), name
    table = LatencyTable.load(out_file)
    assert table.reference == "w8a8" and len(table.layers) == LAYERS
    assert table.to_dict() == data


def test_profile_latency_bad_bits_is_exit_1(work, calib, capsys):
    code, out, err = run(capsys, "-q", "profile-latency", MODEL, "--calib", calib, "--bits", "4,99",
                         "-o", work / "never.json")
    assert code == 1
    one_clean_error(err)
    assert not (work / "never.json").exists()


def test_run_names_a_bad_file_value_by_its_key_and_line(tmp_path, capsys):
    """The file is loaded into the configuration directly: a bad value is reported as the file wrote it."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {MODEL}\noutput: {tmp_path / 'm.onnx'}\nsearch:\n  method: greedy\n  max_drop: 2\n")
    code, out, err = run(capsys, "-q", "run", path)
    assert code == 1 and f"config {path} line 5: search.max_drop 2 is not a number in [0, 1)" in err, err
    assert not (tmp_path / "m.onnx").exists()
    # the command line's value replaces the file's, and is named as the command line names it
    code, out, err = run(capsys, "-q", "run", path, "--max-drop", "3")
    assert code == 1 and err.startswith("error: --max-drop '3' is not"), err
    # sections and flat keys name the same settings; an unknown one is refused with its line
    path.write_text(f"model: {MODEL}\noutput: {tmp_path / 'm.onnx'}\nsearch: {{mthod: greedy}}\n")
    code, out, err = run(capsys, "-q", "run", path)
    assert code == 1 and "line 3: search.mthod is not a setting" in err, err


def test_run_refuses_a_check_it_cannot_make_before_any_work(tmp_path, capsys):
    """An unknown check profile, or a check of a sweep, fails before the sensitivity sweep and writes nothing."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {MODEL}\noutput: {tmp_path / 'm.onnx'}\ncheck: {{profile: no-such-npu}}\n")
    code, out, err = run(capsys, "-q", "run", path)
    assert code == 1 and "no-such-npu" in err and not (tmp_path / "m.onnx").exists(), err
    path.write_text(f"model: {MODEL}\noutput: {tmp_path / 'm.onnx'}\nsweep: avg-bits=4:8:2\ncheck: {{profile: cpu-ort}}\n")
    code, out, err = run(capsys, "-q", "run", path)
    assert code == 1 and "not a sweep" in err and not list(tmp_path.glob("m.*")), err
