"""`onnxmpq quantize`: its options are the run configuration's fields (`onnxmpq.pipeline.config`), one
--help section per sub-config."""

from __future__ import annotations

from typing import Any

import click

from onnxmpq.cli.common import emit, preprocess, quiet_option
from onnxmpq.cli.options import GroupedCommand, config_options, given
from onnxmpq.pipeline import api, config
from onnxmpq.report.summary import Report

QUANTIZE_SECTIONS = ("data", "precision", "quantizers", "search", "sweep", "output", "preprocess")


@click.command(cls=GroupedCommand)
@click.argument("model", type=click.Path(dir_okay=False))
@config_options(QUANTIZE_SECTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@quiet_option
def quantize(model: str, as_json: bool, **kw: Any) -> None:
    """Quantize MODEL: uniform bits, per-layer bits by hand, or bits chosen under budgets and hardware rules."""
    cfg = config.build(model, given(kw))
    emit_result(as_json, execute(cfg))


def execute(cfg: config.QuantizeConfig) -> Report | dict:
    """Runs the config (`api.run`, which checks every path it reads and writes before any work)."""
    return api.run(cfg, preprocess(cfg.model, cfg.preprocess))


def emit_result(as_json: bool, result: Report | dict) -> None:
    if isinstance(result, Report):
        emit(as_json, result.to_dict(), _quantize_summary(result))
    else:
        emit(as_json, result, _sweep_summary(result))


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
             f"  BitOps    {report.bitops:.4g} per sample; {report.time_s:.1f} s"
             + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in report.stages.items()) + ")" if report.stages else "")]
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
