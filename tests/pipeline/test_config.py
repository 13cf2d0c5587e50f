"""Tests of onnxmpq.pipeline.config: one typed configuration behind the CLI, YAML and the Python API."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from onnxmpq import errors
from onnxmpq.allocate import Budget
from onnxmpq.errors import ConfigError, OnnxmpqError
from onnxmpq.pipeline import config
from onnxmpq.pipeline.config import QuantizeConfig, SearchConfig
from onnxmpq.types import Candidate, QuantOptions, Rounding, Scope


def test_no_values_give_the_dataclass_defaults():
    cfg = config.build("m.onnx", {"output.path": "o.onnx"})
    assert cfg == QuantizeConfig("m.onnx", output=config.OutputConfig(path="o.onnx"))
    assert cfg.quantizers == QuantOptions() and cfg.search.method == "ilp" and cfg.data.limit == 256


def test_text_and_native_values_parse_alike():
    text = config.build("m", {"output.path": "o", "precision.weight_bits": "4", "precision.act_bits": "8,16",
                              "search.budgets": ["avg-bits=4"], "search.weight_bits": "2,4,8",
                              "search.max_drop": "0.01", "quantizers.scope": "layers", "output.verify": "false",
                              "precision.layer_bits": ["/c/Conv=8:float"]})
    native = config.build("m", {"output.path": "o", "precision.weight_bits": 4, "precision.act_bits": [8, 16],
                                "search.budgets": "avg-bits=4", "search.weight_bits": [2, 4, 8],
                                "search.max_drop": 0.01, "quantizers.scope": Scope.LAYERS, "output.verify": False,
                                "precision.layer_bits": {"/c/Conv": "8:float"}})
    assert text == native
    assert native.precision.act_bits == (8, 16) and native.search.budgets == (Budget("avg-bits", 4.0),)
    assert native.precision.layer_bits == {"/c/Conv": Candidate(8, None)} and not native.output.verify


@pytest.mark.parametrize("path, value, words", [
    ("search.max_drop", 1.5, "in [0, 1)"), ("search.max_drop", "x", "not a number"),
    ("search.method", "annealing", "greedy"), ("data.limit", 0, ">= 1"), ("precision.weight_bits", 17, "bit-width"),
    ("precision.weight_bits", True, "bit-width"), ("search.weight_bits", "float", "weight widths"),
    ("quantizers.scope", "all", "graph"), ("output.stable_report", "maybe", "true or false"),
    ("data.batch_size", 2.5, "whole number"), ("precision.layer_bits", ["conv"], "NAME=W[:A]"),
])
def test_a_bad_value_names_its_field(path, value, words):
    with pytest.raises(ConfigError) as info:
        config.build("m", {"output.path": "o", path: value})
    assert info.value.field == path and str(info.value).startswith(path) and words in str(info.value)


def test_the_cli_names_a_field_by_its_flag():
    with errors.naming(lambda path: config.flag_of(path) or path), \
            pytest.raises(ConfigError, match=r"^--max-drop 1\.5 is not"):
        config.build("m", {"output.path": "o", "search.max_drop": 1.5})
    with pytest.raises(ConfigError, match=r"^search\.max_drop"):
        config.build("m", {"output.path": "o", "search.max_drop": 1.5})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="output.path"):
        config.build("m", {})
    with pytest.raises(ConfigError, match="nothing chooses"):
        config.build("m", {"output.path": "o", "precision.act_bits": "8,16"})
    assert config.build("m", {"output.path": "o", "precision.act_bits": "8,16", "search.max_drop": 0.1})
    with pytest.raises(ConfigError, match="sweep.models"):
        config.build("m", {"output.path": "o", "sweep.models": True})


def test_yaml_sections_and_flat_option_names_are_one_config():
    flat = {"output": "o.onnx", "calib": "c.npz", "budget": ["avg-bits=4"], "max-drop": 0.01, "weight-bits": 4,
            "bits": "2,4,8", "report-dir": "r", "stable-report": True, "sweep": None}
    nested = {"output": {"path": "o.onnx", "report_dir": "r", "stable_report": True}, "data": {"calib": "c.npz"},
              "search": {"budgets": ["avg-bits=4"], "max_drop": 0.01, "weight_bits": "2,4,8"},
              "precision": {"weight_bits": 4}}
    a = config.build("m", config.from_mapping(flat, "config f"))
    b = config.build("m", config.from_mapping(nested, "config f"))
    assert a == b and a.precision.weight_bits == 4 and a.search.weight_bits == (2, 4, 8)


def test_an_unknown_yaml_key_names_its_line():
    with pytest.raises(OnnxmpqError, match="config f line 7: key 'budgte'"):
        config.from_mapping({"budgte": 1}, "config f", {("budgte",): 7})
    with pytest.raises(OnnxmpqError, match=r"line 3: search.mthod is not a setting"):
        config.from_mapping({"search": {"mthod": "ilp"}}, "config f", {("search", "mthod"): 3})


def test_every_default_is_stated_once_in_the_dataclasses():
    """The front ends hold no default of their own: every setting's default is its field's."""
    for path, meta, default in config.all_settings():
        section, _, name = path.partition(".")
        kind = config.SECTIONS[section][0]
        assert getattr(kind(), name) == default, path
        assert meta.flag.startswith("--") and meta.help.endswith((".", "]", ")")), path


def test_metric_comes_from_the_method_and_a_conflict_is_an_error():
    from onnxmpq.pipeline import plan

    assert plan.metric_of(SearchConfig()) == "kl"
    assert plan.metric_of(SearchConfig(method="eagl")) == "weight-entropy"
    assert plan.metric_of(SearchConfig(method="threshold")) == "output-entropy"
    assert plan.metric_of(SearchConfig(metric="sqnr")) == "sqnr"
    with pytest.raises(ConfigError, match="values layers by weight-entropy"):
        plan.metric_of(SearchConfig(method="eagl", metric="sqnr"))


def test_rounding_and_enums_are_typed():
    cfg = config.build("m", {"output.path": "o", "precision.rounding": "GPTQ"})
    assert cfg.precision.rounding is Rounding.GPTQ
    assert dataclasses.is_dataclass(cfg) and all(dataclasses.is_dataclass(getattr(cfg, s)) for s in config.SECTIONS)


def test_a_negated_flag_reads_as_its_setting_switched_off():
    values = config.from_mapping({"no-verify": True, "output": "o"}, "config f")
    assert config.build("m", values).output.verify is False
    assert config.build("m", config.from_mapping({"no-verify": False, "output": "o"}, "f")).output.verify is True


def test_the_keyword_api_checks_its_values_like_the_cli(tmp_path):
    """`onnxmpq.quantize(...)` sends every keyword through its field's parser before any work."""
    import onnxmpq

    model = Path(__file__).resolve().parents[2] / "models" / "resnet20_cifar10.onnx"
    for kw, path in [({"weight_bits": 17}, "precision.weight_bits"), ({"limit": 0}, "data.limit"),
                     ({"layer_bits": {"conv": Candidate(1, 8)}}, "precision.layer_bits"),
                     ({"search": {"max_drop": 2}}, "search.max_drop"), ({"budgets": ["size=3"]}, None)]:
        with pytest.raises(OnnxmpqError) as info:
            onnxmpq.quantize(model, tmp_path / "q.onnx", **kw)
        assert path is None or str(info.value).startswith(path), str(info.value)
    assert not (tmp_path / "q.onnx").exists()
