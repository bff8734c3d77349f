"""Metric against a sweep axis, one line per run label (or per value of another column), the
mean over traces with min-max bars; the base of Figs. 11, 14 and 15.

``lines`` (generic)::

    figures:
      - {type: lines, x: policy.budget, metrics: [latency_ms_mean, attention_recall_mean]}

Options: ``x`` the sweep axis (dotted key, or its last part when unambiguous); ``metrics``
summary columns or step-derived metrics (:data:`sim.figures.common.STEP_METRICS`), one panel
each; ``hue`` the column that names the lines (default the run label; any other sweep axis
that varies splits lines further); ``panels`` a sweep axis whose values each get their own
column of panels (one row per metric; e.g. ``panels: model`` for latency against decode length
per simulated model, or ``panels: decode_steps`` to set two decode lengths side by side, which
would otherwise be averaged as traces); ``where`` keeps the rows matching ``{column: value}``;
``x_percent`` shows a fraction axis in %; ``logx``; ``logy`` (true, or the metrics whose
panels get a log axis); ``show_traces`` adds each trace's own line (dotted); ``stem`` the
file name; ``title``.
Runs the x axis does not apply to (``full`` under ``policy.budget``) are drawn as dashed
horizontal references; a run the ``panels`` axis does not apply to appears in every panel, and
an axis whose value the panel fixes (zipped with it) does not split lines.
Besides the PDF and PNG, ``<stem>.csv``/``.md`` hold the plotted numbers (line, with
``panels`` the panel's value, x, metric, mean, min, max, traces).
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
    short,
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
    panels: str = ""
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
        if not isinstance(self.panels, str):
            raise ValueError(f"{self.name}: panels must name one sweep axis")
        if self.panels and self.panels in (self.x, self.hue):
            raise ValueError(f"{self.name}: panels and {'x' if self.panels == self.x else 'hue'}"
                             f" are the same axis ({self.panels})")

    # -- data -------------------------------------------------------------------------------

    def table(self, results: Results) -> tuple[pd.DataFrame, str, list[str]]:
        """The plotted numbers (long format), the x column and the line-key columns."""
        table, x, keys, _ = self.data(results)
        return table, x, keys

    def data(self, results: Results) -> tuple[pd.DataFrame, str, list[str], pd.DataFrame]:
        """:meth:`table` plus the per-trace rows it aggregates (with a ``line`` column and,
        with ``panels``, a ``panel`` column)."""
        frame = require_rows(results, self.name)
        if self.where:
            frame = select(frame, self.where, self.name, results)
        x = axis_column(results, self.x, self.name)
        hue = self.hue if self.hue == RUN else axis_column(results, self.hue, self.name)
        panel = axis_column(results, self.panels, self.name) if self.panels else ""
        if panel in (x, hue):
            raise KvsimError(f"{self.name}: panels and x or hue are the same axis ({panel})")
        keys = [hue, *varying_axes(results, frame, exclude=[x, hue, panel])]
        if panel:  # an axis the panel's value fixes (zipped with it) does not split lines
            keys = [hue, *(k for k in keys[1:] if frame.groupby(panel, dropna=False)[k].nunique(
                dropna=False).max() > 1)]
        frame = with_step_metrics(results, frame, self.metrics)
        require_metrics(frame, self.metrics, self.name)
        frame = _in_every_panel(frame, panel, self.name) if panel else frame.assign(panel="")
        one_row_per(frame, [*keys, "panel", x, TRACE], self.name,
                    "narrow them with the figure's 'where' option")
        frame = frame.assign(line=[key_label(v, keys) for v in frame[keys].itertuples(
            index=False, name=None)])
        parts = []
        for metric in self.metrics:
            stats = spread(frame, ["line", "panel", x], metric)
            stats.insert(3, "metric", metric)
            parts.append(stats)
        table = pd.concat(parts, ignore_index=True).rename(columns={x: "x"})
        if not panel:
            table = table.drop(columns="panel")
        return table, x, keys, frame

    # -- drawing ----------------------------------------------------------------------------

    def draw(self, results: Results) -> list[Path]:
        table, x, _, frame = self.data(results)
        stem = results.out_dir / (self.stem or self._default_stem(x))
        apply_style()
        n = len(self.metrics)
        if "panel" in table:  # one column of panels per value, one row per metric
            values = list(dict.fromkeys(table["panel"]))
            fig, axes = plt.subplots(n, len(values), squeeze=False, figsize=(
                min(PAGE_IN, max(COLUMN_IN, 0.34 * PAGE_IN * len(values))), 2.1 * n + 0.2))
            cells = [(axes[r][c], metric, value) for r, metric in enumerate(self.metrics)
                     for c, value in enumerate(values)]
        else:
            width = COLUMN_IN if n == 1 else min(PAGE_IN, 0.5 * PAGE_IN * n)
            fig, axes = plt.subplots(1, n, figsize=(width, 2.3), squeeze=False)
            cells = [(axes[0][i], metric, None) for i, metric in enumerate(self.metrics)]
        lines = list(dict.fromkeys(table["line"]))  # one colour per line in every panel
        given = table["x"].dropna()
        categorical = bool(pd.to_numeric(given, errors="coerce").isna().any())
        max_traces = int(table["n_traces"].max())
        for ax, metric, value in cells:
            rows = table[table["metric"] == metric]
            own = frame
            if value is not None:
                rows, own = rows[rows["panel"] == value], frame[frame["panel"] == value]
                ax.set_title(f"{short(self.panels)} = {value}")
            self._draw_axes(ax, rows, own, metric, lines, x, categorical, max_traces)
        handles: dict[str, Any] = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        note = (f"mean over {max_traces} traces; bars: min-max" if max_traces > 1
                else "one trace")
        if self.show_traces and max_traces > 1:
            note += "; dotted: each trace"
        fig.legend(list(handles.values()), list(handles), loc="lower center",
                   bbox_to_anchor=(0.5, 1.0),
                   ncol=min(len(handles), 6 if len(cells) > 1 else 3), frameon=False,
                   title=f"{self.title or results.name} ({note})", title_fontsize=7)
        fig.tight_layout()
        written = save_figure(fig, stem)
        return written + atomic_write_table(table, stem)

    def _draw_axes(self, ax: Any, rows: pd.DataFrame, frame: pd.DataFrame, metric: str,
                   lines: list[str], x: str, categorical: bool, max_traces: int) -> None:
        """One panel: ``metric`` of every line against x (``rows``: the table's; ``frame``:
        the per-trace rows, for ``show_traces``)."""
        scale = 100.0 if self.x_percent else 1.0
        ticks = [str(t) for t in dict.fromkeys(rows["x"].dropna())]
        for i, line in enumerate(lines):
            part = rows[rows["line"] == line]
            if part.empty or part["mean"].isna().all():
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

    def _default_stem(self, x: str) -> str:
        return self.name if self.name != "lines" else f"lines_{x.rsplit('.', 1)[-1]}"


def _in_every_panel(frame: pd.DataFrame, panel: str, figure: str) -> pd.DataFrame:
    """``frame`` with a ``panel`` column (the value of the ``panels`` axis); a row the axis does
    not apply to (empty cell) is repeated in every panel, as ``where`` treats it."""
    values = [v for v in dict.fromkeys(frame[panel]) if pd.notna(v)]
    if not values:
        raise KvsimError(f"{figure}: no run has a value of the panels axis {panel!r}")
    missing = frame[panel].isna()
    parts = [frame[~missing].assign(panel=frame.loc[~missing, panel])]
    parts += [frame[missing].assign(panel=value) for value in values if missing.any()]
    return pd.concat(parts, ignore_index=True)


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
