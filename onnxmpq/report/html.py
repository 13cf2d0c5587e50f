"""Report folders a person would rather look at than read: `report.json` plus a self-contained
`report.html` (plots embedded as base64 PNG, no external file or script):

- bits per layer along the network (weights and activations);
- sensitivity per layer and candidate, when the precision was chosen from a sensitivity table;
- the Pareto curve of weight bytes against the drop in agreement with the float model, the chosen
  point marked (a nearest-rounding sweep of average bits over the candidate widths, same table);
- a table of the layers: op, bits, parameters, MACs, stored bytes, types.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from onnxmpq import paths
from onnxmpq.report import plots
from onnxmpq.report.summary import frontier
from onnxmpq.write.save import write_json, write_text

FILES = ("report.json", "report.html")  # what write() puts in a report folder
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td.l{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.kv td{text-align:left}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}"""


def write(report_dict: dict, folder: paths.PathLike, figures: dict[str, bytes], stable: bool = False) -> Path:
    """Writes report.json and report.html into `folder` (created); `figures` maps titles to PNG bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(report_dict, folder / "report.json")
    page = render(report_dict, figures)
    write_text(page, folder / "report.html")
    return folder / "report.html"


def render(r: dict, figures: dict[str, bytes]) -> str:
    esc = html.escape
    summary = [("model", r["model"]), ("output", r["output"]),
               ("weights", f"{r['float_weight_bytes']:,} B float -> {r['weight_bytes']:,} B "
                           f"({r['weight_bytes'] / max(r['float_weight_bytes'], 1):.3f}x), avg {r['avg_weight_bits']:.2f} bits"),
               ("file", f"{r['float_file_bytes']:,} B -> {r['file_bytes']:,} B"), ("BitOps", f"{r['bitops']:.4g} per sample"),
               ("opset", r["opset"]), ("settings", json.dumps(r.get("settings", {})))]
    if r.get("allocation"):
        a = r["allocation"]
        summary += [("allocation", f"{a['solver']} ({a['status']}), metric {a['metric']}, profile {a['profile']}"),
                    ("budgets", ", ".join(f"{b['kind']}={b['value']:g}{'x' if b['relative'] else ''}"
                                          for b in a["budgets"]) or "none (max-drop search)"),
                    ("achieved", ", ".join(f"{k} {v:.4g}" for k, v in a["costs"].items()))]
    if r.get("stages"):
        summary.append(("stages", ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items())))
    if r.get("verification") and "error" in r["verification"]:
        summary.append(("verified", f"not verified: {r['verification']['error']}"))
    elif r.get("verification"):
        v = r["verification"]
        summary.append(("verified", f"{v['samples']} {'held-out' if v['held_out'] else 'calibration'} samples: "
                                    f"agreement {v['agreement']:.4f} (drop {v['drop']:.4f}), KL {v['kl']:.4g}, "
                                    f"SQNR {v['sqnr_db']:.1f} dB" +
                                    (f"; latency {v['latency_ms']:.2f} ms (float {v['float_latency_ms']:.2f})"
                                     if "latency_ms" in v else "")))
        if v.get("kernels"):
            summary.append(("kernels", f"{v['kernels']['integer_compute']} integer, {v['kernels']['float_compute']} "
                                       "float Conv/MatMul/Gemm after onnxruntime's load-time optimisation"))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>onnxmpq report</title>"
             f"<style>{STYLE}</style></head><body><h1>onnxmpq report: {esc(Path(r['model']).name)}</h1>",
             "<table class='kv'>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary)
             + "</table>"]
    for title, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Layers</h2><table><tr><th>#</th><th>layer</th><th>op</th><th>W</th><th>A</th><th>params</th>"
                 "<th>MACs</th><th>bytes</th><th>weight type</th><th>act type</th></tr>")
    for i, l in enumerate(r["layers"]):
        parts.append(f"<tr><td>{i}</td><td class='l'>{esc(l['name'])}</td><td class='l'>{esc(l['op_type'])}</td>"
                     f"<td>{l['weight_bits'] or 'float'}</td><td>{l['act_bits'] or 'float'}</td><td>{l['params']:,}</td>"
                     f"<td>{l['macs']:,}</td><td>{l['weight_bytes']:,}</td><td class='l'>{esc(l['weight_type'])}</td>"
                     f"<td class='l'>{esc(l['act_type'])}</td></tr>")
    parts.append("</table>")
    parts += _tensor_tables(r)
    if r.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in r["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _tensor_tables(r: dict) -> list[str]:
    """The units without weights, the quantized tensors and the ops left float, as HTML tables."""
    esc = html.escape
    parts = []
    if r.get("units"):
        parts.append("<h2>Units without weights</h2><table><tr><th>unit</th><th>op</th><th>A</th><th>MACs</th>"
                     "<th>integer kernel</th></tr>" + "".join(
                         f"<tr><td class='l'>{esc(u['name'])}</td><td class='l'>{esc(u['op_type'])}</td>"
                         f"<td>{u['act_bits'] or 'float'}</td><td>{u['macs']:,}</td>"
                         f"<td class='l'>{esc(u['kernel'] or 'none (float between DQ and Q)')}</td></tr>"
                         for u in r["units"]) + "</table>")
    if r.get("tensors"):
        parts.append("<h2>Quantized tensors</h2><table><tr><th>tensor</th><th>group</th><th>bits</th><th>type</th>"
                     "<th>scale</th><th>zero point</th><th>written by</th><th>requantized to</th></tr>" + "".join(
                         f"<tr><td class='l'>{esc(t['name'])}</td><td class='l'>{esc(t['group'])}</td>"
                         f"<td>{t['bits'] or 'float'}</td><td class='l'>{esc(t['type'])}</td>"
                         f"<td>{'' if t['scale'] is None else format(t['scale'], '.4g')}</td>"
                         f"<td>{'' if t['zero_point'] is None else t['zero_point']}</td>"
                         f"<td class='l'>{esc(t['source'] or 'graph input / float op')}</td>"
                         f"<td>{', '.join(map(str, t['requantized'])) or '-'}</td></tr>" for t in r["tensors"])
                     + "</table>")
    if r.get("float_ops"):
        parts.append("<h2>Ops left float</h2><table><tr><th>node</th><th>why</th></tr>" + "".join(
            f"<tr><td class='l'>{esc(f['name'])}</td><td class='l'>{esc(f['reason'])}</td></tr>"
            for f in r["float_ops"]) + "</table>")
    return parts


def png_of(draw, *args, **kwargs) -> bytes:
    """Runs a `plots` function that writes a PNG to a path, returning the bytes instead."""
    buffer = io.BytesIO()
    draw(*args, buffer, **kwargs)
    return buffer.getvalue()


def figures(report_dict: dict, chosen=None, pareto: Sequence[dict] = ()) -> dict[str, bytes]:
    """The report's plots: bits per layer; with a chosen allocation, its sensitivity table; with the
    `pareto` points the pipeline measured (`sweep.pareto_points`), their curve with the written model."""
    out = {"Bits per layer along the network": png_of(plots.bits_plot, report_dict["layers"])}
    if chosen is not None and chosen.table is not None:
        out[f"Sensitivity per layer and candidate ({chosen.table.metric})"] = png_of(plots.sensitivity_plot, [chosen.table])
    if pareto:
        verified = report_dict.get("verification") or {}
        mark = {"weight_bytes": report_dict["weight_bytes"], "drop": verified["drop"]} if "drop" in verified else None
        out["Pareto curve: weight bytes against drop in agreement with float"] = png_of(
            plots.pareto_plot, list(pareto), frontier(list(pareto)), title="nearest rounding; the star is the written model",
            chosen=mark)
    return out
