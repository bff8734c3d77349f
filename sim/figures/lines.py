"""Metric against a sweep axis, one line per run label (or per value of another column), the
mean over traces with min-max bars; the base of Figs. 11, 14 and 15.

``lines`` (generic)::

    figures:
      - {type: lines, x: policy.budget, metrics: [latency_ms_mean, attention_recall_mean]}

Options: ``x`` the sweep axis (dotted key, or its last part when unambiguous); ``metrics``
summary columns or step-derived metrics (:data:`sim.figures.common.STEP_METRICS`), one panel
each; ``hue`` the column that names the lines (default the run label; any other sweep axis
that varies splits lines further); ``where`` keeps the rows matching ``{column: value}``;
``x_percent`` shows a fraction axis in %; ``logx``; ``logy`` (true, or the metrics whose
panels get a log axis); ``show_traces`` adds each trace's own line (dotted); ``stem`` the
file name; ``title``.
Runs the x axis does not apply to (``full`` under ``policy.budget``) are drawn as dashed
horizontal references. Besides the PDF and PNG, ``<stem>.csv``/``.md`` hold the plotted
numbers (line, x, metric, mean, min, max, traces).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.common import (
    RUN,
    TRACE,
    axis_column,
    axis_label,
    check_metrics,
    colour,
    key_label,
    metric_label,
    one_row_per,
    require_metrics,
    require_rows,
    select,
    spread,
    varying_axes,
    with_step_metrics,
)
from sim.figures.style import COLUMN_IN, MARKERS, PAGE_IN, apply_style, save_figure


@FIGURES.register("lines")
@dataclass
class MetricLines(Figure):
    """A metric against a sweep axis, one line per run label; mean over traces, min-max bars."""

    x: str = ""
    metrics: list[str] = field(default_factory=lambda: ["latency_ms_mean"])
    hue: str = RUN
    where: dict[str, Any] = field(default_factory=dict)
    x_percent: bool = False
    logx: bool = False
    logy: bool | list[str] = False  # True: every panel; a list: those metrics' panels
    show_traces: bool = False
    stem: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.x, str) or not self.x:
            raise ValueError(f"{self.name}: give the sweep axis as x (e.g. x: policy.budget)")
        if isinstance(self.metrics, str):
            self.metrics = [self.metrics]
        if not self.metrics:
            raise ValueError(f"{self.name}: metrics is empty")
        check_metrics(self.metrics, self.name)
        if not isinstance(self.where, dict):
            raise ValueError(f"{self.name}: where must map columns to values")

    # -- data -------------------------------------------------------------------------------

    def table(self, results: Results) -> tuple[pd.DataFrame, str, list[str]]:
        """The plotted numbers (long format), the x column and the line-key columns."""
        table, x, keys, _ = self.data(results)
        return table, x, keys

    def data(self, results: Results) -> tuple[pd.DataFrame, str, list[str], pd.DataFrame]:
        """:meth:`table` plus the per-trace rows it aggregates (with a ``line`` column)."""
        frame = require_rows(results, self.name)
        if self.where:
            frame = select(frame, self.where, self.name, results)
        x = axis_column(results, self.x, self.name)
        hue = self.hue if self.hue == RUN else axis_column(results, self.hue, self.name)
        keys = [hue, *varying_axes(results, frame, exclude=[x, hue])]
        frame = with_step_metrics(results, frame, self.metrics)
        require_metrics(frame, self.metrics, self.name)
        one_row_per(frame, [*keys, x, TRACE], self.name,
                    "narrow them with the figure's 'where' option")
        frame = frame.assign(line=[key_label(v, keys) for v in frame[keys].itertuples(
            index=False, name=None)])
        parts = []
        for metric in self.metrics:
            stats = spread(frame, ["line", x], metric)
            stats.insert(2, "metric", metric)
            parts.append(stats)
        table = pd.concat(parts, ignore_index=True).rename(columns={x: "x"})
        return table, x, keys, frame

    # -- drawing ----------------------------------------------------------------------------

    def draw(self, results: Results) -> list[Path]:
        table, x, _, frame = self.data(results)
        stem = results.out_dir / (self.stem or self._default_stem(x))
        apply_style()
        n = len(self.metrics)
        width = COLUMN_IN if n == 1 else min(PAGE_IN, 0.5 * PAGE_IN * n)
        fig, axes = plt.subplots(1, n, figsize=(width, 2.3), squeeze=False)
        lines = list(dict.fromkeys(table["line"]))
        given = table["x"].dropna()
        categorical = bool(pd.to_numeric(given, errors="coerce").isna().any())
        scale = 100.0 if self.x_percent else 1.0
        max_traces = int(table["n_traces"].max())
        for ax, metric in zip(axes[0], self.metrics, strict=True):
            rows = table[table["metric"] == metric]
            ticks = [str(t) for t in dict.fromkeys(rows["x"].dropna())]
            for i, line in enumerate(lines):
                part = rows[rows["line"] == line]
                if part["mean"].isna().all():
                    continue
                if part["x"].isna().all():  # a run the axis does not apply to: a reference
                    ax.axhline(part["mean"].mean(), color=colour(i), ls="--", lw=0.9,
                               label=f"{line} (no {x.rsplit('.', 1)[-1]})")
                    continue
                part = part[part["x"].notna()]
                if not categorical:
                    part = part.sort_values("x", key=lambda v: pd.to_numeric(v))
                xs = ([ticks.index(str(v)) for v in part["x"]] if categorical
                      else pd.to_numeric(part["x"]).to_numpy() * scale)
                if self.show_traces:  # each trace's own line, thin and dotted
                    own = frame[(frame["line"] == line) & frame[x].notna()]
                    for _, one in own.groupby(TRACE, sort=False):
                        if not categorical:
                            one = one.sort_values(x, key=lambda v: pd.to_numeric(v))
                        tx = ([ticks.index(str(v)) for v in one[x]] if categorical
                              else pd.to_numeric(one[x]).to_numpy() * scale)
                        ax.plot(tx, one[metric], color=colour(i), lw=0.6, ls=":", alpha=0.8)
                err = np.vstack([part["mean"] - part["min"], part["max"] - part["mean"]])
                ax.errorbar(xs, part["mean"], yerr=err if max_traces > 1 else None,
                            color=colour(i), marker=MARKERS[i % len(MARKERS)],
                            ms=max(2.5, 5.0 - 0.6 * i), lw=1.0,  # coinciding lines stay visible
                            capsize=2, elinewidth=0.7, label=line)
            if categorical:
                ax.set_xticks(range(len(ticks)), ticks)
            else:
                values = np.unique(pd.to_numeric(rows["x"].dropna()).to_numpy() * scale)
                if self.logx:
                    ax.set_xscale("log", base=2)
                if len(values) <= 8:
                    ax.set_xticks(values, [f"{v:g}" for v in values])
            if self.logy is True or (isinstance(self.logy, list) and metric in self.logy):
                ax.set_yscale("log")
            ax.set_xlabel(axis_label(x, self.x_percent))
            ax.set_ylabel(metric_label(metric))
            ax.grid(alpha=0.3, lw=0.5)
        handles, labels = axes[0][0].get_legend_handles_labels()
        note = (f"mean over {max_traces} traces; bars: min-max" if max_traces > 1
                else "one trace")
        if self.show_traces and max_traces > 1:
            note += "; dotted: each trace"
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=min(len(labels), 6 if n > 1 else 3), frameon=False,
                   title=f"{self.title or results.name} ({note})", title_fontsize=7)
        fig.tight_layout()
        written = save_figure(fig, stem)
        return written + atomic_write_table(table, stem)

    def _default_stem(self, x: str) -> str:
        return self.name if self.name != "lines" else f"lines_{x.rsplit('.', 1)[-1]}"


@FIGURES.register("fig11_split_buffer")
@dataclass
class SplitBufferFigure(MetricLines):
    """DynaKV Fig. 11: KV transfer volume and forced-load entries against the delayed-split
    buffer size B_max (DynaKV's ``buffer_max``)."""

    x: str = "buffer_max"
    metrics: list[str] = field(
        default_factory=lambda: ["read_mb_per_token", "forced_load_entries_per_token"]
    )
    logx: bool = True
    show_traces: bool = True


@FIGURES.register("fig14_cache")
@dataclass
class CacheFigure(MetricLines):
    """DynaKV Fig. 14: DRAM use, per-token latency and cache misses against the cache ratio
    (``cache.capacity`` as a fraction of the KV cache), one line per replacement policy."""

    x: str = "cache.capacity"
    hue: str = "cache.replacement"
    metrics: list[str] = field(
        default_factory=lambda: ["peak_dram_mb", "latency_ms_mean", "misses_per_token"]
    )
    x_percent: bool = True
    logx: bool = True
    logy: bool | list[str] = field(default_factory=lambda: ["misses_per_token"])


@FIGURES.register("fig15_budget")
@dataclass
class BudgetFigure(MetricLines):
    """DynaKV Fig. 15: per-token latency against the selected fraction of the context."""

    x: str = "policy.budget"
    x_percent: bool = True
    logx: bool = True
