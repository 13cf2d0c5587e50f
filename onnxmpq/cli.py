"""onnxmpq's command line: quantize, evaluate, inspect, compare, sensitivity (and, from `cli_deploy`,
check, profiles, profile-latency, run).

Exit codes: 0 success, 1 user error (one line on stderr with a hint, no traceback), 2 a rule or budget
violated. Every command takes `--json` for one machine-readable object on stdout; logs and progress
bars go to stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections import Counter
from pathlib import Path

import click

from onnxmpq import __version__, paths, progress
from onnxmpq.calibrate import Preprocess
from onnxmpq.errors import OnnxmpqError
from onnxmpq.pipeline import api
from onnxmpq.types import ActRange, Candidate, QuantOptions, Rounding, Scope, WeightRange
from onnxmpq.write.save import write_json

# ---------------------------------------------------------------- option groups


def preprocess_options(fn):
    """Image-folder preprocessing options; they override the model's `onnxmpq.preprocess` metadata."""
    opts = [
        click.option("--size", help="Image size HxW (e.g. 224x224); default: the model input's dims."),
        click.option("--resize", type=click.Choice(["stretch", "shorter", "none"]), help="Resize mode."),
        click.option("--crop", type=click.Choice(["center", "none"]), help="Crop mode after resizing."),
        click.option("--scale", type=float, help="Pixel scale before mean/std (default 1/255)."),
        click.option("--mean", help="Per-channel mean, comma-separated (e.g. 0.485,0.456,0.406)."),
        click.option("--std", help="Per-channel std, comma-separated."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Tensor layout."),
        click.option("--channel-order", type=click.Choice(["RGB", "BGR", "L"]), help="Channel order."),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(opts), fn)


def quiet_option(fn):
    """`-q/--quiet` on a command as well as on the group (`onnxmpq quantize ... -q`)."""
    def set_quiet(ctx, param, value):
        if value:
            progress.QUIET = True
        return value
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=set_quiet,
                        help="No progress bars or log lines on stderr.")(fn)


def parse_preprocess(model, kw: dict) -> Preprocess | None:
    """The model's metadata preprocessing (or the defaults) with the given options replaced."""
    given = {k: kw.pop(k) for k in ("size", "resize", "crop", "scale", "mean", "std", "layout", "channel_order")}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if "size" in given:
        given["size"] = _parse_ints(given["size"], "x", "--size", 2)
    for key in ("mean", "std"):
        if key in given:
            given[key] = tuple(_parse_floats(given[key], f"--{key}"))
    base = Preprocess.from_metadata(api.load(model).metadata) or Preprocess()
    return dataclasses.replace(base, **given)


def _parse_ints(text: str, sep: str, option: str, count: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split(sep))
    except ValueError:
        raise OnnxmpqError(f"{option} {text!r} is not a list of whole numbers.", f"write e.g. 224{sep}224.") from None
    if count and len(values) != count:
        raise OnnxmpqError(f"{option} needs {count} numbers, got {text!r}.", f"write e.g. 224{sep}224.")
    return values


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise OnnxmpqError(f"{option} {text!r} is not a comma-separated list of numbers.",
                           "write e.g. 0.485,0.456,0.406.") from None


def parse_layer_bits(items, option: str = "--layer-bits") -> dict[str, Candidate]:
    """NAME=W[:A] items; W or A may be 'float' (or 0) for an unquantized side."""
    out = {}
    for item in items:
        name, sep, bits = item.rpartition("=")
        if not sep or not name:
            raise OnnxmpqError(f"{option} {item!r} is not NAME=W[:A].", "write e.g. /conv1/Conv=8:8.")
        w, _, a = bits.partition(":")
        out[name] = Candidate(_bits(w, item), _bits(a, item) if a else None)
    return out


def _bits(text: str, item: str) -> int | None:
    if text in ("float", "0", "fp32", ""):
        return None
    if not text.isdigit() or not 2 <= int(text) <= 16:
        raise OnnxmpqError(f"bit-width {text!r} in {item!r} is not supported.", "use 2 to 16, or float.")
    return int(text)


