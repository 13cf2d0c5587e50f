"""One run's configuration: nested frozen dataclasses, every default stated once, here.

    QuantizeConfig
      model                     the float model (a path)
      data: DataConfig          calibration data, how many samples, batch size
      preprocess: PreprocessConfig  image-folder preprocessing (overrides the model's metadata)
      precision: PrecisionConfig    uniform widths, per-layer overrides, rounding
      quantizers: QuantOptions      the writer's ranges, bias, layout, scope (`onnxmpq.types`)
      search: SearchConfig      budgets, metric, solver, candidates, rules, drop limit
      sweep: SweepConfig        a Pareto sweep of one budget instead of one model
      output: OutputConfig      where the model and reports go, verification

Every field carries its command-line flag and help in its metadata (`setting`); the CLI builds its
option groups from them (`onnxmpq.cli.options`), `from_mapping` reads the same fields from a YAML
config (sections by name, or the flat long-option keys of `onnxmpq quantize`), and the Python API
takes the dataclasses themselves. A value arrives as text (the command line) or as a YAML/Python
value; the field's parser turns either into its type and raises `ConfigError(field, ...)`, which
each front end words in its own names (`errors.option`: `--max-drop` on the command line,
`search.max_drop` elsewhere).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NoReturn

from onnxmpq.allocate import Budget, parse_budget
from onnxmpq.errors import ConfigError, OnnxmpqError, option
from onnxmpq.types import ActRange, Candidate, Probes, QuantOptions, Rounding, Scope, WeightRange

Parser = Callable[[Any, str], Any]
DEFAULT_LIMIT = 256   # calibration samples


# ---------------------------------------------------------------- parsers: (value, field path) -> typed value


def parse_bits(value: Any, path: str) -> int | None:
    """A width 2..16, or float (None, "float", "fp32", 0) for an unquantized side."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("float", "fp32", "0", "")):
        return None
    if isinstance(value, bool) or value == 0:
        if value == 0 and not isinstance(value, bool):
            return None
        _bad(path, value, "a bit-width from 2 to 16, or float")
    try:
        bits = int(str(value).strip())
    except ValueError:
        bits = -1
    if not 2 <= bits <= 16:
        _bad(path, value, "a bit-width from 2 to 16, or float")
    return bits


