"""Commands for deployment pipelines: check, profiles, profile-latency, run.

`onnxmpq run CONFIG.yaml [QUANTIZE OPTIONS]` reads the run configuration from a YAML mapping: `model`,
`output`, the settings as quantize's long option names without dashes (`budget: [avg-bits=4]`,
`max-drop: 0.01`, `report-dir: out/`) or by section (`search: {max_drop: 0.01}`), and an optional
`check: {profile: NAME}`; options given on the command line replace the file's. Exit codes as everywhere:
0, 1 for bad input, 2 for a broken rule or budget.
"""

from __future__ import annotations

from typing import Any

import click
import yaml

from onnxmpq import errors, paths, progress, yamlfile
from onnxmpq.allocate import latency
from onnxmpq.cli.common import emit, quiet_option, widths
from onnxmpq.cli.options import GroupedCommand, config_options, given
from onnxmpq.cli.quantize import QUANTIZE_SECTIONS, emit_result, execute
from onnxmpq.errors import ConfigError, OnnxmpqError
from onnxmpq.hardware import compliance as hardware
from onnxmpq.hardware import profiles
from onnxmpq.pipeline import api, config
from onnxmpq.pipeline.context import RunContext
from onnxmpq.report.summary import Report
from onnxmpq.sensitivity import parse_candidates
from onnxmpq.types import QuantOptions


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--profile", required=True, help="A built-in profile (see `onnxmpq profiles`) or a YAML file.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and the violations as JSON.")
@quiet_option
@click.pass_context
def check(ctx, model, profile, as_json):
    """Check that MODEL (any QDQ model) obeys a hardware profile's bit-width rules; exit 2 on violations."""
    target = profiles.load(profile)
    violations = hardware.check(api.load(model).proto, target)
    verdict = hardware.summary(violations, target)
    lines = [f"{model}: complies with {target.name}" if not violations else
             f"{model}: {len(violations)} violation(s) of {target.name}"]
    lines += [f"  {v.layer}: [{v.rule}] {v.message} Fix: {v.fix}" for v in violations]
    emit(as_json, {"model": str(model), **verdict}, "\n".join(lines))
    if violations:
        ctx.exit(2)


@click.command("profiles")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_profiles(name, as_json):
    """List the built-in hardware profiles, or show one (a name or a YAML file) in the YAML form."""
    if name is None:
        data = {p.name: p.description for p in profiles.BUILTINS.values()}
        emit(as_json, data, "\n".join(f"{k:<16} {v}" for k, v in data.items()))
        return
    profile = profiles.load(name).to_dict()
    emit(as_json, profile, yaml.safe_dump(profile, sort_keys=False, width=100).rstrip())


