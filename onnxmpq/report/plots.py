"""Plots for reports (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from onnxmpq.types import SensitivityTable
from onnxmpq.write.save import write_bytes


def _save(fig, path) -> None:
    """PNG into a file object, or atomically into a file (write.save.write_bytes: no fixed temporary name)."""
    if hasattr(path, "write"):
        fig.savefig(path, dpi=110, format="png")
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    write_bytes(buffer.getvalue(), path)


def sensitivity_plot(tables: Sequence[SensitivityTable], path: str | Path) -> None:
    """Score per layer (network order) per candidate, one panel per metric, log scale where positive."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(max(8, 0.3 * len(tables[0].layers)), 3.2 * len(tables)),
                             squeeze=False)
    for ax, table in zip(axes[:, 0], tables):
        x = range(len(table.layers))
        for key in table.candidates:
            ax.plot(x, [layer.scores[key] for layer in table.layers], marker="o", markersize=3, label=key)
        if all(layer.scores[k] > 0 for layer in table.layers for k in table.candidates):
            ax.set_yscale("log")
        ax.set_title(f"{table.metric} (larger = more sensitive)")
        ax.set_xticks(list(x))
        ax.set_xticklabels([layer.name for layer in table.layers], rotation=90, fontsize=6)
        ax.legend(fontsize=7, ncol=min(6, len(table.candidates)))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pareto_plot(points: Sequence[dict], front: Sequence[int], path: str | Path, title: str,
                chosen: dict | None = None) -> None:
    """Weight bytes against fidelity drop for every sweep point, the frontier joined, `chosen` marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = [p for p in points if "error" not in p]
    ax.scatter([p["weight_bytes"] / 1e3 for p in ok], [100 * p["drop"] for p in ok], s=18, color="0.6",
               label="allocations")
    line = sorted((points[i] for i in front), key=lambda p: p["weight_bytes"])
    ax.plot([p["weight_bytes"] / 1e3 for p in line], [100 * p["drop"] for p in line], "o-", color="C0",
            label="Pareto frontier")
    for p in line:
        ax.annotate(f"{p['avg_weight_bits']:.2g}b", (p["weight_bytes"] / 1e3, 100 * p["drop"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if chosen is not None:
        ax.scatter([chosen["weight_bytes"] / 1e3], [100 * chosen["drop"]], s=120, marker="*", color="C3",
                   zorder=5, label="chosen")
    ax.set_xlabel("weight bytes (KB)")
    ax.set_ylabel("drop in top-1 agreement with float (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def bits_plot(layers: Sequence[dict], path: str | Path, title: str = "bits per layer") -> None:
    """Weight and activation bits of every layer along the network (float drawn at 32)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(layers)), 3.4))
    x = range(len(layers))
    ax.bar([i - 0.2 for i in x], [l.get("weight_bits") or 32 for l in layers], width=0.4, label="weights")
    ax.bar([i + 0.2 for i in x], [l.get("act_bits") or 32 for l in layers], width=0.4, label="activations")
    ax.set_yscale("log", base=2)
    ax.set_yticks([2, 4, 8, 16, 32])
    ax.set_yticklabels(["2", "4", "8", "16", "float"])
    ax.set_xticks(list(x))
    ax.set_xticklabels([l["name"] for l in layers], rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