def parse_bit_list(value: Any, path: str) -> tuple[int | None, ...]:
    """Widths as "2,4,8" or a list; float allowed."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    if not items:
        _bad(path, value, "one or more widths such as 2,4,8")
    return tuple(parse_bits(v, path) for v in items)


def parse_weight_widths(value: Any, path: str) -> tuple[int, ...]:
    """Candidate weight widths: a bit list without float."""
    widths = tuple(b for b in parse_bit_list(value, path) if b)
    if not widths:
        _bad(path, value, "one or more weight widths such as 2,4,8")
    return widths


def parse_layer_bits(value: Any, path: str) -> dict[str, Candidate]:
    """NAME=W[:A] items (a list, or one string), or a mapping {NAME: "W[:A]" or a Candidate}; W or A may be
    float."""
    if isinstance(value, Mapping):
        given = {str(name): bits for name, bits in value.items() if isinstance(bits, Candidate)}
        rest = parse_layer_bits([f"{name}={bits}" for name, bits in value.items() if name not in given], path)
        return {**{name: _candidate(bits, path) for name, bits in given.items()}, **rest}
    else:
        items = [value] if isinstance(value, str) else list(value or ())
    out = {}
    for item in items:
        name, sep, bits = str(item).rpartition("=")
        if not sep or not name:
            raise ConfigError(path, f"{item!r} is not NAME=W[:A]", "write e.g. /conv1/Conv=8:8")
        w, _, a = bits.partition(":")
        out[name] = Candidate(parse_bits(w, path), parse_bits(a, path) if a else None)
    return out


def _candidate(cand: Candidate, path: str) -> Candidate:
    """A Candidate whose widths are checked as any other width."""
    return Candidate(parse_bits(cand.weight_bits, path), parse_bits(cand.act_bits, path))


def parse_budgets(value: Any, path: str) -> tuple[Budget, ...]:
    """KIND=VALUE items (see `allocate.parse_budget`), a list or one string."""
    items = [value] if isinstance(value, (str, Budget)) else list(value or ())
    return tuple(item if isinstance(item, Budget) else parse_budget(str(item)) for item in items)


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> Parser:
    """A parser of int or float values in [low, high] (open ends where asked)."""
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        span = f"{'>' if low_open else '>='} {low:g}"
    else:
        span = "" if high is None else f"{'<' if high_open else '<='} {high:g}"

    def parse(value: Any, path: str) -> Any:
        if isinstance(value, bool):
            _bad(path, value, f"a number {span}".strip())
        try:
            number = kind(value.strip() if isinstance(value, str) else value)
            if kind is int and isinstance(value, float) and value != number:
                raise ValueError
        except (TypeError, ValueError):
            _bad(path, value, f"{'a whole number' if kind is int else 'a number'} {span}".strip())
        if (low is not None and (number < low or low_open and number == low)) or \
                (high is not None and (number > high or high_open and number == high)):
            _bad(path, value, f"a number {span}")
        return number
    return parse


def _optional(parse: Parser) -> Parser:
    return lambda value, path: None if value is None else parse(value, path)


def _text(value: Any, path: str) -> str:
    if not isinstance(value, (str, int, float, os.PathLike)) or isinstance(value, bool):
        _bad(path, value, "a string")
    return str(value)


def _optional_text(value: Any, path: str) -> str | None:
    return None if value is None else _text(value, path)


def _flag(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    _bad(path, value, "true or false")


def _choice(options: Callable[[], list[str]]) -> Parser:
    def parse(value: Any, path: str) -> str:
        known = options()
        text = str(value.value if isinstance(value, Enum) else value).strip()
        if text not in known:
            _bad(path, value, "one of " + ", ".join(known))
        return text
    return parse


def _enum(kind: type[Enum]) -> Parser:
    def parse(value: Any, path: str) -> Enum:
        try:
            return kind(value.value if isinstance(value, Enum) else str(value).strip().lower())
        except ValueError:
            _bad(path, value, "one of " + ", ".join(str(m.value) for m in kind))
    return parse


def _bad(path: str, value: Any, expected: str) -> NoReturn:
    raise ConfigError(path, f"{value!r} is not {expected}", f"set {option(path)} to {expected}")


# ---------------------------------------------------------------- field metadata


@dataclass(frozen=True)
class Setting:
    """What the front ends know of one field: its flag, help, parser, and how the CLI takes it."""

    flag: str
    help: str
    parse: Parser
    short: str | None = None
    multiple: bool = False          # repeatable on the command line (a list in YAML)
    is_flag: bool = False           # a boolean switch; `off` is the flag that sets False ("--no-verify")
    off: str | None = None
    choices: Callable[[], list[str]] | None = None   # shown in --help, checked by `parse`
    metavar: str | None = None


METAVARS = {"--limit": "N", "--batch-size": "N", "--weight-bits": "BITS", "--act-bits": "BITS[,BITS...]",
            "--layer-bits": "NAME=W[:A]", "--budget": "KIND=VALUE", "--bits": "BITS,BITS...", "--keep": "NAME=W[:A]",
            "--max-drop": "FRACTION", "--trials": "N", "--seed": "N", "--time-limit": "SECONDS",
            "--sweep": "KIND=START:STOP:STEP", "--size": "HxW", "--scale": "X", "--mean": "M[,M...]",
            "--std": "S[,S...]", "--profile": "NAME|FILE", "--percentile": "P"}


def setting(default: Any, flag: str, help: str, parse: Parser, **kw: Any) -> Any:
    """A dataclass field with its `Setting` in the metadata; mutable defaults become factories."""
    kw.setdefault("metavar", METAVARS.get(flag))
    meta = {"setting": Setting(flag, help, parse, **kw)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _registry_names(module: str, name: str) -> Callable[[], list[str]]:
    """The names in a registry, read when asked (the registries import the heavy parts)."""
    def names() -> list[str]:
        import importlib
        return sorted(getattr(importlib.import_module(module), name))
    return names


METHODS = _registry_names("onnxmpq.allocate", "SOLVERS")
METRICS = _registry_names("onnxmpq.sensitivity", "METRICS")


@dataclass(frozen=True)
class DataConfig:
    """Calibration data."""

    calib: str | None = setting(None, "--calib", "Calibration data: .npz/.npy, a folder of them, test_data_set_* "
                                "folders or images.", _optional_text, metavar="PATH")
    limit: int = setting(DEFAULT_LIMIT, "--limit", "Calibration samples; verification and --max-drop score the next "
                         "256, or the last fifth of a set no larger than the limit.", _number(int, 1))
    batch_size: int = setting(32, "--batch-size", "Samples per onnxruntime call (statistics, probes, verification).",
                              _number(int, 1))


@dataclass(frozen=True)
class PreprocessConfig:
    """Image-folder preprocessing; a field left None keeps the model's `onnxmpq.preprocess` metadata
    (or `calibrate.Preprocess`'s default)."""

    size: str | None = setting(None, "--size", "Image size HxW (e.g. 224x224); default: the model input's dims.",
                               _optional_text)
    resize: str | None = setting(None, "--resize", "Resize mode.", _optional(_choice(lambda: ["stretch", "shorter",
                                                                                               "none"])),
                                 choices=lambda: ["stretch", "shorter", "none"])
    crop: str | None = setting(None, "--crop", "Crop mode after resizing.",
                               _optional(_choice(lambda: ["center", "none"])), choices=lambda: ["center", "none"])
    scale: float | None = setting(None, "--scale", "Pixel scale before mean/std (default 1/255).",
                                  _optional(_number(float, 0, low_open=True)))
    mean: str | None = setting(None, "--mean", "Per-channel mean, comma-separated (e.g. 0.485,0.456,0.406).",
                               _optional_text)
    std: str | None = setting(None, "--std", "Per-channel std, comma-separated.", _optional_text)
    layout: str | None = setting(None, "--layout", "Tensor layout.", _optional(_choice(lambda: ["NCHW", "NHWC"])),
                                 choices=lambda: ["NCHW", "NHWC"])
    channel_order: str | None = setting(None, "--channel-order", "Channel order.",
                                        _optional(_choice(lambda: ["RGB", "BGR", "L"])),
                                        choices=lambda: ["RGB", "BGR", "L"])


@dataclass(frozen=True)
class PrecisionConfig:
    """Uniform widths, per-layer overrides and the rounding of the written weights."""

    weight_bits: int | None = setting(8, "--weight-bits", "Weight bits for every layer (2-16, or float).",
                                      parse_bits, short="-w")
    act_bits: tuple[int | None, ...] = setting((8,), "--act-bits", "Activation bits (2-16, or float); several, "
                                               "comma-separated, are the candidates under --budget.",
                                               parse_bit_list, short="-a")
    layer_bits: dict[str, Candidate] = setting({}, "--layer-bits", "Per-layer override NAME=W[:A]; repeatable.",
                                               parse_layer_bits, multiple=True)
    allocation: str | None = setting(None, "--allocation", "Per-layer bits from a JSON allocation or report.",
                                     _optional_text, metavar="PATH")
    rounding: Rounding = setting(Rounding.AUTO, "--rounding", "Weight rounding: nearest; GPTQ with a least-squares "
                                 "re-fit to the float outputs; auto = gptq when a layer has under 8 weight bits and "
                                 "calibration data is given, else nearest.", _enum(Rounding),
                                 choices=lambda: [m.value for m in Rounding])


@dataclass(frozen=True)
class SearchConfig:
    """How every layer's precision is chosen: budgets, metric, solver, candidates, rules, drop limit."""

    budgets: tuple[Budget, ...] = setting((), "--budget", "Choose every layer's bits under KIND=VALUE: "
                                          "weight-bytes=150KB, avg-bits=3, bitops=0.5x, latency-ms=1.5; repeatable "
                                          "(all are honoured).", parse_budgets, multiple=True)
    metric: str | None = setting(None, "--metric", "Sensitivity metric the allocation minimises [default: the "
                                 "method's own metric, else kl].", _optional(_choice(METRICS)), choices=METRICS)
    method: str = setting("ilp", "--method", "Allocation method under --budget / --max-drop.", _choice(METHODS),
                          choices=METHODS)
    weight_bits: tuple[int, ...] = setting((2, 3, 4, 5, 6, 7, 8), "--bits", "Candidate weight bits under --budget "
                                           "(activation candidates: --act-bits).", parse_weight_widths)
    profile: str | None = setting(None, "--profile", "Hardware profile: a built-in name (see `onnxmpq profiles`) or "
                                  "a YAML file.", _optional_text)
    keep: dict[str, Candidate] = setting({}, "--keep", "Fix a layer at NAME=W[:A] (float allowed) while the rest "
                                         "are chosen; repeatable.", parse_layer_bits, multiple=True)
    max_drop: float | None = setting(None, "--max-drop", "Largest allowed drop in top-1 agreement with the float "
                                     "model on held-out calibration samples (0.01 = 1 point). Alone: the smallest "
                                     "model within it; with --budget: a check.",
                                     _optional(_number(float, 0, 1, high_open=True)))
    latency: str | None = setting(None, "--latency", "Latency table from `onnxmpq profile-latency` (else measured "
                                  "when latency-ms needs it).", _optional_text, metavar="PATH")
    trials: int = setting(40, "--trials", "Optuna trials of --method threshold.", _number(int, 1))
    seed: int = setting(0, "--seed", "Seed of the searches that sample.", _number(int))
    time_limit: float = setting(10.0, "--time-limit", "Solver time limit, seconds.", _number(float, 0, low_open=True))
    cache_dir: str | None = setting(None, "--cache", "Sensitivity cache folder.", _optional_text, metavar="DIR")
    probes: Probes | None = setting(None, "--probes", "Sensitivity probes: exact (one network run per layer and "
                                    "candidate) or fast (one run per layer with noise, scaled by each candidate's "
                                    "own output error; sqnr and kl only) [default: fast where the metric allows, "
                                    "else exact; BENCHMARKS.md compares them].", _optional(_enum(Probes)),
                                    choices=lambda: [m.value for m in Probes])
    probe_rounding: Rounding = setting(Rounding.NEAREST, "--probe-rounding", "Weight rounding inside the "
                                       "sensitivity probes: nearest, gptq, or auto = the written model's (--rounding); "
                                       "nearest probes choose allocations whose GPTQ-rounded models score as those "
                                       "of GPTQ probes, at a fraction of the cost (BENCHMARKS.md).", _enum(Rounding),
                                       choices=lambda: [m.value for m in Rounding])

    @property
    def choosing(self) -> bool:
        """Whether the precisions are chosen (a budget or a drop limit) rather than given."""
        return bool(self.budgets) or self.max_drop is not None


@dataclass(frozen=True)
class SweepConfig:
    """A Pareto sweep of one budget, instead of one model."""

    spec: str | None = setting(None, "--sweep", "Pareto sweep KIND=START:STOP:STEP (e.g. avg-bits=2.5:8:0.5): "
                               "writes the frontier JSON and plot next to --output instead of one model.",
                               _optional_text)
    models: bool = setting(False, "--sweep-models", "With --sweep, also write the model at every point.", _flag,
                           is_flag=True)


@dataclass(frozen=True)
class OutputConfig:
    """Where the model and its reports go, and whether the written model is verified."""

    path: str | None = setting(None, "--output", "Where to write the QDQ model.", _optional_text, short="-o",
                               metavar="PATH")
    verify: bool = setting(True, "--verify", "Score the written model against float on held-out samples and time "
                           "it.", _flag, is_flag=True, off="--no-verify")
    report: str | None = setting(None, "--report", "Write the report JSON here.", _optional_text, metavar="PATH")
    report_dir: str | None = setting(None, "--report-dir", "Write report.json and a self-contained report.html "
                                     "with plots into this folder.", _optional_text, metavar="DIR")
    stable_report: bool = setting(False, "--stable-report", "Leave wall times and latencies out of the report files "
                                  "(the same inputs and seed then give identical bytes).", _flag, is_flag=True)


def _quantizer_settings() -> dict[str, Setting]:
    """The writer options' flags (QuantOptions lives in `types`, which stays free of front-end concerns)."""
    def names(kind: type[Enum]) -> Callable[[], list[str]]:
        return lambda: [str(m.value) for m in kind]
    return {
        "weight_range": Setting("--weight-range", "Per-channel weight scale for nearest rounding: min/max, or "
                                "MSE-optimal clipping.", _enum(WeightRange), choices=names(WeightRange)),
        "act_range": Setting("--act-range", "Activation range from the calibration histogram.", _enum(ActRange),
                             choices=names(ActRange)),
        "percentile": Setting("--percentile", "Percentile for --act-range percentile.", _number(float, 50, 100),
                              metavar="P"),
        "int2_container": Setting("--int2-container", "Store 2-bit weights as INT2 (with a Reshape guard) or in INT4.",
                                  _choice(lambda: ["int2", "int4"]), choices=lambda: ["int2", "int4"]),
        "bias": Setting("--bias", "Biases as INT32 at scale_x * scale_w (what integer kernels take), or float; auto = "
                        "INT32 where the layer's input is quantized and its weights have at most 8 bits.",
                        _choice(lambda: ["auto", "float", "int32"]), choices=lambda: ["auto", "float", "int32"]),
        "weight_layout": Setting("--weight-layout", "INT4/INT2 weights: DQ on the packed codes (native), or a Cast to "
                                 "INT8 in front so onnxruntime runs its INT8 kernels (int8-cast); auto = int8-cast "
                                 "where activations are 8-bit.", _choice(lambda: ["auto", "native", "int8-cast"]),
                                 choices=lambda: ["auto", "native", "int8-cast"]),
        "scope": Setting("--scope", "graph: Q/DQ on every tensor an integer kernel reads or writes (the model runs on "
                         "integer kernels); layers: only the weighted layers' weights and inputs (the older form).",
                         _enum(Scope), choices=names(Scope)),
    }


QUANTIZER_SETTINGS = _quantizer_settings()


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything one `quantize` run is told (see the module docstring)."""

    model: str
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    precision: PrecisionConfig = PrecisionConfig()
    quantizers: QuantOptions = QuantOptions()
    search: SearchConfig = SearchConfig()
    sweep: SweepConfig = SweepConfig()
    output: OutputConfig = OutputConfig()

    def check(self) -> QuantizeConfig:
        """The checks that span fields; returns self."""
        if self.output.path is None:
            raise ConfigError("output.path", "is not set", "say where to write the quantized model")
        acts = self.precision.act_bits
        if len(acts) > 1 and not self.search.choosing:
            raise ConfigError("precision.act_bits", f"has several values {list(acts)} but nothing chooses among "
                              "them", f"give one value, or add {option('search.budgets')}")
        if self.sweep.models and not self.sweep.spec:
            raise ConfigError("sweep.models", "is set without a sweep", f"add {option('sweep.spec')}")
        return self


# Section name -> (the dataclass, its title in --help, its fields' settings)
SECTIONS: dict[str, tuple[type, str]] = {
    "data": (DataConfig, "Calibration data"),
    "precision": (PrecisionConfig, "Precision"),
    "quantizers": (QuantOptions, "Quantizers"),
    "search": (SearchConfig, "Allocation under budgets"),
    "sweep": (SweepConfig, "Pareto sweep"),
    "output": (OutputConfig, "Output"),
    "preprocess": (PreprocessConfig, "Image preprocessing (image folders; overrides the model's metadata)"),
}


def settings_of(section: str) -> Iterator[tuple[str, Setting, Any]]:
    """(field name, Setting, default) of every front-end field of a section, in declaration order."""
    kind = SECTIONS[section][0]
    for f in dataclasses.fields(kind):
        meta = f.metadata.get("setting") or QUANTIZER_SETTINGS.get(f.name) if kind is QuantOptions else \
            f.metadata.get("setting")
        if meta is None:
            continue
        factory = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory() if callable(factory) else None
        yield f.name, meta, default


def all_settings() -> Iterator[tuple[str, Setting, Any]]:
    """(dotted path, Setting, default) of every front-end field."""
    for section in SECTIONS:
        for name, meta, default in settings_of(section):
            yield f"{section}.{name}", meta, default


def flag_of(path: str) -> str | None:
    """The command-line flag of a dotted field path, None for a path without one."""
    return next((meta.flag for p, meta, _ in all_settings() if p == path), None)


def build(model: str, values: Mapping[str, Any]) -> QuantizeConfig:
    """A checked config from raw values by dotted path ({"search.max_drop": "0.01", ...}); missing paths
    keep their defaults. Each value goes through its field's parser."""
    sections = by_section(values)
    return QuantizeConfig(model=model, **{name: build_section(name, sections.get(name, {})) for name in SECTIONS}).check()


def by_section(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Raw values by dotted path, grouped by section: {"search": {"max_drop": ...}, ...}."""
    sections: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        section, _, name = path.partition(".")
        if section not in SECTIONS:
            raise ConfigError(path, "is not a setting", "sections are " + ", ".join(SECTIONS))
        sections.setdefault(section, {})[name] = value
    return sections


def build_section(section: str, values: Mapping[str, Any]) -> Any:
    """One section's dataclass from raw values by field name, each through its parser."""
    known = {name: meta for name, meta, _ in settings_of(section)}
    parsed = {}
    for name, value in values.items():
        if name not in known:
            raise ConfigError(f"{section}.{name}", "is not a setting", f"the {section} section takes "
                              + ", ".join(known))
        parsed[name] = known[name].parse(value, f"{section}.{name}")
    return SECTIONS[section][0](**parsed)


def from_mapping(data: Mapping[str, Any], source: str, lines: Mapping[tuple[str, ...], int] | None = None,
                 origins: dict[str, int] | None = None) -> dict[str, Any]:
    """Raw values by dotted path from a YAML-like mapping: sections by name ({"search": {"max_drop": 0.01}})
    or flat keys, either a field path's last part or a long option without dashes ("max-drop", "budget").
    `origins`, when given, receives the line of each path's key."""
    lines = lines or {}
    flat: dict[str, str] = {}
    for path, _, _ in all_settings():
        flat.setdefault(path.partition(".")[2], path)
    flat.update({meta.flag.lstrip("-").replace("-", "_"): path for path, meta, _ in all_settings()})
    negated = {meta.off.lstrip("-").replace("-", "_"): path for path, meta, _ in all_settings() if meta.off}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in SECTIONS and isinstance(value, Mapping):
            for sub, item in value.items():
                path = f"{name}.{str(sub).replace('-', '_')}"
                if flag_of(path) is None:
                    where = lines.get((str(key), str(sub)))
                    raise OnnxmpqError(f"{source}{f' line {where}' if where else ''}: {key}.{sub} is not a setting.",
                                       f"the {name} section takes: " + ", ".join(n for n, _, _ in settings_of(name)))
                out[path] = item
                _note(origins, path, lines.get((str(key), str(sub))))
        elif name in flat:
            out[flat[name]] = value
            _note(origins, flat[name], lines.get((str(key),)))
        elif name in negated:   # `no-verify: true` is `verify: false`
            out[negated[name]] = not _flag(value, negated[name])
            _note(origins, negated[name], lines.get((str(key),)))
        else:
            where = lines.get((str(key),))
            raise OnnxmpqError(f"{source}{f' line {where}' if where else ''}: key {key!r} is not a quantize setting.",
                               "use the option names of `onnxmpq quantize --help` without dashes, or sections "
                               + ", ".join(SECTIONS) + ".")
    return out


def _note(origins: dict[str, int] | None, path: str, line: int | None) -> None:
    if origins is not None and line is not None:
        origins[path] = line