@click.command("profile-latency")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, help="Calibration data (activation ranges and the timed sample).")
@click.option("--bits", default="2,3,4,5,6,7,8", show_default=True, help="Candidate weight bits.")
@click.option("--act-bits", default="8", show_default=True, help="Candidate activation bits (float allowed).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Latency table JSON.")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per measurement (median).")
@click.option("--threads", type=int, default=2, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--weight-layout", type=click.Choice(["auto", "native", "int8-cast"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@quiet_option
def profile_latency(model, calib, bits, act_bits, output, runs, threads, weight_layout, as_json):
    """Measure each layer's latency at each candidate in onnxruntime on this machine (batch 1)."""
    m = api.load(model)
    paths.check_writes({"-o/--output": output}, {"model": model, "--calib": calib})
    cands = parse_candidates([b for b in widths(bits, "--bits") if b], widths(act_bits, "--act-bits"))
    ctx = RunContext(m, calib, limit=64)
    options = QuantOptions(weight_layout=weight_layout)
    with progress.bar("latency", len(ctx.model.points().units), unit="unit") as advance:
        table = latency.profile(ctx.model, cands, ctx.stats(options), ctx.first(), options, runs, threads,
                                on_layer=lambda n: advance(1))
    table.save(output)
    lines = [f"wrote {output}: reference {table.reference} {table.reference_ms:.3f} ms, float {table.float_ms:.3f} ms "
             f"(batch {table.batch}, {threads} threads); change per layer (ms):"]
    keys = list(dict.fromkeys([c.key for c in cands] + [k for row in table.layers.values() for k in row]))
    lines.append(f"{'unit':<44} " + " ".join(f"{k:>8}" for k in keys))
    lines += [f"{n[:44]:<44} " + " ".join(f"{row[k]:>8.3f}" if k in row else f"{'-':>8}" for k in keys)
              for n, row in table.layers.items()]
    emit(as_json, table.to_dict(), "\n".join(lines))


@click.command(cls=GroupedCommand)
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@config_options(QUANTIZE_SECTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print the report (and the check's verdict) as JSON.")
@quiet_option
@click.pass_context
def run(ctx: click.Context, config_file: str, as_json: bool, **kw: Any) -> None:
    """Quantize (and check) as CONFIG.yaml says; quantize options on the command line override it."""
    model, values, check_profile, origins = read_config(config_file)
    overrides = given(kw)
    try:  # the file's own values first, so a bad one is named by its key and line
        with errors.naming(lambda path: path):
            for section, fields in config.by_section({k: v for k, v in values.items() if k not in overrides}).items():
                config.build_section(section, fields)
    except ConfigError as exc:
        line = origins.get(exc.field)
        raise OnnxmpqError(f"config {config_file}{f' line {line}' if line else ''}: {exc.field} {exc.problem}.",
                           exc.hint) from None
    cfg = config.build(model, {**values, **overrides})
    target = profiles.load(check_profile) if check_profile else None  # a bad profile fails before the run
    if target is not None and cfg.sweep.spec:
        raise OnnxmpqError(f"config {config_file}: `check` needs one written model, not a sweep.",
                           "drop `check`, or check the sweep's models one by one with `onnxmpq check`.")
    result = execute(cfg)
    if target is None or not isinstance(result, Report):
        emit_result(as_json, result)
        return
    output = str(cfg.output.path)
    violations = hardware.check(api.load(output).proto, target)
    verdict = {"model": output, **hardware.summary(violations, target)}
    lines = [f"wrote {output}: avg {result.avg_weight_bits:.2f} weight bits, {result.weight_bytes:,d} weight bytes, "
             f"{result.file_bytes:,d} file bytes",
             f"{output}: complies with {target.name}" if not violations else
             f"{output}: {len(violations)} violation(s) of {target.name}"]
    lines += [f"  {v.layer}: [{v.rule}] {v.message} Fix: {v.fix}" for v in violations]
    emit(as_json, {"quantize": result.to_dict(), "check": verdict}, "\n".join(lines))
    if violations:
        ctx.exit(2)


def read_config(path: str) -> tuple[str, dict[str, Any], str | None, dict[str, int]]:
    """(model, raw values by config path, the profile to check against or None, each path's line) from a
    YAML config:
    sections by name or quantize's long option names (see `config.from_mapping`), plus `model` and an
    optional `check: {profile: NAME}`."""
    try:
        text = paths.read_regular(path, "config", "pass a YAML file.").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OnnxmpqError(f"cannot read config {path!r}: {exc}.", "pass a UTF-8 YAML file.") from None
    data, node = yamlfile.parse(text, f"config {path}", "fix the YAML syntax.")
    lines = yamlfile.key_lines(node)
    if not isinstance(data, dict) or "model" not in data or "output" not in data:
        raise OnnxmpqError(f"config {path} must be a mapping with at least `model` and `output`.",
                           "see the README's section 'As a pipeline step' for an example.")
    data = dict(data)
    model, check = data.pop("model"), data.pop("check", None)
    check_profile = check.get("profile") if isinstance(check, dict) else check
    if check is not None and not isinstance(check_profile, str):
        raise OnnxmpqError(f"config {path} line {lines.get(('check',), '?')}: key 'check' needs a profile.",
                           "write check: {profile: int8-only}.")
    origins: dict[str, int] = {}
    return str(model), config.from_mapping(data, f"config {path}", lines, origins), check_profile, origins
