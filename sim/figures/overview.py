"""DynaKV Fig. 10: normalised accuracy, per-token latency and effective bandwidth of every
policy, grouped by trace (model x text), with the average over traces.

Normalised accuracy = the run's attention recall (option ``accuracy``; by default
``retrieval_recall_mean``, the recall over the layers the policy decides, which leaves out a
model's own sliding-window layers, or ``attention_recall_mean`` in older results) / the
baseline's on the same trace (option ``baseline``, default ``token_topk``: the no-cluster,
token-level top-k upper bound), which must use the same budget. ``points`` picks the sweep
point each run is shown at when the experiment runs every policy at several, e.g.
``{default: {cache.replacement: lru}, dynakv: {cache.replacement: cluster_aligned}}``;
``runs`` orders or restricts the bars; ``references`` (default ``[full]``) are drawn as
dashed lines across each group instead of bars. Writes ``fig10_overview.{pdf,png}`` and the
numbers as ``fig10_overview.{csv,md}`` (one row per run and trace, then one ``average`` row
per run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.common import (
    RUN,
    TRACE,
    bar_offsets,
    baseline_rows,
    colour,
    hatch,
    metric_label,
    one_row_per,
    pick_points,
    require_metrics,
    require_rows,
    run_order,
    trace_names,
)
from sim.figures.style import PAGE_IN, apply_style, save_figure

AVERAGE = "average"
REFERENCE_COLOURS = ("black", "#999999")


def policy_budget(results: Results, run_id: str) -> Any:
    """The run's policy budget as configured (None for policies without one)."""
    return (results.settings(run_id).get("policy") or {}).get("budget")


