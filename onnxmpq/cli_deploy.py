"""Commands for deployment pipelines: check, profiles, profile-latency, run (registered on `cli.cli`).

`onnxmpq run CONFIG.yaml [QUANTIZE OPTIONS]` reads every `quantize` option from a YAML mapping whose
keys are the option names without dashes (`budget: [avg-bits=4]`, `max-drop: 0.01`, `report-dir:
out/`), plus `model`, `output` and an optional `check: {profile: NAME}`; options given on the command
line replace the file's. Exit codes as everywhere: 0, 1 for bad input, 2 for a broken rule or budget.
"""

from __future__ import annotations

import click

from onnxmpq import paths
from onnxmpq.cli import _bits, cli, emit, quantize, quiet_option
from onnxmpq.errors import OnnxmpqError
from onnxmpq.hardware import compliance as hardware
from onnxmpq.hardware import profiles
from onnxmpq.pipeline import api


@cli.command()
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


@cli.command("profiles")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_profiles(name, as_json):
    """List the built-in hardware profiles, or show one (a name or a YAML file) in the YAML form."""
    import yaml

    if name is None:
        data = {p.name: p.description for p in profiles.BUILTINS.values()}
        emit(as_json, data, "\n".join(f"{k:<16} {v}" for k, v in data.items()))
        return
    profile = profiles.load(name).to_dict()
    emit(as_json, profile, yaml.safe_dump(profile, sort_keys=False, width=100).rstrip())


@cli.command("profile-latency")
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
    from onnxmpq import progress
    from onnxmpq.allocate import latency
    from onnxmpq.pipeline.context import RunContext
    from onnxmpq.sensitivity import parse_candidates
    from onnxmpq.types import QuantOptions

    m = api.load(model)
    paths.check_writes({"-o/--output": output}, {"model": model, "--calib": calib})
    cands = parse_candidates([b for b in (_bits(v.strip(), "--bits") for v in bits.split(",")) if b],
                             [_bits(a.strip(), "--act-bits") for a in act_bits.split(",")])
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


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("config", type=click.Path(dir_okay=False))
@click.pass_context
def run(ctx, config):
    """Quantize (and check) as CONFIG.yaml says; extra quantize options on the command line override it."""
    import contextlib
    import io
    import json

    args, check_profile = config_args(config, list(ctx.args))
    sub = quantize.make_context("onnxmpq run", args, parent=ctx)
    as_json = sub.params["as_json"]
    if not check_profile:
        with sub:
            quantize.invoke(sub)
        return
    sub.params["as_json"] = True
    captured = io.StringIO()
    with sub, contextlib.redirect_stdout(captured):
        quantize.invoke(sub)
    result = json.loads(captured.getvalue())
    output = sub.params["output"]
    target = profiles.load(check_profile)
    violations = hardware.check(api.load(output).proto, target)
    verdict = {"model": output, **hardware.summary(violations, target)}
    if as_json:
        emit(True, {"quantize": result, "check": verdict}, "")
    else:
        click.echo(f"wrote {output}: avg {result['avg_weight_bits']:.2f} weight bits, {result['weight_bytes']:,d} "
                   f"weight bytes, {result['file_bytes']:,d} file bytes")
        click.echo(f"{output}: complies with {target.name}" if not violations else
                   f"{output}: {len(violations)} violation(s) of {target.name}")
        for v in violations:
            click.echo(f"  {v.layer}: [{v.rule}] {v.message} Fix: {v.fix}")
    if violations:
        ctx.exit(2)


def config_args(path: str, overrides: list[str]) -> tuple[list[str], str | None]:
    """quantize's argument list from the YAML config, with the command line's options replacing its own."""
    from onnxmpq import yamlfile
    from onnxmpq.hardware.profiles import _key_lines

    try:
        text = paths.read_regular(path, "config", "pass a YAML file.").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OnnxmpqError(f"cannot read config {path!r}: {exc}.", "pass a UTF-8 YAML file.") from None
    data, node = yamlfile.parse(text, f"config {path}", "fix the YAML syntax.")
    lines = _key_lines(node)
    if not isinstance(data, dict) or "model" not in data or "output" not in data:
        raise OnnxmpqError(f"config {path} must be a mapping with at least `model` and `output`.",
                           "see the README's section 'As a pipeline step' for an example.")
    long_opts, any_opts = {}, {}
    for param in quantize.params:
        if isinstance(param, click.Option):
            for opt in param.opts + param.secondary_opts:
                any_opts[opt] = param
                if opt.startswith("--"):
                    long_opts[opt[2:]] = (opt, param)
    given_params = {any_opts[a.split("=")[0]].name for a in overrides
                    if a.startswith("-") and a.split("=")[0] in any_opts}
    args = [str(data["model"])]
    check_profile = None
    for key, value in data.items():
        if key == "model":
            continue
        if key == "check":
            check_profile = value.get("profile") if isinstance(value, dict) else value
            if not isinstance(check_profile, str):
                raise OnnxmpqError(f"config {path} line {lines.get(('check',), '?')}: key 'check' needs a profile.",
                                   "write check: {profile: int8-only}.")
            continue
        entry = long_opts.get(str(key).replace("_", "-"))
        if entry is None:
            raise OnnxmpqError(f"config {path} line {lines.get((str(key),), '?')}: key {key!r} is not a quantize option.",
                               "use the option names of `onnxmpq quantize --help` without dashes.")
        flag, option = entry
        if option.name in given_params:
            continue
        args += _option_args(flag, value, option)
    return args + overrides, check_profile


def _option_args(flag: str, value, option) -> list[str]:
    if option.is_flag:
        return [flag] if value else []
    values = value if isinstance(value, list) and option.multiple else [value]
    if isinstance(value, list) and not option.multiple:
        values = [",".join(str(v) for v in value)]
    out = []
    for v in values:
        out += [flag, str(v)]
    return out

