"""The measuring commands: evaluate, inspect, compare, sensitivity."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from onnxmpq import paths
from onnxmpq.cli.common import emit, preprocess_of, quiet_option, widths
from onnxmpq.cli.options import GroupedCommand, config_options
from onnxmpq.errors import OnnxmpqError
from onnxmpq.pipeline import api
from onnxmpq.report.plots import sensitivity_plot
from onnxmpq.sensitivity import METRICS
from onnxmpq.types import Probes, Rounding
from onnxmpq.write.save import write_json


@click.command(cls=GroupedCommand)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Evaluation data (labels from an npz `labels` array or class folders).")
@click.option("--reference", type=click.Path(dir_okay=False), help="Float model to compare outputs with.")
@click.option("--limit", type=int, help="Use at most this many samples.")
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@config_options(["preprocess"])
@quiet_option
def evaluate(model, data, reference, limit, batch_size, as_json, **kw):
    """Score MODEL on labelled data and/or against a reference model."""
    result = api.evaluate(model, data, reference, limit=limit, batch_size=batch_size,
                          preprocess=preprocess_of(model, kw))
    out = result.to_dict()
    emit(as_json, out, "\n".join(f"{k:>10}: {v:.4f}" if isinstance(v, float) else f"{k:>10}: {v}"
                                 for k, v in out.items()))


@click.command(cls=GroupedCommand)
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


@click.command(cls=GroupedCommand)
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Evaluation data (with labels for top-1).")
@click.option("--limit", type=int, help="Use at most this many samples.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@config_options(["preprocess"])
@quiet_option
def compare(reference, models, data, limit, as_json, **kw):
    """Table of size and accuracy of MODELS against the float REFERENCE."""
    pre = preprocess_of(reference, kw)
    rows = api.compare(reference, list(models), data, limit=limit, preprocess=pre)
    header = f"{'model':<40} {'file bytes':>11} {'weight B':>10} {'avg W':>6} {'top1':>7} {'agree':>7} {'SQNR dB':>8}"
    lines = [header] + [
        f"{Path(r['model']).name[:40]:<40} {r['file_bytes']:>11,d} {r['weight_bytes']:>10,d} {r['avg_weight_bits']:>6.2f} "
        f"{_fmt(r.get('top1'))} {_fmt(r.get('agreement'))} {_fmt(r.get('sqnr_db'), 8, 1)}" for r in rows]
    emit(as_json, {"reference": reference, "samples": rows[0]["samples"], "models": rows}, "\n".join(lines))


def _fmt(value, width: int = 7, digits: int = 4) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


@click.command(cls=GroupedCommand)
@quiet_option
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", help="Calibration data (not needed for weight-entropy alone).")
@click.option("--metric", "metric_list", default="sqnr", show_default=True,
              help="Metric name(s), comma-separated: " + ", ".join(sorted(METRICS)) + ".")
@click.option("--bits", default="2,4,8", show_default=True, help="Candidate weight bits, comma-separated.")
@click.option("--act-bits", default="float", show_default=True,
              help="Candidate activation bits, comma-separated (float = activations unquantized).")
@click.option("--separate", is_flag=True, help="Probe weights (w{W}) and activations (a{A}) separately.")
@click.option("--rounding", type=click.Choice([m.value for m in Rounding]), default="nearest", show_default=True,
              help="Rounding the probes use: nearest, as quantize's probes by default (--probe-rounding), or "
                   "gptq, or auto (gptq below 8 bits, as quantize writes the model).")
@click.option("--limit", type=int, default=256, show_default=True,
              help="Calibration samples to probe with (fast probes rounded to nearest: the first 128 of them).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Samples per onnxruntime call.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the table(s) as JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of score per layer per candidate.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Workers (processes or Ray tasks).")
@click.option("--executor", type=click.Choice(["process", "ray"]), default="process", show_default=True,
              help="Where workers run: local processes, or Ray tasks (a running cluster via --address or "
                   "RAY_ADDRESS, else a local one).")
@click.option("--address", help="Ray cluster address for --executor ray (e.g. ray://head:10001).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), help="Reuse results across runs (a folder).")
@click.option("--probes", type=click.Choice([m.value for m in Probes]),
              help="Exact (one network run per layer and candidate) or fast (one run per layer with noise, scaled "
                   "by each candidate's own output error; sqnr and kl only) [default: fast where every metric "
                   "allows, else exact; BENCHMARKS.md compares them].")
@click.option("--json", "as_json", is_flag=True, help="Print the table(s) as JSON on stdout.")
@config_options(["preprocess"])
def sensitivity(model, calib, metric_list, bits, act_bits, separate, rounding, limit, batch_size, output, plot, workers,
                executor, address, cache_dir, probes, as_json, **kw):
    """Per-layer sensitivity of MODEL: each layer quantized alone at each candidate, the rest of the network float."""
    metrics = [m.strip() for m in metric_list.split(",") if m.strip()]
    if not metrics:
        raise OnnxmpqError("--metric names no metric.", "write e.g. --metric sqnr,kl.")
    weight_bits = [b for b in widths(bits, "--bits") if b]
    acts = widths(act_bits, "--act-bits")
    paths.check_writes({"-o/--output": output, "--plot": plot}, {"model": model, "--calib": calib})
    tables = api.sensitivity(model, calib, metrics=metrics, weight_bits=weight_bits, act_bits=acts,
                             separate=separate, rounding=rounding, limit=limit, batch_size=batch_size, workers=workers,
                             executor=executor, address=address, cache_dir=cache_dir, probes=probes,
                             preprocess=preprocess_of(model, kw))
    data = [t.to_dict() for t in tables]
    payload = data[0] if len(data) == 1 else data
    if output:
        write_json(payload, output)
    if plot:
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