@FIGURES.register("fig10_overview")
@dataclass
class OverviewFigure(Figure):
    """Normalised accuracy, latency and effective bandwidth per policy and trace (Fig. 10)."""

    baseline: str = "token_topk"
    accuracy: str = ""  # "": retrieval_recall_mean if the summary has it, else attention recall
    points: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=lambda: ["full"])
    stem: str = "fig10_overview"

    def __post_init__(self) -> None:
        if not isinstance(self.points, dict) or not all(
            isinstance(v, dict) for v in self.points.values()
        ):
            raise ValueError(f"{self.name}: points maps run labels (or 'default') to "
                             "{column: value}")

    def accuracy_column(self, frame: pd.DataFrame) -> str:
        if self.accuracy:
            return self.accuracy
        return ("retrieval_recall_mean" if "retrieval_recall_mean" in frame
                else "attention_recall_mean")

    def table(self, results: Results) -> pd.DataFrame:
        frame = require_rows(results, self.name)
        accuracy = self.accuracy_column(frame)
        metrics = [accuracy, "latency_ms_mean", "effective_bandwidth_mb_s"]
        require_metrics(frame, metrics, self.name)
        frame = pick_points(frame, self.points, self.name, results)
        one_row_per(frame, [RUN, TRACE], self.name,
                    "pick one sweep point per run with the figure's 'points' option")
        base = baseline_rows(frame, self.baseline, self.name, "normalise accuracy by")
        base_budget = {policy_budget(results, r) for r in base["run_id"]}
        for row in frame.itertuples(index=False):
            budget = policy_budget(results, row.run_id)
            if budget is not None and budget not in base_budget:
                raise KvsimError(
                    f"{self.name}: run {row.run} has budget {budget} but {self.baseline} has "
                    f"{', '.join(map(str, base_budget))}; normalisation needs the same budget"
                )
        by_trace = base.set_index(TRACE)[accuracy]
        missing = sorted(set(frame[TRACE]) - set(by_trace.index))
        if missing:
            raise KvsimError(f"{self.name}: no {self.baseline} run on trace {missing[0]}")
        order = run_order(frame, self.runs, self.name)
        frame = frame[frame[RUN].astype(str).isin(order)]
        out = pd.DataFrame({
            RUN: frame[RUN].astype(str),
            TRACE: frame[TRACE],
            accuracy: frame[accuracy],
            f"baseline_{accuracy}": frame[TRACE].map(by_trace),
        })
        out["normalised_accuracy"] = out[accuracy] / out[f"baseline_{accuracy}"]
        out["latency_ms_mean"] = frame["latency_ms_mean"]
        out["effective_bandwidth_mb_s"] = frame["effective_bandwidth_mb_s"]
        out["order"] = out[RUN].map({r: i for i, r in enumerate(order)})
        out = out.sort_values(["order", TRACE], kind="stable").drop(columns="order")
        average = out.groupby(RUN, sort=False).mean(numeric_only=True).reset_index()
        average.insert(1, TRACE, AVERAGE)
        return pd.concat([out, average], ignore_index=True)

    def draw(self, results: Results) -> list[Path]:
        table = self.table(results)
        stem = results.out_dir / self.stem
        runs = [r for r in dict.fromkeys(table[RUN]) if r not in self.references]
        references = [r for r in dict.fromkeys(table[RUN]) if r in self.references]
        traces = [t for t in dict.fromkeys(table[TRACE]) if t != AVERAGE]
        names = trace_names(traces)
        groups = [*traces, AVERAGE]
        offsets, width = bar_offsets(len(runs))
        span = (offsets[0] - width / 2, offsets[-1] + width / 2) if runs else (-0.4, 0.4)
        apply_style()
        panels = (
            ("normalised_accuracy",
             f"normalised accuracy\n(recall / {self.baseline}'s)"),
            ("latency_ms_mean", metric_label("latency_ms_mean").replace(" (", "\n(")),
            ("effective_bandwidth_mb_s", "effective bandwidth\n(MB/s)"),
        )
        fig, axes = plt.subplots(3, 1, figsize=(PAGE_IN, 5.2), sharex=True)
        per_trace = table[table[TRACE] != AVERAGE]
        for ax, (metric, label) in zip(axes, panels, strict=True):
            for i, run in enumerate(runs):
                rows = per_trace[per_trace[RUN] == run].set_index(TRACE)[metric]
                values = [rows.get(t, np.nan) for t in traces]
                present = [v for v in values if np.isfinite(v)]
                mean = np.mean(present) if present else np.nan
                heights = [*values, mean]
                xs = np.arange(len(groups)) + offsets[i]
                label_i = f"{run} (baseline)" if run == self.baseline else run
                ax.bar(xs, heights, width, color=colour(i), hatch=hatch(i),
                       edgecolor="white" if hatch(i) else None, lw=0.3, label=label_i)
                if len(present) > 1:
                    ax.errorbar(xs[-1], mean, yerr=[[mean - min(present)], [max(present) - mean]],
                                color="black", lw=0.7, capsize=1.5)
            for j, run in enumerate(references):  # a dashed segment across each group
                rows = per_trace[per_trace[RUN] == run].set_index(TRACE)[metric]
                values = [rows.get(t, np.nan) for t in traces]
                present = [v for v in values if np.isfinite(v)]
                for g, value in enumerate([*values, np.mean(present) if present else np.nan]):
                    ax.hlines(value, g + span[0], g + span[1], colors=REFERENCE_COLOURS[j % 2],
                              linestyles="--", lw=1.0,
                              label=f"{run} (reference)" if g == 0 else None)
            if metric == "normalised_accuracy":
                ax.axhline(1.0, color="grey", lw=0.5, ls=":")
            ax.axvline(len(traces) - 0.5, color="grey", lw=0.5, ls=":")
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3, lw=0.5)
        axes[-1].set_xticks(range(len(groups)),
                            [names[t].replace("/", "\n") for t in traces]
                            + [f"average of {len(traces)}\n(bars: min-max)"])
        axes[-1].set_xlabel("trace (model / text)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=min(len(labels), 6), frameon=False,
                   title=f"{results.name}: accuracy normalised by {self.baseline} "
                         "(token-level top-k, the no-cluster upper bound) at the same budget",
                   title_fontsize=7)
        fig.tight_layout()
        return save_figure(fig, stem) + atomic_write_table(table, stem)
