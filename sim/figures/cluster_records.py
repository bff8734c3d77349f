"""Figures and tables from the optional cluster records of a run (``record:`` block, see
:class:`sim.config.RecordSpec`; written by :mod:`sim.experiment.extra_records`):

* ``fig4_cluster_pca`` (DynaKV Fig. 4): one KV head's keys in 2-D PCA, coloured by cluster, at
  increasing decode lengths, one row per method (static update, local update, DynaKV) --
  from ``cluster_labels.parquet`` and ``cluster_keys.parquet``
  (``record: {cluster_layer, cluster_kv_head, cluster_steps}``);
* ``fig7_coretrieval`` (DynaKV Fig. 7): the co-retrieval frequency matrix of one head's prefill
  clusters, in the ``cluster`` layout's order and in the ``intra_inter`` layout's chain order
  -- from ``coretrieval.npy`` (``record.cluster_layer``);
* ``table2_update_retrieval`` (DynaKV Table 2): the probability that a just-updated cluster is
  retrieved within t steps, per method and trace -- from ``update_retrieval.csv``
  (``record.update_horizon``).

Like every figure, these read result files only (``cluster_record.json`` holds what they need
from the trace and the policy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.figures._runs import pick_trace, record_settings, require, short_trace, unique_runs
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.style import COLUMN_IN, OKABE_ITO, PAGE_IN, apply_style, plt, save_figure
from sim.result_files import (
    CLUSTER_KEYS,
    CLUSTER_LABELS,
    CLUSTER_RECORD,
    CORETRIEVAL,
    UPDATE_RETRIEVAL,
)

GREY = "#BBBBBB"
# Okabe-Ito without black (kept for text) and yellow last (faint on white)
CLUSTER_COLOURS = tuple(c for c in OKABE_ITO if c not in ("#000000", "#F0E442")) + ("#F0E442",)


def _runs_with(
    results: Results, runs: pd.DataFrame, wanted: list[str] | None, name: str, figure: str,
    hint: str,
) -> pd.DataFrame:
    """The rows of ``runs`` to draw: those labelled in ``wanted`` (each must have file
    ``name``), or every run that has it; a one-line KvsimError naming ``hint`` if none has."""
    if wanted:
        labels = runs["run"].astype(str)
        missing = [w for w in wanted if w not in set(labels)]
        if missing:
            raise KvsimError(f"{figure}: option runs names {', '.join(missing)}, not runs of "
                             f"this trace ({', '.join(labels)})")
        chosen = pd.concat([runs[labels == w].head(1) for w in wanted], ignore_index=True)
        for run_id in chosen["run_id"]:
            require(results, run_id, name, figure, hint)
        return chosen
    has = [(results.run_dir(r) / name).exists() for r in runs["run_id"]]
    chosen = runs[has].reset_index(drop=True)
    if chosen.empty:
        raise KvsimError(f"{figure}: no run of {results.dir} has {name}; {hint}")
    return chosen


def _cluster_record(results: Results, run_id: str, figure: str, hint: str) -> dict[str, Any]:
    """The run's ``cluster_record.json``: prompt length, sinks, PCA shares, co-retrieval
    queries (what the cluster figures need from the trace and the policy)."""
    return json.loads(require(results, run_id, CLUSTER_RECORD, figure, hint).read_text())


# -- Fig. 4 -------------------------------------------------------------------------------------

FIG4_HINT = ("set record: {cluster_layer: L, cluster_steps: [-1, ...]} for a cluster policy "
             "(static_clusters, clusterkv, dynakv) and rerun")


@FIGURES.register("fig4_cluster_pca")
@dataclass
class ClusterPCA(Figure):
    """Fig. 4: one KV head's keys projected on their first two principal components (fitted
    once per head on every key past the sinks, so all panels share axes), coloured by cluster,
    one column per recorded decode step and one row per method.

    The ``max_colored`` clusters largest at a row's last step get Okabe-Ito colours (the same
    in every panel of the row; with ``highlight: decode``, the default, the largest of those
    holding decode tokens come first, so the clusters that new tokens joined or formed are
    visible), the others are grey; decode tokens are triangles (black edge), prompt tokens
    dots. Sinks (the policy's ``sink_tokens``) are left out. Each panel gives its cluster
    count. Options: ``trace`` (name or unique part of it; default: the first trace with
    cluster labels), ``runs`` (labels of the rows, in order; default: every run with cluster
    labels), ``max_colored``, ``highlight`` ("decode" or "largest").
    """

    needs_record: ClassVar[tuple[str, ...]] = ("cluster_layer", "cluster_steps")

    trace: str | None = None
    runs: list[str] | None = None
    max_colored: int = 6
    highlight: str = "decode"

    def __post_init__(self) -> None:
        if not 0 <= int(self.max_colored) <= len(CLUSTER_COLOURS):
            raise ValueError(f"max_colored must be in [0, {len(CLUSTER_COLOURS)}], got "
                             f"{self.max_colored}")
        if self.highlight not in ("decode", "largest"):
            raise ValueError(f"highlight must be 'decode' or 'largest', got {self.highlight!r}")

    def draw(self, results: Results) -> list[Path]:
        name, runs = pick_trace(results, self.trace, "fig4_cluster_pca", needs=CLUSTER_LABELS)
        rows = _runs_with(results, runs, self.runs, CLUSTER_LABELS, "fig4_cluster_pca",
                          FIG4_HINT)
        panels: list[dict[str, Any]] = []
        for run_id, label in zip(rows["run_id"], rows["run"], strict=True):
            record = record_settings(results, run_id)
            if record.get("cluster_layer") is None:
                raise KvsimError(f"fig4_cluster_pca: run {label!r}: record.cluster_layer is "
                                 "not known (run.yaml and experiment.yaml lack it)")
            layer, head = int(record["cluster_layer"]), int(record.get("cluster_kv_head", 0))
            labels = pd.read_parquet(results.run_dir(run_id) / CLUSTER_LABELS)
            about = _cluster_record(results, run_id, "fig4_cluster_pca", FIG4_HINT)
            keys = pd.read_parquet(require(results, run_id, CLUSTER_KEYS, "fig4_cluster_pca",
                                           FIG4_HINT))
            projected = keys.sort_values("position")[["pc1", "pc2"]].to_numpy(np.float64)
            share = np.asarray(about["pca_variance_share"], dtype=np.float64)
            same = next((p for p in panels if p["labels"].equals(labels)), None)
            if same is not None:  # one policy pass, several layouts: identical labels
                same["also"] += 1
                continue
            panels.append({"label": str(label), "also": 0, "labels": labels, "xy": projected,
                           "share": share, "prompt": int(about["prompt_len"]),
                           "sinks": int(about["sink_tokens"]), "layer": layer, "head": head})
        steps = sorted(set().union(*(set(p["labels"]["step"].unique()) for p in panels)))
        stem = results.out_dir / "fig4_cluster_pca"
        return self._plot(panels, [int(s) for s in steps], name, stem)

    def _plot(self, panels, steps, trace_name, stem) -> list[Path]:
        apply_style()
        n_rows, n_cols = len(panels), len(steps)
        width = PAGE_IN if n_cols > 1 else COLUMN_IN
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, 0.6 + 1.85 * n_rows),
                                 sharex=True, sharey=True, squeeze=False, layout="constrained")
        # shared limits: central 99.5% of every projected key past the sinks, with a margin
        everything = np.concatenate([p["xy"][p["sinks"]:] for p in panels])
        lo, hi = np.percentile(everything, [0.25, 99.75], axis=0)
        pad = 0.08 * (hi - lo)
        for r, panel in enumerate(panels):
            frame = panel["labels"]
            top = self._coloured(frame, panel)
            colour_of = {int(g): CLUSTER_COLOURS[i] for i, g in enumerate(top)}
            for c, step in enumerate(steps):
                ax = axes[r, c]
                at = frame[frame["step"] == step].sort_values("position")
                if at.empty:
                    ax.set_axis_off()
                    continue
                self._panel(ax, panel, at, colour_of)
                if r == 0:
                    context = len(at)
                    when = "after prefill" if step < 0 else f"after decode step {step + 1}"
                    ax.set_title(f"{when}\n({context} tokens)")
                if c == 0:
                    name = panel["label"] + (f" (+{panel['also']})" if panel["also"] else "")
                    ax.set_ylabel(f"{name}\nPC 2 ({panel['share'][1]:.0%} var., a.u.)")
                if r == n_rows - 1:
                    ax.set_xlabel(f"PC 1 ({panel['share'][0]:.0%} of key variance, a.u.)")
                ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
                ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        first = panels[0]
        handles = [
            plt.Line2D([], [], ls="", marker="o", ms=3, color=CLUSTER_COLOURS[0],
                       label="prompt key (colour: cluster)"),
            plt.Line2D([], [], ls="", marker="^", ms=5, color=CLUSTER_COLOURS[0], mec="black",
                       mew=0.5, label="decode key"),
            plt.Line2D([], [], ls="", marker="o", ms=3, color=GREY,
                       label=f"other clusters (beyond {int(self.max_colored)} coloured)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
        fig.suptitle(f"{short_trace(trace_name)}: keys of layer {first['layer']}, KV head "
                     f"{first['head']} (sinks left out)", fontsize=8)
        return save_figure(fig, stem)

    def _coloured(self, frame: pd.DataFrame, panel: dict[str, Any]) -> list[int]:
        """The clusters of a row that get colours: by size at the row's last step, those
        holding decode tokens first (``highlight="decode"``) or the largest overall."""
        last = frame[frame["step"] == frame["step"].max()].sort_values("position")
        positions = last["position"].to_numpy()
        groups = last["group"].to_numpy()
        keep = (positions >= panel["sinks"]) & (groups >= 0)
        positions, groups = positions[keep], groups[keep]
        sizes = pd.Series(groups).value_counts(sort=False)
        sizes = sizes.sort_index().sort_values(ascending=False, kind="stable")
        ranked = [int(g) for g in sizes.index]
        if self.highlight == "decode":
            new = set(groups[positions >= panel["prompt"]].tolist())
            ranked = [g for g in ranked if g in new] + [g for g in ranked if g not in new]
        return ranked[: int(self.max_colored)]

    @staticmethod
    def _panel(ax, panel, at, colour_of) -> None:
        xy = panel["xy"]
        positions = at["position"].to_numpy()
        groups = at["group"].to_numpy()
        keep = positions >= panel["sinks"]
        positions, groups = positions[keep], groups[keep]
        colours = np.array([colour_of.get(int(g), GREY) for g in groups], dtype=object)
        grey = colours == GREY
        prompt = positions < panel["prompt"]
        for mask, z in ((prompt & grey, 1), (prompt & ~grey, 2)):
            ax.scatter(xy[positions[mask], 0], xy[positions[mask], 1], s=1.5, c=list(colours[mask]),
                       alpha=0.45 if z == 1 else 0.7, lw=0, rasterized=True, zorder=z)
        new = ~prompt
        if new.any():
            ax.scatter(xy[positions[new], 0], xy[positions[new], 1], s=12, marker="^",
                       c=list(colours[new]), edgecolors="black", linewidths=0.35, zorder=4)
        live = groups[groups >= 0]
        text = f"{len(np.unique(live))} clusters"
        if new.any():
            text += f", {int(new.sum())} new"
        ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=6)
        ax.tick_params(labelsize=6)


# -- Fig. 7 -------------------------------------------------------------------------------------

FIG7_HINT = ("set record: {cluster_layer: L} for a policy that measures co-retrieval "
             "(static_clusters, clusterkv, dynakv with coretrieval_queries > 0) and rerun")


def coretrieval_orders(matrix: np.ndarray, prefill_labels: np.ndarray | None) -> dict[str, Any]:
    """The clusters in the ``cluster`` layout's order (smallest prefill position first; label
    order without labels) and in the ``intra_inter`` layout's chain order."""
    from sim.kv.layouts.coretrieval import coretrieval_chain

    n = matrix.shape[0]
    if prefill_labels is not None:
        labels, first = np.unique(prefill_labels, return_index=True)
        position = labels[np.argsort(first, kind="stable")]
        position = np.array([g for g in position if 0 <= g < n], dtype=np.int64)
        missing = np.setdiff1d(np.arange(n), position)
        position = np.concatenate([position, missing])
    else:
        position = np.arange(n)
    chain = coretrieval_chain(np.arange(n), matrix).astype(np.int64)
    return {"position": position, "chain": chain}


