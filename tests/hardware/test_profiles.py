"""`onnxmpq.profiles`: the built-in profiles, `Profile.allows`, and the YAML reader's errors.

Every YAML error must be an OnnxmpqError whose message names the offending key and its line, so the
tests write each bad key on a line of its own (block style) and check the exact line number.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from onnxmpq.errors import OnnxmpqError
from onnxmpq.hardware import profiles
from onnxmpq.hardware.profiles import BUILTINS, OpRule, Profile
from onnxmpq.types import Candidate


def parse_error(text: str) -> str:
    with pytest.raises(OnnxmpqError) as info:
        profiles.parse(text, "p.yaml")
    return str(info.value)


def line_of(message: str) -> int:
    match = re.search(r"\bline (\d+)\b", message)
    assert match, message
    return int(match.group(1))


# ---------------------------------------------------------------- built-ins


def test_builtin_names():
    assert set(BUILTINS) == {"any", "cpu-ort", "cpu-ort-integer", "int8-only", "npu-w4a8", "npu-w4w8-a8a16"}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_loads_by_name_and_round_trips_through_yaml(name):
    profile = profiles.load(name)
    assert profile is BUILTINS[name] and profile.name == name
    assert "default" in profile.ops and profile.description
    text = yaml.safe_dump(profile.to_dict())
    again = profiles.parse(text, "dumped.yaml")
    assert again.source == "dumped.yaml"
    assert dataclasses.replace(again, source=profile.source) == profile
    assert again.to_dict() == profile.to_dict()


def test_load_none_and_profile_instance():
    assert profiles.load(None) is BUILTINS["any"]
    custom = Profile("c", {"default": OpRule((8,), (8,))})
    assert profiles.load(custom) is custom


def test_to_dict_writes_float_activations_and_pins_as_text():
    data = BUILTINS["any"].to_dict()
    assert "float" in data["ops"]["default"]["activations"]
    assert None not in data["ops"]["default"]["activations"]
    pinned = Profile("p", {"default": OpRule((4, 8), (8, None))}, pin={"a": Candidate(8, 8), "b": Candidate(4, None)},
                     pairs=frozenset({(4, None), (8, 8)}))
    data = pinned.to_dict()
    assert data["pin"] == {"a": "8:8", "b": "4:float"}
    assert data["pairs"] == [[4, "float"], [8, 8]]


# ---------------------------------------------------------------- allows


def test_npu_w4a8_rules():
    p = BUILTINS["npu-w4a8"]
    assert p.allows("Conv", Candidate(4, 8)) and p.allows("Conv", Candidate(8, 8))
    assert not p.allows("Conv", Candidate(2, 8)) and not p.allows("Conv", Candidate(4, 16))
    # Gemm falls to `default`: 8-bit weights only, even though the pair (4, 8) is listed
    assert p.allows("Gemm", Candidate(8, 8)) and not p.allows("Gemm", Candidate(4, 8))
    assert p.allows("MatMul", Candidate(8, 8)) and not p.allows("MatMul", Candidate(4, 8))
    assert p.max_distinct_bits == 2 and p.tie == ("Concat",)


def test_pairs_remove_members_of_the_product():
    p = BUILTINS["npu-w4w8-a8a16"]
    rule = p.rule("Conv")
    assert 4 in rule.weights and 16 in rule.activations  # w4a16 is in the product ...
    assert not p.allows("Conv", Candidate(4, 16))       # ... but not a pair
    assert p.allows("Conv", Candidate(4, 8)) and p.allows("Conv", Candidate(8, 16))
    # the same product without pairs allows it
    assert dataclasses.replace(p, pairs=None).allows("Conv", Candidate(4, 16))


def test_float_layer_only_when_float_layers():
    for name, profile in BUILTINS.items():
        assert profile.allows("Conv", Candidate(None, None)) is profile.float_layers, name
        # float weights with quantized activations is never a layer precision
        assert not profile.allows("Conv", Candidate(None, 8)), name
    assert BUILTINS["any"].float_layers and BUILTINS["cpu-ort"].float_layers
    assert not BUILTINS["int8-only"].float_layers and not BUILTINS["npu-w4a8"].float_layers


def test_weight_only_needs_float_in_activations():
    assert BUILTINS["any"].allows("Conv", Candidate(4, None))
    assert not BUILTINS["cpu-ort"].allows("Conv", Candidate(4, None))
    assert BUILTINS["cpu-ort"].allows("Conv", Candidate(3, 16))
    assert BUILTINS["int8-only"].allows("Gemm", Candidate(8, 8))
    assert not BUILTINS["int8-only"].allows("Gemm", Candidate(7, 8))


# ---------------------------------------------------------------- custom YAML


CUSTOM = """\
name: my-dsp
description: a test target
ops:
  Conv:
    weights: [4, 8]
    activations: [8, float]
  Gemm:
    weights: [8]
    activations: [8]
pairs:
  - [4, 8]
  - [8, 8]
  - [4, float]
per_channel: false
symmetric_weights: true
float_layers: false
max_distinct_bits: 2
pin:
  /conv1/Conv: "8:8"
  /linear/Gemm: "8"
