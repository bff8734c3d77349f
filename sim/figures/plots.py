"""An experiment's plots: the default accuracy-vs-latency overview and its ``figures:``.

``kvsim run`` draws them after the runs and ``kvsim plot`` redraws them, from the results
directory alone (:func:`plot_results`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sim.figures.base import Results, draw_figures
from sim.figures.style import MARKERS, OKABE_ITO, PAGE_IN, apply_style, plt, save_figure
from sim.result_files import DEFAULT_PLOT


def accuracy_vs_latency(summary: pd.DataFrame, stem: Path, title: str = "") -> list[Path]:
    """Left: mean attention recall against mean per-token latency, one marker per run (bars:
    p50-p99 latency). Right: the per-token latency breakdown of each run."""
    apply_style()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(PAGE_IN, 2.6),
                                 gridspec_kw={"width_ratios": [1.1, 1]})
    for i, row in enumerate(summary.itertuples(index=False)):
        colour, marker = OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]
        ax.errorbar(
            row.latency_ms_mean,
            row.attention_recall_mean,
            xerr=[
                [max(0.0, row.latency_ms_mean - row.latency_ms_p50)],
                [max(0.0, row.latency_ms_p99 - row.latency_ms_mean)],
            ],
            fmt=marker,
            color=colour,
            ms=5,
            capsize=2,
            lw=0.8,
            label=row.run,
        )
    ax.set_xlabel("per-token decode latency (ms; bars to p99)")
    ax.set_ylabel("attention recall (share of mass)")
    ax.set_ylim(top=1.02)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(loc="lower right", frameon=False)
    parts = (
        ("dense_ms", "dense", "#999999"),
        ("scoring_ms", "index scoring", "#56B4E9"),
        ("io_wait_ms", "flash I/O wait", "#D55E00"),
        ("attention_ms", "attention", "#009E73"),
    )
    bottom = pd.Series(0.0, index=summary.index)
    for column, name, colour in parts:
        bx.bar(summary["run"], summary[column], bottom=bottom, color=colour, label=name, width=0.6)
        bottom = bottom + summary[column]
    bx.set_ylabel("per-token latency (ms)")
    bx.tick_params(axis="x", rotation=20)
    bx.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)


def _point_label(row: pd.Series, axes: list[str]) -> str:
    """``budget=0.05, device=ufs31-phone``: each axis by the last part of its dotted key."""
    return ", ".join(f"{axis.rsplit('.', 1)[-1]}={row[axis]}" for axis in axes)


def plot_results(results_dir: Path) -> list[Path]:
    """Redraw an experiment's plots from its results directory: the accuracy-vs-latency
    overview (unless the experiment says ``plot: false``) and every entry of ``figures:``. A
    closed-loop experiment has no overview (no latency), only its ``figures:``."""
    results = Results.load(results_dir)
    written: list[Path] = []
    closed_loop = "closed_loop" in results.experiment
    if not closed_loop and results.experiment.get("plot", True) and not results.summary.empty:
        summary = results.summary.copy()
        if results.axes:  # one marker per run and sweep point
            summary["run"] = [
                f"{row['run']} ({_point_label(row, results.axes)})" for _, row in summary.iterrows()
            ]
        written += accuracy_vs_latency(summary, results.dir / DEFAULT_PLOT, results.name)
    written += draw_figures(results, results.experiment.get("figures") or [])
    return written