def emit(as_json: bool, obj: object, human: str) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default) if as_json else human)


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="onnxmpq")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines on stderr.")
def cli(quiet: bool):
    """onnxmpq: post-training mixed-precision quantization of ONNX models."""
    progress.QUIET = quiet


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the QDQ model.")
@click.option("--calib", help="Calibration data: .npz/.npy, a folder of them, test_data_set_* folders or images.")
@click.option("-w", "--weight-bits", default="8", show_default=True, help="Weight bits for every layer (2-16, or float).")
@click.option("-a", "--act-bits", default="8", show_default=True, help="Activation bits (2-16, or float).")
@click.option("--layer-bits", multiple=True, help="Per-layer override NAME=W[:A]; repeatable.")
@click.option("--allocation", type=click.Path(dir_okay=False), help="Per-layer bits from a JSON allocation or report.")
@click.option("--weight-range", type=click.Choice([m.value for m in WeightRange]), default="minmax", show_default=True,
              help="Per-channel weight scale for nearest rounding: min/max, or MSE-optimal clipping.")
@click.option("--act-range", type=click.Choice([m.value for m in ActRange]), default="mse", show_default=True,
              help="Activation range from the calibration histogram.")
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.99, show_default=True,
              help="Percentile for --act-range percentile.")
@click.option("--rounding", type=click.Choice([m.value for m in Rounding]), default="auto", show_default=True,
              help="Weight rounding: nearest; GPTQ with a least-squares re-fit to the float outputs; auto = "
                   "gptq when a layer has under 8 weight bits and --calib is given, else nearest.")
@click.option("--bias", type=click.Choice(["auto", "float", "int32"]), default="auto", show_default=True,
              help="Biases as INT32 at scale_x * scale_w (what integer kernels take), or float; auto = INT32 "
                   "where the layer's input is quantized and its weights have at most 8 bits.")
@click.option("--scope", type=click.Choice([m.value for m in Scope]), default="graph", show_default=True,
              help="graph: Q/DQ on every tensor an integer kernel reads or writes (the model runs on integer "
                   "kernels); layers: only the weighted layers' weights and inputs (the older form).")
@click.option("--int2-container", type=click.Choice(["int2", "int4"]), default="int2", show_default=True,
              help="Store 2-bit weights as INT2 (with a Reshape guard) or in INT4.")
@click.option("--limit", type=int, help="Calibration samples [default: 256]; verification and --max-drop score "
                                       "the next 256, or the last fifth of a set no larger than the limit.")
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Samples per onnxruntime call (statistics, probes, verification).")
@click.option("--budget", "budgets", multiple=True,
              help="Choose every layer's bits under KIND=VALUE: weight-bytes=150KB, avg-bits=3, bitops=0.5x, "
                   "latency-ms=1.5; repeatable (all are honoured).")
@click.option("--metric", default="kl", show_default=True, help="Sensitivity metric the allocation minimises.")
@click.option("--method", type=click.Choice(["ilp", "ilp-cpsat", "greedy", "threshold", "eagl"]), default="ilp",
              show_default=True, help="Allocation method under --budget / --max-drop.")
@click.option("--bits", "bit_choices", default="2,3,4,5,6,7,8", show_default=True,
              help="Candidate weight bits under --budget (activation candidates: --act-bits, comma-separated).")
@click.option("--profile", help="Hardware profile: a built-in name (see `onnxmpq profiles`) or a YAML file.")
@click.option("--keep", multiple=True, help="Fix a layer at NAME=W[:A] (float allowed) while the rest are chosen.")
@click.option("--max-drop", type=float,
              help="Largest allowed drop in top-1 agreement with the float model on held-out calibration "
                   "samples (0.01 = 1 point). Alone: the smallest model within it; with --budget: a check.")
@click.option("--latency", "latency_file", type=click.Path(dir_okay=False),
              help="Latency table from `onnxmpq profile-latency` (else measured when latency-ms needs it).")
