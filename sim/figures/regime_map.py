"""Where a method's claims hold: its latency speedup and accuracy difference over each baseline,
as heat maps over two sweep axes (a figure none of the papers has).

``regime_map``::

    figures:
      - {type: regime_map, x: trace.decode_from, y: cache.capacity,
         target: dynakv, baselines: [static_clusters, clusterkv]}

One row of panels per baseline; the left panel is the speedup ``baseline latency / target
latency`` (above 1: the target is faster), the right one the accuracy difference ``target -
baseline`` (above 0: the target is more accurate). A cell pairs the target's and the baseline's
results on the same trace and at the same (x, y) point, and shows the mean over traces (the
replicate axis, e.g. two texts); the table beside the figure also gives the min and max over
traces and their count.

Options: ``x``, ``y`` sweep axes (dotted keys, or their last parts when unambiguous; trace axes
such as ``trace.decode_from`` are allowed); ``target`` and ``baselines`` run labels (or policy
names, as ``fig10_overview``'s baseline); ``latency`` and ``accuracy`` summary columns (default
``latency_ms_mean``, ``retrieval_recall_mean``); ``where`` keeps the rows matching
``{column: value}``; ``x_percent`` / ``y_percent`` show fraction axes in %; ``stem``; ``title``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm

from sim.errors import KvsimError
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.common import (
    TRACE,
    axis_column,
    axis_label,
    baseline_rows,
    check_metrics,
    metric_label,
    one_row_per,
    require_metrics,
    require_rows,
    select,
)
from sim.figures.style import PAGE_IN, apply_style, save_figure

SPEEDUP = "speedup"
ACCURACY_DIFF = "accuracy_diff"


@FIGURES.register("regime_map")
@dataclass
class RegimeMap(Figure):
    """Speedup and accuracy difference of ``target`` over each baseline on an (x, y) grid."""

    x: str = ""
    y: str = ""
    target: str = "dynakv"
    baselines: list[str] = field(default_factory=lambda: ["static_clusters", "clusterkv"])
    latency: str = "latency_ms_mean"
    accuracy: str = "retrieval_recall_mean"
    where: dict[str, Any] = field(default_factory=dict)
    x_percent: bool = False
    y_percent: bool = False
    stem: str = "regime_map"
    title: str = ""

    def __post_init__(self) -> None:
        for name in ("x", "y"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{self.name}: give the sweep axis {name} (e.g. {name}: "
                                 f"{'trace.decode_from' if name == 'x' else 'cache.capacity'})")
        if self.x == self.y:
            raise ValueError(f"{self.name}: x and y are the same axis ({self.x})")
        if isinstance(self.baselines, str):
            self.baselines = [self.baselines]
        if not self.baselines:
            raise ValueError(f"{self.name}: baselines is empty")
        if self.target in self.baselines:
            raise ValueError(f"{self.name}: target {self.target!r} is also a baseline")
        check_metrics([self.latency, self.accuracy], self.name)
        if not isinstance(self.where, dict):
            raise ValueError(f"{self.name}: where must map columns to values")

    # -- data -------------------------------------------------------------------------------

    def table(self, results: Results) -> pd.DataFrame:
        """One row per (baseline, x, y): mean, min and max over traces of the speedup and the
        accuracy difference, and the number of traces paired."""
        frame = require_rows(results, self.name)
        if self.where:
            frame = select(frame, self.where, self.name, results)
        x = axis_column(results, self.x, self.name)
        y = axis_column(results, self.y, self.name)
        require_metrics(frame, [self.latency, self.accuracy], self.name)
        keys = [x, y, TRACE]
        target = baseline_rows(frame, self.target, self.name, "compare")
        one_row_per(target, keys, self.name, "narrow them with the figure's 'where' option")
        target = target[[*keys, self.latency, self.accuracy]]
        parts = []
        for baseline in self.baselines:
            base = baseline_rows(frame, baseline, self.name, "compare against")
            one_row_per(base, keys, self.name, "narrow them with the figure's 'where' option")
            paired = target.merge(base[[*keys, self.latency, self.accuracy]], on=keys,
                                  suffixes=("_target", "_base"))
            if paired.empty:
                raise KvsimError(f"{self.name}: {self.target} and {baseline} share no "
                                 f"({self.x}, {self.y}, trace) point")
            paired[SPEEDUP] = paired[f"{self.latency}_base"] / paired[f"{self.latency}_target"]
            paired[ACCURACY_DIFF] = (paired[f"{self.accuracy}_target"]
                                     - paired[f"{self.accuracy}_base"])
            stats = paired.groupby([x, y], sort=True)[[SPEEDUP, ACCURACY_DIFF]].agg(
                ["mean", "min", "max"])
            stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
            stats["n_traces"] = paired.groupby([x, y], sort=True)[TRACE].nunique()
            stats = stats.reset_index().rename(columns={x: "x", y: "y"})
            stats.insert(0, "baseline", baseline)
            parts.append(stats)
        return pd.concat(parts, ignore_index=True)

    # -- drawing ----------------------------------------------------------------------------

    def draw(self, results: Results) -> list[Path]:
        table = self.table(results)
        apply_style()
        n_rows = len(self.baselines)
        fig, axes = plt.subplots(n_rows, 2, figsize=(PAGE_IN, 2.0 * n_rows + 0.5),
                                 squeeze=False, layout="constrained")
        # labels from the axes' full keys (``decode_steps`` is labelled as its sweep axis)
        x_axis = axis_column(results, self.x, self.name)
        y_axis = axis_column(results, self.y, self.name)
        xs = sorted(table["x"].unique(), key=_order)
        ys = sorted(table["y"].unique(), key=_order)
        accuracy = metric_label(self.accuracy).split(" (")[0]
        panels = ((SPEEDUP, 1.0, "latency speedup (baseline / target)"),
                  (ACCURACY_DIFF, 0.0, f"{accuracy}: target - baseline"))
        for row, baseline in enumerate(self.baselines):
            rows = table[table["baseline"] == baseline]
            for col, (metric, centre, label) in enumerate(panels):
                grid = (rows.pivot(index="y", columns="x", values=f"{metric}_mean")
                        .reindex(index=ys, columns=xs).to_numpy(dtype=float))
                ax = axes[row, col]
                # one colour scale per column, so the baselines' panels compare at a glance
                norm = _centred_norm(table[f"{metric}_mean"].to_numpy(dtype=float), centre)
                image = ax.imshow(grid, origin="lower", aspect="auto", cmap="PuOr_r", norm=norm)
                for (i, j), value in np.ndenumerate(grid):
                    if np.isfinite(value):
                        text = f"{value:.2f}x" if metric == SPEEDUP else f"{value:+.3f}"
                        dark = abs(float(norm(value)) - 0.5) > 0.3
                        ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                                color="white" if dark else "black")
                ax.set_xticks(range(len(xs)), [_tick(v, self.x_percent) for v in xs])
                ax.set_yticks(range(len(ys)), [_tick(v, self.y_percent) for v in ys])
                if row == n_rows - 1:
                    ax.set_xlabel(axis_label(x_axis, self.x_percent))
                ax.set_ylabel(f"{self.target} vs {baseline}\n"
                              f"{axis_label(y_axis, self.y_percent)}" if col == 0 else "")
                if row == 0:
                    ax.set_title(label, fontsize=8)
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
        if self.title:
            fig.suptitle(self.title)
        stem = results.out_dir / self.stem
        return save_figure(fig, stem) + atomic_write_table(table, stem)


def _order(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order before anything else, the rest by text."""
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    return (0, float(number), "") if pd.notna(number) else (1, 0.0, str(value))


def _tick(value: Any, percent: bool) -> str:
    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    if pd.isna(number):
        return str(value)
    if percent:
        return f"{100 * float(number):g}"
    return f"{float(number):g}"


def _centred_norm(grid: np.ndarray, centre: float) -> TwoSlopeNorm:
    """A diverging norm with ``centre`` in the middle colour, symmetric around it."""
    finite = grid[np.isfinite(grid)]
    spread = float(np.max(np.abs(finite - centre))) if finite.size else 0.0
    spread = spread or 1e-9
    return TwoSlopeNorm(vcenter=centre, vmin=centre - spread, vmax=centre + spread)

