"""Hardware profiles: which precisions a target runs, shared by the allocator (what it may choose) and
by `onnxmpq check` (what a finished QDQ model must obey).

The YAML form users write (`yaml.safe_load` only; unknown keys are errors that name the key and line):

    schema: 1                   # the layout's version; a file without it is read as schema 1
    name: npu-w4a8
    description: free text
    ops:                        # per op type; `default` covers the rest
      Conv: {weights: [4, 8], activations: [8]}
      default: {weights: [8], activations: [8]}
    pairs: [[4, 8], [8, 8]]     # optional: allowed (weight, activation) pairs, overrides the product above
    per_channel: true           # per-channel weights allowed
    symmetric_weights: true     # weight zero points must be 0
    float_layers: false         # may a quantizable layer stay in float?
    max_distinct_bits: 2        # optional: at most this many distinct weight widths in the model
    pin: {/conv1/Conv: "8:8"}   # optional: layers fixed at W:A (float allowed: "float:8")
    tie: [Concat]               # optional: ops whose quantized inputs must share one scale and type
    requantize: true            # may a tensor be read at another width than it is stored at?
    integer_ops: [LayerNormalization]  # optional: ops the target runs on integers beyond onnxruntime's
                                # (their tensors are quantized too); [all] for every handled op

The rule for an op type covers its weighted layers (weights, activations) and its units without weights
(an Add, a Softmax: activations only; float there needs float_layers).

An activation list may hold `float` for weight-only layers. Built-in profiles document real targets'
rules as stated assumptions (see BUILTINS and `onnxmpq profiles`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, overload

from onnxmpq import paths, yamlfile
from onnxmpq.errors import OnnxmpqError
from onnxmpq.types import Candidate

SCHEMA = 1  # the profile layout written and read; bump it (and read the old one) when a key changes meaning
KEYS = ("schema", "name", "description", "ops", "pairs", "per_channel", "symmetric_weights", "float_layers",
        "max_distinct_bits", "pin", "tie", "requantize", "integer_ops")
OP_KEYS = ("weights", "activations")
ALL_WEIGHTS = (2, 3, 4, 5, 6, 7, 8)
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ops whose integer kernels carry the MACs


@dataclass(frozen=True)
class OpRule:
    """Widths one op type runs at; None in `activations` means float activations (weight-only)."""

    weights: tuple[int, ...]
    activations: tuple[int | None, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    ops: Mapping[str, OpRule]
    description: str = ""
    pairs: frozenset[tuple[int, int | None]] | None = None
    per_channel: bool = True
    symmetric_weights: bool = True
    float_layers: bool = True
    max_distinct_bits: int | None = None
    pin: Mapping[str, Candidate] = field(default_factory=dict)
    tie: tuple[str, ...] = ()
    requantize: bool = True
    integer_ops: frozenset[str] = frozenset()
    source: str = "built-in"

    def rule(self, op_type: str) -> OpRule:
        return self.ops.get(op_type) or self.ops["default"]

    def allows(self, op_type: str, cand: Candidate) -> bool:
        """Whether `op_type` may run at `cand`; a float layer (no weight bits) only if float_layers."""
        if not cand.weight_bits:
            return self.float_layers and not cand.act_bits
        rule = self.rule(op_type)
        if cand.weight_bits not in rule.weights or cand.act_bits not in rule.activations:
            return False
        return self.pairs is None or (cand.weight_bits, cand.act_bits) in self.pairs

    def allows_act(self, op_type: str, act_bits: int | None) -> bool:
        """Whether a unit without weights of `op_type` may compute at `act_bits` (None: float)."""
        if act_bits is None:
            return self.float_layers
        return act_bits in self.rule(op_type).activations

    def to_dict(self) -> dict[str, Any]:
        def acts(values):
            return ["float" if a is None else a for a in values]
        out = {"schema": SCHEMA, "name": self.name, "description": self.description,
               "ops": {op: {"weights": list(r.weights), "activations": acts(r.activations)} for op, r in self.ops.items()},
               "per_channel": self.per_channel, "symmetric_weights": self.symmetric_weights,
               "float_layers": self.float_layers}
        if self.pairs is not None:
            out["pairs"] = [[w, "float" if a is None else a] for w, a in sorted(self.pairs, key=lambda p: (p[0], p[1] or 0))]
        if self.max_distinct_bits is not None:
            out["max_distinct_bits"] = self.max_distinct_bits
        if self.pin:
            out["pin"] = {k: f"{c.weight_bits or 'float'}:{c.act_bits or 'float'}" for k, c in self.pin.items()}
        if self.tie:
            out["tie"] = list(self.tie)
        if not self.requantize:
            out["requantize"] = False
        if self.integer_ops:
            out["integer_ops"] = sorted(self.integer_ops)
        return out


def _rule(weights, activations) -> OpRule:
    return OpRule(tuple(weights), tuple(activations))


BUILTINS: dict[str, Profile] = {p.name: p for p in [
    Profile("any", {"default": _rule(tuple(range(2, 17)), tuple(range(2, 17)) + (None,))},
            "No hardware rule: every width from 2 to 16 bits, weight-only and float layers, asymmetric "
            "weights allowed.", symmetric_weights=False),
    Profile("cpu-ort", {"default": _rule(ALL_WEIGHTS, (8, 16))},
            "onnxruntime's CPU provider. Assumptions: integer kernels (QLinearConv, MatMulInteger) exist for "
            "8-bit weights with 8-bit activations; onnxmpq feeds 2-7-bit weights beside 8-bit activations "
            "through a Cast to INT8 so they run on those kernels too; 16-bit activations run as dequantize "
            "+ float; layers may stay float; asymmetric (uint8) weights run too.", symmetric_weights=False,
            tie=("Concat",)),
    Profile("cpu-ort-integer", {**{op: _rule(ALL_WEIGHTS, (8,)) for op in MAC_OPS},
                                "default": _rule(ALL_WEIGHTS, (8, 16))},
            "onnxruntime's CPU provider with every multiply-accumulate on an integer kernel: as cpu-ort, but "
            "Conv, ConvTranspose, Gemm and MatMul (weights and the two-activation MatMuls of attention) "
            "read and write 8-bit activations; the units between them (LayerNormalization, Softmax, the "
            "residual and mask Adds) may take 16 bits, read by the 8-bit kernels through a requantize.",
            symmetric_weights=False, tie=("Concat",)),
    Profile("int8-only", {"default": _rule((8,), (8,))},
            "An int8-only accelerator (the common NPU/DSP case): W8A8 everywhere, per-channel symmetric "
            "weights, no float layer or float tensor between integer ops, no requantize, inputs of a Concat "
            "share one scale.", float_layers=False, tie=("Concat",), requantize=False),
    Profile("npu-w4a8", {"Conv": _rule((4, 8), (8,)), "default": _rule((8,), (8,))},
            "An NPU with 4- and 8-bit weights for convolutions and 8-bit weights elsewhere, 8-bit "
            "activations, per-channel symmetric weights, no float layer, at most two weight widths.",
            pairs=frozenset({(4, 8), (8, 8)}), float_layers=False, max_distinct_bits=2, tie=("Concat",)),
    Profile("npu-w4w8-a8a16", {"default": _rule((4, 8), (8, 16))},
            "An accelerator taking 4- or 8-bit weights with 8- or 16-bit activations, but no W4A16 pair; "
            "per-channel symmetric weights, no float layer.",
            pairs=frozenset({(4, 8), (8, 8), (8, 16)}), float_layers=False, tie=("Concat",)),
]}


def load(spec: str | os.PathLike | Profile | None) -> Profile:
    """A built-in profile by name, or a YAML file; None gives `any`."""
    if spec is None:
        return BUILTINS["any"]
    if isinstance(spec, Profile):
        return spec
    if str(spec) in BUILTINS:
        return BUILTINS[str(spec)]
    path = Path(spec)
    hint = f"use one of {', '.join(BUILTINS)} (see `onnxmpq profiles`) or a YAML file."
    if not path.exists():
        raise OnnxmpqError(f"profile {str(spec)!r} is neither a built-in profile nor a file.", hint)
    data = paths.read_regular(path, "profile", hint)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OnnxmpqError(f"cannot read profile {str(path)!r}: {exc}.", "pass a UTF-8 YAML file.") from None
    return parse(text, str(path))


def parse(text: str, source: str = "<profile>") -> Profile:
    """Validates and builds a Profile from YAML text; every error names the key and its line."""

    data, node = yamlfile.parse(text, f"profile {source}",
                                "fix the YAML syntax (see `onnxmpq profiles npu-w4a8` for an example).")
    return _Validator(source, yamlfile.key_lines(node)).profile(data)


class _Validator:
    """Turns the loaded YAML into a Profile, raising OnnxmpqError("profile F line N: key K ...")."""

    def __init__(self, source: str, lines: Mapping[tuple, int]):
        self.source, self.lines = source, lines

    def fail(self, path: tuple, problem: str, fix: str) -> NoReturn:
        line = next((self.lines[path[:i]] for i in range(len(path), 0, -1) if path[:i] in self.lines), None)
        where = f" line {line}" if line else ""
        key = ".".join(path) or "(top level)"
        raise OnnxmpqError(f"profile {self.source}{where}: key {key!r} {problem}.", fix)

    def profile(self, data) -> Profile:
        if not isinstance(data, dict):
            self.fail((), "must be a mapping of keys (name, ops, ...)", "start from `onnxmpq profiles npu-w4a8`.")
        for key in data:
            if key not in KEYS:
                self.fail((str(key),), "is unknown", f"known keys: {', '.join(KEYS)}.")
        self.schema(data.get("schema", SCHEMA))
        if "ops" not in data:
            self.fail(("ops",), "is missing", "add ops: {default: {weights: [8], activations: [8]}}.")
        ops = self.ops(data["ops"])
        pairs = self.pairs(data["pairs"]) if data.get("pairs") is not None else None
        max_distinct = data.get("max_distinct_bits")
        if max_distinct is not None and (isinstance(max_distinct, bool) or not isinstance(max_distinct, int)
                                         or max_distinct < 1):
            self.fail(("max_distinct_bits",), f"must be a whole number >= 1, not {max_distinct!r}", "write e.g. 2.")
        profile = Profile(
            name=self.text(data, "name", "custom"), description=self.text(data, "description", ""), ops=ops,
            pairs=pairs, per_channel=self.flag(data, "per_channel", True),
            symmetric_weights=self.flag(data, "symmetric_weights", True),
            float_layers=self.flag(data, "float_layers", True), max_distinct_bits=max_distinct,
            pin=self.pins(data.get("pin") or {}), tie=self.ties(data.get("tie") or []),
            requantize=self.flag(data, "requantize", True),
            integer_ops=frozenset(self.ties(data.get("integer_ops") or [], "integer_ops")), source=self.source)
        self.consistent(profile)
        return profile

    def schema(self, value) -> None:
        """Schema 1 is the only layout so far; files written before it was versioned carry no key and
        read as 1. A newer number came from a newer onnxmpq."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(("schema",), f"must be a whole number >= 1, not {value!r}", f"write schema: {SCHEMA}.")
        if value > SCHEMA:
            self.fail(("schema",), f"is {value}, newer than this onnxmpq reads ({SCHEMA})",
                      "upgrade onnxmpq, or rewrite the profile for schema 1.")

    def text(self, data, key, default) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            self.fail((key,), f"must be text, not {value!r}", f"write e.g. {key}: my-target.")
        return value

    def flag(self, data, key, default) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.fail((key,), f"must be true or false, not {value!r}", f"write {key}: true.")
        return value

    def ops(self, ops) -> dict[str, OpRule]:
        if not isinstance(ops, dict) or not ops:
            self.fail(("ops",), "must map op types to {weights: [...], activations: [...]}",
                      "write ops: {default: {weights: [8], activations: [8]}}.")
        rules = {}
        for op, rule in ops.items():
            path = ("ops", str(op))
            if not isinstance(rule, dict):
                self.fail(path, "must be {weights: [...], activations: [...]}", "write e.g. {weights: [4, 8], activations: [8]}.")
            for key in rule:
                if key not in OP_KEYS:
                    self.fail(path + (str(key),), "is unknown", f"known keys: {', '.join(OP_KEYS)}.")
            weights = self.widths(rule.get("weights", [8]), path + ("weights",), allow_float=False)
            acts = self.widths(rule.get("activations", [8]), path + ("activations",), allow_float=True)
            rules[str(op)] = OpRule(weights, acts)
        rules.setdefault("default", OpRule((8,), (8,)))
        return rules

    @overload
    def widths(self, values: object, path: tuple, allow_float: Literal[False]) -> tuple[int, ...]: ...

    @overload
    def widths(self, values: object, path: tuple, allow_float: bool) -> tuple[int | None, ...]: ...

    def widths(self, values: object, path: tuple, allow_float: bool) -> tuple[int | None, ...]:
        if not isinstance(values, list) or not values:
            self.fail(path, f"must be a non-empty list of bit-widths, not {values!r}", "write e.g. [4, 8].")
        out: list[int | None] = []
        for v in values:
            if allow_float and v in ("float", None):
                out.append(None)
            elif isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
                self.fail(path, f"holds {v!r}, not a bit-width from 2 to 16{' or float' if allow_float else ''}",
                          "write e.g. [4, 8].")
            else:
                out.append(v)
        return tuple(dict.fromkeys(out))

    def pairs(self, pairs) -> frozenset:
        if not isinstance(pairs, list):
            self.fail(("pairs",), "must be a list of [weight bits, activation bits]", "write e.g. [[4, 8], [8, 8]].")
        out = set()
        for pair in pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                self.fail(("pairs",), f"holds {pair!r}, not a [weight, activation] pair", "write e.g. [[4, 8], [8, 8]].")
            w = self.widths([pair[0]], ("pairs",), allow_float=False)[0]
            a = self.widths([pair[1]], ("pairs",), allow_float=True)[0]
            out.add((w, a))
        return frozenset(out)

    def pins(self, pins) -> dict[str, Candidate]:
        if not isinstance(pins, dict):
            self.fail(("pin",), "must map layer names to W:A", 'write e.g. pin: {/conv1/Conv: "8:8"}.')
        out = {}
        for name, text in pins.items():
            w, _, a = str(text).partition(":")
            try:
                out[str(name)] = Candidate(_width(w), _width(a) if a else None)
            except ValueError:
                self.fail(("pin", str(name)), f"has {text!r}, not W:A with widths 2-16 or float", 'write e.g. "8:8".')
        return out

    def ties(self, ties, key: str = "tie") -> tuple[str, ...]:
        if not isinstance(ties, list) or not all(isinstance(t, str) for t in ties):
            self.fail((key,), "must be a list of op types", f"write e.g. {key}: [Concat, Add].")
        return tuple(ties)

    def consistent(self, profile: Profile) -> None:
        """Rules that leave an op type nothing to run at are impossible."""
        for op in profile.ops:
            rule = profile.rule(op)
            if not profile.float_layers and not any(profile.allows(op, Candidate(w, a))
                                                    for w in rule.weights for a in rule.activations):
                self.fail(("ops", op), "allows no (weight, activation) pair that `pairs` accepts, and "
                          "float_layers is false", "add a pair for it or allow float layers.")


def _width(text: str) -> int | None:
    text = text.strip()
    if text in ("float", ""):
        return None
    value = int(text)
    if not 2 <= value <= 16:
        raise ValueError(text)
    return value