@click.option("--trials", type=int, default=40, show_default=True, help="Optuna trials of --method threshold.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the searches that sample.")
@click.option("--sweep", help="Pareto sweep KIND=START:STOP:STEP (e.g. avg-bits=2.5:8:0.5): writes the frontier "
                              "JSON and plot next to --output instead of one model.")
@click.option("--sweep-models", is_flag=True, help="With --sweep, also write the model at every point.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Solver time limit, seconds.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), help="Sensitivity cache folder.")
@click.option("--weight-layout", type=click.Choice(["auto", "native", "int8-cast"]), default="auto", show_default=True,
              help="INT4/INT2 weights: DQ on the packed codes (native), or a Cast to INT8 in front so onnxruntime "
                   "runs its INT8 kernels (int8-cast); auto = int8-cast where activations are 8-bit.")
@click.option("--no-verify", is_flag=True, help="Skip scoring and timing the written model.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report JSON here.")
@click.option("--report-dir", type=click.Path(file_okay=False),
              help="Write report.json and a self-contained report.html with plots into this folder.")
@click.option("--stable-report", is_flag=True, help="Leave wall times and latencies out of the report files "
                                                   "(the same inputs and seed then give identical bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@preprocess_options
@quiet_option
def quantize(model, output, calib, weight_bits, act_bits, layer_bits, allocation, weight_range, act_range,
             percentile, rounding, bias, scope, int2_container, limit, batch_size, budgets, metric, method, bit_choices,
             profile, keep, max_drop, latency_file, trials, seed, sweep, sweep_models, time_limit, cache_dir,
             weight_layout, no_verify, report_path, report_dir, stable_report, as_json, **kw):
    """Quantize MODEL: uniform bits, per-layer bits by hand, or bits chosen under budgets and hardware rules."""
    from onnxmpq.allocate import parse_budget
    from onnxmpq.pipeline import plan

    _check_quantize_paths(model, output, calib, allocation, latency_file, profile, report_path, report_dir, sweep,
                          sweep_models)
    overrides = api.read_allocation(allocation) if allocation else {}
    overrides.update(parse_layer_bits(layer_bits))
    options = QuantOptions(WeightRange(weight_range), ActRange(act_range), percentile, int2_container, bias,
                           weight_layout, Scope(scope))
    acts = [_bits(a.strip(), "--act-bits") for a in act_bits.split(",")]
    budgets = [parse_budget(b) for b in budgets]
    settings = plan.Settings(
        metric=metric, method=method, time_limit=time_limit, cache_dir=cache_dir, profile=profile,
        weight_bits=tuple(b for b in (_bits(v.strip(), "--bits") for v in bit_choices.split(",")) if b),
        act_bits=tuple(acts), keep=parse_layer_bits(keep, "--keep"), max_drop=max_drop, latency=latency_file,
        trials=trials, seed=seed, limit=limit or 256)
    if max_drop is not None and not 0 <= max_drop < 1:
        raise OnnxmpqError(f"--max-drop {max_drop} is not a fraction in [0, 1).", "write e.g. --max-drop 0.01.")
    if len(acts) > 1 and not (budgets or max_drop is not None):
        raise OnnxmpqError("several --act-bits values need --budget to choose among them.", "give one value.")
    pre = parse_preprocess(model, kw)
    if sweep:
        frontier = api.sweep(model, output, calib, sweep, settings, options=options, rounding=rounding,
                             batch_size=batch_size, preprocess=pre, write_models=sweep_models)
        emit(as_json, frontier, _sweep_summary(frontier))
        return
    choose = bool(budgets) or max_drop is not None
    report = api.quantize(model, output, calib, weight_bits=_bits(weight_bits, "--weight-bits"),
                          act_bits=acts[0], layer_bits=overrides, options=options, budgets=budgets,
                          allocation=settings if choose else None, rounding=rounding,
                          batch_size=batch_size, limit=limit, preprocess=pre, verify=not no_verify,
                          report_dir=report_dir, stable=stable_report)
    if report_path:
        write_json(report.to_dict(stable=stable_report), report_path)
    emit(as_json, report.to_dict(), _quantize_summary(report))


def _check_quantize_paths(model, output, calib, allocation, latency_file, profile, report_path, report_dir, sweep,
                          sweep_models) -> None:
    """Every file `quantize` writes against every file it reads (see onnxmpq.paths), before any work."""
    from onnxmpq.hardware.profiles import BUILTINS
    from onnxmpq.pipeline import sweep as sweeps
    from onnxmpq.report import html as report

    writes = {"--report": report_path, **paths.folder_files(report_dir, report.FILES, "--report-dir")}
    writes.update(sweeps.outputs(output, sweep, sweep_models) if sweep else {"-o/--output": output})
    profile_file = profile if profile and profile not in BUILTINS and Path(profile).exists() else None
    paths.check_writes(writes, {"model": model, "--calib": calib, "--allocation": allocation,
                                "--latency": latency_file, "--profile": profile_file})
    if report_dir is not None:
        paths.check_new_folder(report_dir)


def _float_ops_summary(float_ops) -> list[str]:
    """One line per reason the graph's other ops stay float, with how many and a few names."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in float_ops:
        by_reason.setdefault(reason, []).append(name)
    return [f"  float ops: {len(names)} x {reason} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for reason, names in by_reason.items()]


def _sweep_summary(frontier: dict) -> str:
    lines = [f"Pareto sweep of {frontier['kind']}: {len(frontier['points'])} points -> {frontier['json']}, "
             f"{frontier['plot']}",
             f"{'value':>8} {'avg W':>6} {'weight B':>10} {'BitOps':>10} {'drop':>7} {'KL':>8}  status"]
    for p in frontier["points"]:
        if "error" in p:
            lines.append(f"{p['value']:>8g} {'':>6} {'':>10} {'':>10} {'':>7} {'':>8}  {p['error']}")
        else:
            lines.append(f"{p['value']:>8g} {p['avg_weight_bits']:>6.2f} {p['weight_bytes']:>10,d} {p['bitops']:>10.3g} "
                         f"{p['drop']:>7.4f} {p['kl']:>8.4f}  {p['status']}")
    return "\n".join(lines)


def _quantize_summary(report) -> str:
    quantized = sum(1 for r in report.layers if r.weight_bits or r.act_bits)
    lines = [f"wrote {report.output}: {quantized}/{len(report.layers)} layers quantized, opset {report.opset}",
             f"  weights   {report.float_weight_bytes:>12,d} B float -> {report.weight_bytes:>10,d} B "
             f"({report.weight_bytes / max(report.float_weight_bytes, 1):.3f}x), avg {report.avg_weight_bits:.2f} bits",
             f"  file      {report.float_file_bytes:>12,d} B float -> {report.file_bytes:>10,d} B "
             f"({report.file_bytes / max(report.float_file_bytes, 1):.3f}x)",
             f"  BitOps    {report.bitops:.4g} per sample; {report.time_s:.1f} s"]
    if report.allocation:
        a = report.allocation
        lines.append(f"  chosen by {a['solver']} ({a['status']}), metric {a['metric']}, profile {a['profile']}: "
                     + ", ".join(f"{k} {v:.4g}" for k, v in a["costs"].items()))
    if report.verification and "error" in report.verification:
        lines.append(f"  not verified: {report.verification['error']}")
    elif report.verification:
        v = report.verification
        lines.append(f"  verified on {v['samples']} {'held-out' if v['held_out'] else 'calibration'} samples: "
                     f"agreement {v['agreement']:.4f} (drop {v['drop']:.4f}), SQNR {v['sqnr_db']:.1f} dB; "
                     f"latency {v['latency_ms']:.2f} ms (float {v['float_latency_ms']:.2f})"
                     + (f", predicted {v['predicted_latency_ms']:.2f}" if "predicted_latency_ms" in v else "")
                     + (f" ({v['predicted_latency_now_ms']:.2f} at this run's float speed)"
                        if "predicted_latency_now_ms" in v else ""))
        k = v["kernels"]
        lines.append(f"  kernels after onnxruntime's optimisation: {k['integer_compute']} integer, "
                     f"{k['float_compute']} float Conv/MatMul/Gemm")
    lines += [f"  note: {n}" for n in report.notes]
    lines += [f"  float: {n} ({r})" for n, r in report.skipped]
    lines += _float_ops_summary(report.float_ops)
    return "\n".join(lines)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Evaluation data (labels from an npz `labels` array or class folders).")
@click.option("--reference", type=click.Path(dir_okay=False), help="Float model to compare outputs with.")
@click.option("--limit", type=int, help="Use at most this many samples.")
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@preprocess_options
@quiet_option
def evaluate(model, data, reference, limit, batch_size, as_json, **kw):
    """Score MODEL on labelled data and/or against a reference model."""
    result = api.evaluate(model, data, reference, limit=limit, batch_size=batch_size,
                          preprocess=parse_preprocess(model, kw))
    out = result.to_dict()
    emit(as_json, out, "\n".join(f"{k:>10}: {v:.4f}" if isinstance(v, float) else f"{k:>10}: {v}"
                                 for k, v in out.items()))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@quiet_option
def inspect(model, as_json):
    """List MODEL's quantizable layers with their weight and activation bits."""
    info = api.inspect(model)
    width = max([len("layer")] + [len(l["name"]) for l in info["layers"]])  # names are ids: never cut
    rows = [f"{'layer':<{width}} {'op':<13} {'W':>3} {'A':>3} {'params':>10} {'MACs':>12} {'bytes':>10}"]
    rows += [f"{l['name']:<{width}} {l['op_type']:<13} {l['weight_bits'] or '-':>3} {l['act_bits'] or '-':>3} "
             f"{l['params']:>10,d} {l['macs']:>12,d} {l['weight_bytes']:>10,d}" for l in info["layers"]]
    rows.append(f"weight bytes {info['weight_bytes']:,d}; avg weight bits {info['avg_weight_bits']:.2f}")
    rows += [f"float: {s['name']} ({s['reason']})" for s in info["skipped"]]
    if not info["layers"]:
        rows.append("no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight, Gather on a "
                    "constant table) in the top-level graph" + ("; see the float lines above" if info["skipped"]
                                                               else ""))
    if info["tensors"]:
        widths = Counter(t["bits"] for t in info["tensors"])
        rows.append(f"quantized activation tensors {len(info['tensors'])} ("
                    + ", ".join(f"{n} at {b} bits" for b, n in sorted(widths.items()))
                    + f"), {info['requantizes']} requantize(s); `--json` lists them with scale and zero point")
    emit(as_json, info, "\n".join(rows))


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Evaluation data (with labels for top-1).")
@click.option("--limit", type=int, help="Use at most this many samples.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@preprocess_options
@quiet_option
def compare(reference, models, data, limit, as_json, **kw):
    """Table of size and accuracy of MODELS against the float REFERENCE."""
    pre = parse_preprocess(reference, kw)
    rows = api.compare(reference, list(models), data, limit=limit, preprocess=pre)
    header = f"{'model':<40} {'file bytes':>11} {'weight B':>10} {'avg W':>6} {'top1':>7} {'agree':>7} {'SQNR dB':>8}"
    lines = [header] + [
        f"{Path(r['model']).name[:40]:<40} {r['file_bytes']:>11,d} {r['weight_bytes']:>10,d} {r['avg_weight_bits']:>6.2f} "
        f"{_fmt(r.get('top1'))} {_fmt(r.get('agreement'))} {_fmt(r.get('sqnr_db'), 8, 1)}" for r in rows]
    emit(as_json, {"reference": reference, "samples": rows[0]["samples"], "models": rows}, "\n".join(lines))


def _fmt(value, width: int = 7, digits: int = 4) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


@cli.command()
@quiet_option
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", help="Calibration data (not needed for weight-entropy alone).")
@click.option("--metric", "metric_list", default="sqnr", show_default=True,
              help="Metric name(s), comma-separated: sqnr, kl, output-entropy, mutual-info, weight-entropy.")
@click.option("--bits", default="2,4,8", show_default=True, help="Candidate weight bits, comma-separated.")
@click.option("--act-bits", default="float", show_default=True,
              help="Candidate activation bits, comma-separated (float = activations unquantized).")
@click.option("--separate", is_flag=True, help="Probe weights (w{W}) and activations (a{A}) separately.")
@click.option("--rounding", type=click.Choice([m.value for m in Rounding]), default="auto", show_default=True,
              help="Rounding the probes use (the one the model will be written with; auto as in quantize).")
@click.option("--limit", type=int, default=256, show_default=True, help="Calibration samples to probe with.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per onnxruntime call.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the table(s) as JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of score per layer per candidate.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Workers (processes or Ray tasks).")
@click.option("--executor", type=click.Choice(["process", "ray"]), default="process", show_default=True,
              help="Where workers run: local processes, or Ray tasks (a running cluster via --address or "
                   "RAY_ADDRESS, else a local one).")
@click.option("--address", help="Ray cluster address for --executor ray (e.g. ray://head:10001).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), help="Reuse results across runs (a folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the table(s) as JSON on stdout.")
@preprocess_options
def sensitivity(model, calib, metric_list, bits, act_bits, separate, rounding, limit, batch_size, output, plot, workers,
                executor, address, cache_dir, as_json, **kw):
    """Per-layer sensitivity of MODEL: one probe per layer and candidate, the rest of the network float."""
    metrics = [m.strip() for m in metric_list.split(",") if m.strip()]
    if not metrics:
        raise OnnxmpqError("--metric names no metric.", "write e.g. --metric sqnr,kl.")
    weight_bits = [b for b in (_bits(v.strip(), "--bits") for v in bits.split(",")) if b]
    acts = [_bits(v.strip(), "--act-bits") for v in act_bits.split(",")]
    paths.check_writes({"-o/--output": output, "--plot": plot}, {"model": model, "--calib": calib})
    tables = api.sensitivity(model, calib, metrics=metrics, weight_bits=weight_bits, act_bits=acts,
                             separate=separate, rounding=rounding, limit=limit, batch_size=batch_size, workers=workers,
                             executor=executor, address=address, cache_dir=cache_dir,
                             preprocess=parse_preprocess(model, kw))
    data = [t.to_dict() for t in tables]
    payload = data[0] if len(data) == 1 else data
    if output:
        write_json(payload, output)
    if plot:
        from onnxmpq.report.plots import sensitivity_plot
        sensitivity_plot(tables, plot)
    emit(as_json, payload, "\n\n".join(_table_text(t) for t in tables))


def _table_text(table) -> str:
    keys = list(table.candidates)
    width = max([len("layer")] + [len(l.name) for l in table.layers])  # names are ids: never cut
    lines = [f"{table.metric} ({table.samples} samples, {table.time_s:.1f} s; larger = more sensitive)",
             f"{'layer':<{width}} " + " ".join(f"{k:>10}" for k in keys)]
    lines += [f"{l.name:<{width}} " + " ".join(f"{l.scores[k]:>10.4g}" if k in l.scores else f"{'-':>10}" for k in keys)
              for l in table.layers]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception, so `finally` blocks remove temporary files as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main(argv=None) -> int:
    """Runs the CLI; user errors print one line and exit 1 (2 for violated rules), never a traceback.
    SIGINT and SIGTERM stop the run with exit 130 / 143: outputs are renamed into place only when
    complete, so nothing partial or temporary is left."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    try:
        code = cli.main(args=argv, prog_name="onnxmpq", standalone_mode=False)
        return code if isinstance(code, int) else 0  # ctx.exit(2) (check's verdict) arrives as a return value
    except OnnxmpqError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 1
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        cause = exc if isinstance(exc, Interrupted) else exc.__cause__  # click wraps Ctrl-C in Abort
        signum = cause.signum if isinstance(cause, Interrupted) else signal.SIGINT
        click.echo(f"interrupted ({signal.Signals(signum).name}): no output was written", err=True)
        return 128 + signum


def entry() -> None:
    sys.exit(main())


from onnxmpq import cli_deploy  # noqa: E402,F401  (registers check, profiles, profile-latency, run)