def adjacent_share(matrix: np.ndarray, order: np.ndarray) -> float:
    """Share of the off-diagonal co-retrievals between clusters that are neighbours in
    ``order`` (what one sequential read can cover)."""
    sym = np.asarray(matrix, dtype=np.float64)
    sym = sym + sym.T
    np.fill_diagonal(sym, 0.0)
    total = np.triu(sym, 1).sum()
    if total <= 0:
        return float("nan")
    return float(sym[order[:-1], order[1:]].sum() / total)


@FIGURES.register("fig7_coretrieval")
@dataclass
class Coretrieval(Figure):
    """Fig. 7: co-retrieval frequency (co-retrievals per query) of one KV head's prefill
    clusters, measured by the policy on the last ``coretrieval_queries`` prompt queries before
    decoding. Per run, the matrix in the ``cluster`` layout's order (smallest position first)
    and in the ``intra_inter`` layout's chain order (:func:`sim.kv.layouts.coretrieval.
    coretrieval_chain`); each panel gives the share of co-retrievals between neighbouring
    clusters. The diagonal is each cluster's retrieval frequency; the last label is the sinks'
    group (always retrieved); colours on a square-root scale. Also writes
    ``fig7_coretrieval.{csv,md}`` with every trace's runs (the figure shows one trace).

    Options: ``trace`` (default: the first trace with a matrix), ``runs`` (labels; default:
    every run with a matrix), ``order`` ("both", "chain" or "position").
    """

    needs_record: ClassVar[tuple[str, ...]] = ("cluster_layer",)

    trace: str | None = None
    runs: list[str] | None = None
    order: str = "both"

    def __post_init__(self) -> None:
        if self.order not in ("both", "chain", "position"):
            raise ValueError(f"order must be 'both', 'chain' or 'position', got {self.order!r}")

    @staticmethod
    def _measure(results: Results, run_id: str, label: str) -> tuple:
        """(table row, counts, orders, neighbour shares, queries) of one run's matrix."""
        counts = np.load(results.run_dir(run_id) / CORETRIEVAL)
        about = _cluster_record(results, run_id, "fig7_coretrieval", FIG7_HINT)
        prompt, queries = int(about["prompt_len"]), int(about["coretrieval_queries"])
        if queries <= 0:
            raise KvsimError(f"fig7_coretrieval: run {label!r} measured no co-retrieval "
                             "queries (coretrieval_queries = 0)")
        labels_path = results.run_dir(run_id) / CLUSTER_LABELS
        prefill = None
        if labels_path.exists():
            frame = pd.read_parquet(labels_path)
            prefill = frame[frame["step"] == frame["step"].min()]
            prefill = prefill[prefill["position"] < prompt]["group"].to_numpy()
        orders = coretrieval_orders(counts, prefill)
        shares = {k: adjacent_share(counts, orders[k]) for k in orders}
        record = record_settings(results, run_id)
        row = {
            "layer": record.get("cluster_layer"), "kv_head": record.get("cluster_kv_head", 0),
            "clusters": counts.shape[0], "queries": queries,
            "mean_retrieved_per_query": float(np.trace(counts)) / queries,
            "adjacent_share_cluster_order": shares["position"],
            "adjacent_share_chain_order": shares["chain"],
        }
        return row, counts, orders, shares, queries

    def draw(self, results: Results) -> list[Path]:
        from matplotlib.colors import LinearSegmentedColormap, PowerNorm
        from matplotlib.ticker import MaxNLocator

        name, runs = pick_trace(results, self.trace, "fig7_coretrieval", needs=CORETRIEVAL)
        rows = _runs_with(results, runs, self.runs, CORETRIEVAL, "fig7_coretrieval", FIG7_HINT)
        kinds = ["position", "chain"] if self.order == "both" else [self.order]
        titles = {"position": "cluster order", "chain": "intra_inter order"}
        table: list[dict[str, Any]] = []
        items: list[tuple] = []
        seen: dict[tuple, int] = {}
        shown = set(rows["run_id"])
        # the table covers every trace; the figure the chosen one
        every = unique_runs(results.summary)
        if self.runs:
            every = every[every["run"].astype(str).isin(self.runs)]
        for _, run in every.iterrows():
            run_id, label = run["run_id"], str(run["run"])
            if not (results.run_dir(run_id) / CORETRIEVAL).exists():
                continue
            row, counts, orders, shares, queries = self._measure(results, run_id, label)
            table.append({"run": label, "trace": short_trace(run["trace"]), **row})
            if run_id not in shown:
                continue
            # runs sharing a policy pass (one policy, several layouts) have the same matrix:
            # drawn once, named after the first of them
            key = (counts.shape, counts.tobytes())
            if key in seen:
                items[seen[key]][1].append(label)
            else:
                seen[key] = len(items)
                items.append((counts / queries, [label], orders, shares))
        table = sorted(table, key=lambda r: r["trace"] != short_trace(name))  # shown one first
        stem = results.out_dir / "fig7_coretrieval"
        written = atomic_write_table(pd.DataFrame(table), stem)

        apply_style()
        cmap = LinearSegmentedColormap.from_list(
            "okabe_blue", ["#FFFFFF", "#56B4E9", "#0072B2", "#00304F"])
        per_row = len(kinds) * (1 if len(items) == 1 else 2)
        n_panels = len(items) * len(kinds)
        n_cols = min(n_panels, per_row)
        n_rows = -(-n_panels // n_cols)
        width = min(PAGE_IN, 1.75 * n_cols + 0.7) if n_cols > 1 else COLUMN_IN
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, 0.45 + 1.95 * n_rows),
                                 squeeze=False, layout="constrained")
        image = None
        k = 0
        for freq, labels, orders, shares in items:
            label = labels[0] if len(labels) == 1 else f"{labels[0]} (+{len(labels) - 1})"
            for kind in kinds:
                ax = axes.flat[k]
                row, col = divmod(k, n_cols)
                k += 1
                order = orders[kind]
                n = len(order)
                image = ax.imshow(freq[np.ix_(order, order)], cmap=cmap,
                                  norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest",
                                  extent=(-0.5, n - 0.5, n - 0.5, -0.5))
                ax.set_title(f"{label}\n{titles[kind]}: {shares[kind]:.0%}", fontsize=6.5)
                if row == n_rows - 1 or k + n_cols > n_panels:
                    ax.set_xlabel("cluster (rank in order)")
                if col == 0:
                    ax.set_ylabel("cluster (rank in order)")
                ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
                ax.tick_params(labelsize=6)
                ax.spines["top"].set_visible(True)
                ax.spines["right"].set_visible(True)
        for ax in list(axes.flat)[k:]:
            ax.set_axis_off()
        fig.suptitle(f"{short_trace(name)}: layer {table[0]['layer']}, KV head "
                     f"{table[0]['kv_head']}, {table[0]['queries']} prompt queries\n"
                     "%: share of co-retrievals between neighbouring clusters", fontsize=7)
        assert image is not None  # _runs_with found a run with the matrix: a panel was drawn
        bar = fig.colorbar(image, ax=axes, shrink=0.8, pad=0.02)
        bar.set_label("co-retrievals per query (sqrt scale)")
        bar.ax.tick_params(labelsize=6)
        return written + save_figure(fig, stem)