tie: [Concat, Add]
"""


def test_custom_yaml_file_loads(tmp_path):
    path = tmp_path / "dsp.yaml"
    path.write_text(CUSTOM)
    p = profiles.load(path)
    assert p.name == "my-dsp" and p.description == "a test target" and p.source == str(path)
    assert p.ops["Conv"] == OpRule((4, 8), (8, None))
    assert p.ops["default"] == OpRule((8,), (8,))  # added when missing
    assert p.pairs == frozenset({(4, 8), (8, 8), (4, None)})
    assert (p.per_channel, p.symmetric_weights, p.float_layers, p.max_distinct_bits) == (False, True, False, 2)
    assert p.pin == {"/conv1/Conv": Candidate(8, 8), "/linear/Gemm": Candidate(8, None)}
    assert p.tie == ("Concat", "Add")
    assert p.allows("Conv", Candidate(4, None)) and not p.allows("Conv", Candidate(8, None))
    assert profiles.load(str(path)) == p


def test_unknown_name_lists_builtins(tmp_path):
    with pytest.raises(OnnxmpqError) as info:
        profiles.load("npu-w3a8")
    text = str(info.value)
    assert "npu-w3a8" in text
    for name in BUILTINS:
        assert name in text
    with pytest.raises(OnnxmpqError):
        profiles.load(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- YAML errors: key and line


BASE = "name: t\nops:\n  default:\n    weights: [8]\n"   # lines 1-4


@pytest.mark.parametrize("text, key, line", [
    (BASE + "frobnicate: 1\n", "frobnicate", 5),
    ("name: t\nops:\n  Conv:\n    weights: [4, 8]\n    activation: [8]\n", "ops.Conv.activation", 5),
    ("name: t\nops:\n  Conv:\n    weights: [1, 8]\n", "ops.Conv.weights", 4),
    ("name: t\nops:\n  Conv:\n    activations: [8]\n    weights: [17]\n", "ops.Conv.weights", 5),
    ("name: t\nops:\n  Conv:\n    weights: [\"x\"]\n", "ops.Conv.weights", 4),
    ("name: t\nops:\n  Conv:\n    weights: [4]\n    activations: [1]\n", "ops.Conv.activations", 5),
    ("name: t\nops:\n  Conv:\n    weights: [true]\n", "ops.Conv.weights", 4),
    (BASE + "pin:\n  /conv1/Conv: \"8:8\"\n  /linear/Gemm: \"eight\"\n", "pin./linear/Gemm", 7),
    (BASE + "pin:\n  /conv1/Conv: \"8:1\"\n", "pin./conv1/Conv", 6),
    (BASE + "pin:\n  /conv1/Conv: \"17:8\"\n", "pin./conv1/Conv", 6),
    (BASE + "\npairs: [[8, 8], [4]]\n", "pairs", 6),
    (BASE + "pairs: 8\n", "pairs", 5),
    (BASE + "pairs:\n  - [8, 8, 8]\n", "pairs", 5),
    (BASE + "max_distinct_bits: 0\n", "max_distinct_bits", 5),
    (BASE + "float_layers: maybe\n", "float_layers", 5),
    (BASE + "tie: Concat\n", "tie", 5),
    ("name: t\nops: [8]\n", "ops", 2),
    (BASE + "schema: 2\n", "schema", 5),
    ("schema: one\n" + BASE, "schema", 1),
    (BASE + "schema: 0\n", "schema", 5),
])
def test_yaml_error_names_key_and_line(text, key, line):
    message = parse_error(text)
    assert f"'{key}'" in message, message
    assert line_of(message) == line, message
    assert "p.yaml" in message and "Hint:" in message


def test_schema_is_written_and_files_without_it_read_as_schema_1():
    dumped = BUILTINS["npu-w4a8"].to_dict()
    assert dumped["schema"] == profiles.SCHEMA == 1
    with_key = profiles.parse(yaml.safe_dump(dumped))
    without = profiles.parse(yaml.safe_dump({k: v for k, v in dumped.items() if k != "schema"}))
    assert dataclasses.replace(with_key, source="") == dataclasses.replace(without, source="") \
        == dataclasses.replace(BUILTINS["npu-w4a8"], source="")
    assert "newer than this onnxmpq reads" in parse_error(BASE + "schema: 2\n")


def test_missing_ops_is_named():
    message = parse_error("name: t\n")
    assert "'ops'" in message and "missing" in message


def test_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "pin:\n  /conv1/Conv: \"x:8\"\n")
    with pytest.raises(OnnxmpqError) as info:
        profiles.load(path)
    assert str(path) in str(info.value) and line_of(str(info.value)) == 6


def test_invalid_yaml_syntax_gives_line():
    message = parse_error("name: t\nops:\n  default: {weights: [8}\n")
    assert "not valid YAML" in message and line_of(message) == 3


def test_yaml_syntax_error_with_a_tab_gives_line():
    message = parse_error("name: t\nops:\n\tdefault: 1\n")
    assert "not valid YAML" in message and line_of(message) == 3


def test_yaml_missing_colon_reports_the_line_that_holds_it():
    message = parse_error(BASE + "  bad\n")   # 5 lines; line 5 lacks its ':'
    assert line_of(message) == 5, message


def test_impossible_rule_is_refused():
    message = parse_error("name: t\nfloat_layers: false\nops:\n  default:\n    weights: [4]\n    activations: [8]\n"
                          "pairs: [[8, 8]]\n")
    assert "'ops.default'" in message and line_of(message) == 4
