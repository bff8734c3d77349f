"""DynaKV Fig. 12: distribution of contiguous flash access lengths per flash layout.

A contiguous run is a maximal range of adjacent flash slots whose entries one step's read of
one (layer, KV head) requested (``runs/<id>/run_lengths.csv``: ``run_entries``, ``runs``
= how many runs had that length). Per run of the experiment (one per layout, e.g. DynaKV with
the ``sequence``, ``cluster``, ``intra_inter`` and ``dual_head`` layouts), left: the CDF over
runs of the run length (log x), pooled over the traces, with the band between the traces'
CDFs and the mean marked; right: the mean run length (entries per contiguous run) per layout,
bars pooled, whiskers the range over traces, dots the traces. The paper: sequence order < 7.9
entries, + intra-cluster 25.3, + inter-cluster 40.8.

Files: ``fig12_run_lengths.{pdf,png}`` and ``fig12_run_lengths.{csv,md}`` (one row per run
and trace plus pooled rows: runs, entries, mean, median, p90 run length).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.figures._runs import short_trace, traces_of, unique_runs
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.style import MARKERS, OKABE_ITO, PAGE_IN, apply_style, plt, save_figure
from sim.result_files import RUN_LENGTHS

POOLED = "pooled"


def _quantile(lengths: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The smallest length whose cumulative share of runs reaches ``q``."""
    cumulative = np.cumsum(counts) / counts.sum()
    return float(lengths[np.searchsorted(cumulative, q - 1e-12)])


def _stats(frame: pd.DataFrame) -> dict[str, float]:
    lengths = frame["run_entries"].to_numpy(dtype=np.int64)
    counts = frame["runs"].to_numpy(dtype=np.int64)
    runs, entries = int(counts.sum()), int((lengths * counts).sum())
    return {
        "runs": runs,
        "entries": entries,
        "mean_run_entries": entries / runs if runs else float("nan"),
        "median_run_entries": _quantile(lengths, counts, 0.5) if runs else float("nan"),
        "p90_run_entries": _quantile(lengths, counts, 0.9) if runs else float("nan"),
    }


def _pool(frames: list[pd.DataFrame]) -> pd.DataFrame:
    both = pd.concat(frames, ignore_index=True)
    return both.groupby("run_entries", as_index=False)["runs"].sum().sort_values("run_entries")


def _cdf(frame: pd.DataFrame, grid: np.ndarray) -> np.ndarray:
    lengths = frame["run_entries"].to_numpy()
    cumulative = np.cumsum(frame["runs"].to_numpy()) / frame["runs"].sum()
    index = np.searchsorted(lengths, grid, side="right") - 1
    return np.where(index >= 0, cumulative[np.maximum(index, 0)], 0.0)


