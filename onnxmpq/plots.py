"""Plots for reports (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from onnxmpq.types import SensitivityTable


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
    fig.savefig(str(path), dpi=110, format="png")
    plt.close(fig)
