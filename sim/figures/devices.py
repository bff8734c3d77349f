"""DynaKV Fig. 17: per-token latency of every policy across phones, and the speedup over a
baseline (default ``token_topk``, the no-cluster retrieval).

Left: grouped bars, one group per value of ``axis`` (default ``device``: the preset swept by
the experiment), one bar per run; the bar is the mean latency over traces, its hatched parts
the flash I/O wait and the index scoring inside it (the breakdown; the rest is dense compute
and attention), whiskers min-max over traces. Right: speedup = baseline latency / the run's
latency on the same trace and phone, mean over traces with min-max whiskers. ``points`` pins
other sweep axes per run (as in ``fig10_overview``); ``runs`` orders or restricts the bars.
Writes ``fig17_devices.{pdf,png}`` and ``fig17_devices.{csv,md}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from sim.errors import KvsimError
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.common import (
    RUN,
    TRACE,
    axis_column,
    axis_label,
    bar_offsets,
    baseline_rows,
    colour,
    one_row_per,
    pick_points,
    require_metrics,
    require_rows,
    run_order,
)
from sim.figures.style import PAGE_IN, apply_style, save_figure

PARTS = ("dense_ms", "scoring_ms", "io_wait_ms", "attention_ms")


@FIGURES.register("fig17_devices")
@dataclass
class DevicesFigure(Figure):
    """Latency per policy across phone presets, with its breakdown and the speedup."""

    axis: str = "device"
    baseline: str = "token_topk"
    points: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    stem: str = "fig17_devices"

    def table(self, results: Results) -> tuple[pd.DataFrame, str]:
        frame = require_rows(results, self.name)
        axis = axis_column(results, self.axis, self.name)
        require_metrics(frame, ["latency_ms_mean", *PARTS], self.name)
        frame = pick_points(frame, self.points, self.name, results)
        one_row_per(frame, [RUN, axis, TRACE], self.name,
                    "pin the other sweep axes with the figure's 'points' option")
        base = baseline_rows(frame, self.baseline, self.name, "compute speedups against")
        base = base.set_index([axis, TRACE])["latency_ms_mean"]
        order = run_order(frame, self.runs, self.name)
        frame = frame[frame[RUN].astype(str).isin(order)].copy()
        keys = list(zip(frame[axis], frame[TRACE], strict=True))
        missing = [k for k in keys if k not in base.index]
        if missing:
            raise KvsimError(f"{self.name}: no {self.baseline} run at {self.axis}="
                             f"{missing[0][0]} on trace {missing[0][1]}")
        frame["speedup"] = [base[k] for k in keys] / frame["latency_ms_mean"]
        frame[RUN] = frame[RUN].astype(str)
        grouped = frame.groupby([RUN, axis], sort=False)
        table = grouped[["latency_ms_mean", *PARTS]].mean()
        table["latency_min"] = grouped["latency_ms_mean"].min()
        table["latency_max"] = grouped["latency_ms_mean"].max()
        table[f"speedup_vs_{self.baseline}"] = grouped["speedup"].mean()
        table["speedup_min"] = grouped["speedup"].min()
        table["speedup_max"] = grouped["speedup"].max()
        table["n_traces"] = grouped.size()
        table = table.reset_index()
        table["order"] = table[RUN].map({r: i for i, r in enumerate(order)})
        groups = list(dict.fromkeys(frame[axis]))
        table["group"] = table[axis].map({g: i for i, g in enumerate(groups)})
        table = table.sort_values(["group", "order"]).drop(columns=["order", "group"])
        return table.reset_index(drop=True), axis

    def draw(self, results: Results) -> list[Path]:
        table, axis = self.table(results)
        stem = results.out_dir / self.stem
        runs = list(dict.fromkeys(table[RUN]))
        groups = list(dict.fromkeys(table[axis]))
        offsets, width = bar_offsets(len(runs))
        n = int(table["n_traces"].max())
        apply_style()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(PAGE_IN, 2.5))
        speed = f"speedup_vs_{self.baseline}"
        for i, run in enumerate(runs):
            rows = table[table[RUN] == run].set_index(axis).reindex(groups)
            xs = np.arange(len(groups)) + offsets[i]
            lat = rows["latency_ms_mean"].to_numpy()
            ax.bar(xs, lat, width, color=colour(i), label=run)
            # breakdown: scoring then I/O wait drawn inside the bar, from its top down
            top = lat - rows["attention_ms"].to_numpy()
            for part, pattern in (("io_wait_ms", "xxxx"), ("scoring_ms", "....")):
                ax.bar(xs, rows[part].to_numpy(), width, bottom=top - rows[part].to_numpy(),
                       fill=False, hatch=pattern, edgecolor="white", lw=0)
                top = top - rows[part].to_numpy()
            sp = rows[speed].to_numpy()
            bx.bar(xs, sp, width, color=colour(i))
            if n > 1:
                ax.errorbar(xs, lat, yerr=[lat - rows["latency_min"], rows["latency_max"] - lat],
                            fmt="none", color="black", lw=0.6, capsize=1.5)
                bx.errorbar(xs, sp, yerr=[sp - rows["speedup_min"], rows["speedup_max"] - sp],
                            fmt="none", color="black", lw=0.6, capsize=1.5)
        bx.axhline(1.0, color="black", lw=0.6, ls="--")
        for a in (ax, bx):
            a.set_xticks(range(len(groups)), [str(g) for g in groups])
            a.set_xlabel(axis_label(axis))
            a.grid(axis="y", alpha=0.3, lw=0.5)
        ax.set_ylabel("per-token latency (ms)")
        bx.set_ylabel(f"speedup over {self.baseline}\n(its latency / the run's)")
        handles, labels = ax.get_legend_handles_labels()
        handles += [Patch(facecolor="#666666", hatch="xxxx", edgecolor="white",
                          label="flash I/O wait"),
                    Patch(facecolor="#666666", hatch="....", edgecolor="white",
                          label="index scoring")]
        note = f"mean over {n} traces; whiskers: min-max" if n > 1 else "one trace"
        fig.legend(handles, [*labels, "flash I/O wait", "index scoring"], loc="lower center",
                   bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 6), frameon=False,
                   title=f"{results.name} ({note})", title_fontsize=7)
        fig.tight_layout()
        return save_figure(fig, stem) + atomic_write_table(table, stem)