# -- Table 2 ------------------------------------------------------------------------------------

TABLE2_HINT = "set record: {update_horizon: 8} (a cluster policy) and rerun"


@FIGURES.register("table2_update_retrieval")
@dataclass
class UpdateRetrieval(Figure):
    """Table 2: probability that a just-updated cluster (a decode token joined it, or a split
    moved entries into or out of it) is retrieved within t steps, over every layer and KV head
    of the trace; one row per method and trace (plus, with several traces, the mean over
    traces per method), one column per t. Runs without groups are left out.

    Options: ``steps`` (the t columns; must be <= ``record.update_horizon``; empty = all).
    Writes ``table2_update_retrieval.{csv,md}``.
    """

    needs_record: ClassVar[tuple[str, ...]] = ("update_horizon",)

    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])

    def __post_init__(self) -> None:
        if any(int(t) < 1 for t in self.steps):
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")

    def draw(self, results: Results) -> list[Path]:
        runs = unique_runs(results.summary)
        rows_of = _runs_with(results, runs, None, UPDATE_RETRIEVAL,
                             "table2_update_retrieval", TABLE2_HINT)
        extra_axes = [a for a in results.axes if not a.startswith("trace.") and a in rows_of]
        rows = []
        for _, run in rows_of.iterrows():
            data = pd.read_csv(results.run_dir(run["run_id"]) / UPDATE_RETRIEVAL)
            horizon = int(data["within_steps"].max())
            wanted = [int(t) for t in self.steps] or list(data["within_steps"])
            beyond = [t for t in wanted if t > horizon]
            if beyond:
                raise KvsimError(
                    f"table2_update_retrieval: t = {', '.join(map(str, beyond))} exceeds "
                    f"record.update_horizon ({horizon}) of run {run['run']!r}; raise it or "
                    "drop those steps"
                )
            prob = dict(zip(data["within_steps"].astype(int), data["probability"], strict=True))
            rows.append({
                "method": str(run["run"]),
                "trace": short_trace(run["trace"]),
                **{axis: run[axis] for axis in extra_axes},
                "updates": int(data["updates"].iloc[0]),
                **{f"t={t}": float(prob[t]) for t in wanted},
            })
        table = pd.DataFrame(rows)
        if table["trace"].nunique() > 1:
            keys = ["method", *extra_axes]
            means = []
            for key, group in table.groupby(keys, sort=False, dropna=False):
                key = key if isinstance(key, tuple) else (key,)
                row = dict(zip(keys, key, strict=True))
                row["trace"] = f"mean of {group['trace'].nunique()}"
                row["updates"] = int(group["updates"].sum())
                for column in [c for c in table.columns if c.startswith("t=")]:
                    row[column] = float(group[column].mean())
                means.append(row)
            table = pd.concat([table, pd.DataFrame(means)], ignore_index=True)
            table = table.sort_values("method", kind="stable", key=_first_seen(table["method"]))
        return atomic_write_table(table, results.out_dir / "table2_update_retrieval",
                                  floatfmt=".3f")


def _first_seen(column: pd.Series):
    order = {value: i for i, value in enumerate(dict.fromkeys(column))}
    return lambda values: values.map(order)