@FIGURES.register("fig12_run_lengths")
@dataclass
class RunLengths(Figure):
    """Fig. 12: contiguous flash access length (entries per contiguous run) per run label
    (one layout each, or a ``policy.layout`` axis: one series per label and value of the
    non-trace sweep axes), CDF with the mean marked plus the mean per series over traces.
    A run without flash reads (``full``) is left out. Options: none."""

    def draw(self, results: Results) -> list[Path]:
        runs = unique_runs(results.summary)
        traces = traces_of(runs)
        # one series per run label and value of the sweep axes other than the trace's
        axes = [a for a in results.axes if not a.startswith("trace.") and a in runs]
        series: dict[str, dict] = {}
        for _, run in runs.iterrows():
            path = results.run_dir(run["run_id"]) / RUN_LENGTHS
            if not path.exists():
                raise KvsimError(f"fig12_run_lengths: run {run['run']!r} has no "
                                 "run_lengths.csv (a partial results directory? rerun)")
            frame = pd.read_csv(path)
            frame = frame[frame["runs"] > 0].sort_values("run_entries")
            if frame.empty:
                continue  # no flash reads (full attention)
            extra = [f"{a.rsplit('.', 1)[-1]}={run[a]}" for a in axes if pd.notna(run[a])]
            label = str(run["run"]) + (f" ({', '.join(extra)})" if extra else "")
            layout = (results.settings(run["run_id"]).get("layout") or {}).get("type", "?")
            entry = series.setdefault(label, {"layout": layout, "traces": {}})
            if str(run["trace"]) in entry["traces"]:
                raise KvsimError(
                    f"fig12_run_lengths: run {label!r} appears twice for trace {run['trace']}; "
                    "give each layout its own label"
                )
            entry["traces"][str(run["trace"])] = frame
        if not series:
            raise KvsimError("fig12_run_lengths: no run of this experiment read from flash; "
                             "add a policy that reads (e.g. dynakv with budget 0.05)")
        table = []
        for label, entry in series.items():
            for trace, frame in entry["traces"].items():
                table.append({"run": label, "layout": entry["layout"],
                              "trace": short_trace(trace), **_stats(frame)})
            entry["pooled"] = _pool(list(entry["traces"].values()))
            if len(entry["traces"]) > 1:
                table.append({"run": label, "layout": entry["layout"], "trace": POOLED,
                              **_stats(entry["pooled"])})
        table = pd.DataFrame(table)
        stem = results.out_dir / "fig12_run_lengths"
        written = atomic_write_table(table, stem, floatfmt=".4g")
        return written + self._plot(series, table, len(traces), stem)

    @staticmethod
    def _plot(series, table, n_traces, stem) -> list[Path]:
        apply_style()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(PAGE_IN * 0.75, 2.3),
                                     gridspec_kw={"width_ratios": [1.5, 1]})
        top = max(int(e["pooled"]["run_entries"].max()) for e in series.values())
        grid = np.unique(np.geomspace(1, max(top, 2), 400).astype(np.int64))
        names = list(series)
        for i, label in enumerate(names):
            entry = series[label]
            colour, marker = OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)]
            pooled = entry["pooled"]
            mean = _stats(pooled)["mean_run_entries"]
            name = label if entry["layout"] in label else f"{label} ({entry['layout']})"
            ax.step(grid, _cdf(pooled, grid), where="post", color=colour, lw=1.2,
                    label=f"{name}: mean {mean:.1f}")
            if len(entry["traces"]) > 1:
                curves = np.array([_cdf(f, grid) for f in entry["traces"].values()])
                ax.fill_between(grid, curves.min(axis=0), curves.max(axis=0), step="post",
                                color=colour, alpha=0.18, lw=0)
            ax.axvline(mean, color=colour, ls="--", lw=0.8)
            ax.plot([mean], [_cdf(pooled, np.array([int(mean)]))[0]], marker=marker,
                    color=colour, ms=4, zorder=4)
            per_trace = table[(table["run"] == label) & (table["trace"] != POOLED)]
            means = per_trace["mean_run_entries"].to_numpy()
            bx.bar(i, mean, color=colour, width=0.65, alpha=0.85)
            if len(means) > 1:
                bx.errorbar(i, mean, yerr=[[mean - means.min()], [means.max() - mean]],
                            color="black", capsize=2, lw=0.8)
                bx.scatter(np.full(len(means), i), means, color="black", s=6, zorder=3)
            bx.annotate(f"{mean:.1f}", (i, means.max() if len(means) else mean),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=6)
        ax.set_xscale("log")
        ax.set_xlim(1, top * 1.1)
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
                 if t <= top * 1.1]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("contiguous access length (KV entries per run, log)")
        ax.set_ylabel("CDF (share of contiguous runs)")
        ax.grid(alpha=0.3, lw=0.5)
        fig.legend(*ax.get_legend_handles_labels(), frameon=False, fontsize=6,
                   loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(names), 4))
        bx.set_xticks(range(len(names)))
        bx.set_xticklabels(names, rotation=25, ha="right")
        bx.set_ylabel("mean run length (KV entries)")
        spread = f" (whiskers, dots: {n_traces} traces)" if n_traces > 1 else ""
        bx.set_title(f"mean{spread}", fontsize=7)
        ax.set_title("CDF over contiguous runs (dashed: mean)", fontsize=7)
        fig.tight_layout()
        return save_figure(fig, stem)
