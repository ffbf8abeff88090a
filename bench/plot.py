"""PNG plots of benchmark results: grouped bars with the run-to-run spread.

matplotlib is imported only here and only when a plot is drawn, so the
benchmarks still run (tables only) where it is missing.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Series:
    """One competitor's bars: a median per group, with min and max for the error bar."""

    name: str
    medians: Sequence[float]
    lows: Sequence[float]
    highs: Sequence[float]


@dataclass(frozen=True)
class Panel:
    """One subplot: bar groups (e.g. store / warm load / cold load) and the series in them."""

    title: str
    groups: Sequence[str]
    series: Sequence[Series]


def grouped_bars(path: Path, title: str, panels: Sequence[Panel], ylabel: str,
                 log_y: bool = False) -> Path | None:
    """Draw panels side by side into ``path``; None (with a note) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot {path.name}", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        width = 0.8 / max(1, len(panel.series))
        for i, s in enumerate(panel.series):
            xs = [g + (i - (len(panel.series) - 1) / 2) * width for g in range(len(panel.groups))]
            shown = [(x, m, m - lo, hi - m) for x, m, lo, hi in
                     zip(xs, s.medians, s.lows, s.highs) if not math.isnan(m)]
            if not shown:
                continue
            x, m, down, up = zip(*shown)
            ax.bar(x, m, width, yerr=[down, up], capsize=2, label=s.name)
        ax.set_xticks(range(len(panel.groups)), panel.groups)
        ax.set_title(panel.title)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title)
    # Room below the panels for the shared legend, one row per four series.
    fig.tight_layout(rect=(0, 0.06 * -(-len(labels) // 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
    return path
