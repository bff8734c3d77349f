"""Tables drawn from per-run records (CSV + markdown each).

``table5_variance`` (DynaKV Table 5): intra-cluster key variance of each clustering method,
from each run's ``clusters.parquet`` (one value per decode step, layer and KV head: the mean
over clusters of the mean squared distance of a cluster's keys to its centroid, see
:mod:`sim.metrics.clusters`): the mean over the whole decode, over its first and last
``window`` share of steps (early / late), their ratio, and the cluster count (mean over
layers and heads) early and late. One row per run and trace, then an ``average`` row per run.
Runs of the same policy pass (same label and trace, differing only in hardware or cache axes)
appear once: clustering does not depend on them.

``table6_decode_length`` (DynaKV Table 6): per-token latency against decode length. Each
run's ``steps.parquet`` is cut into ``buckets`` equal parts of its decode steps (quartiles by
default); the table holds the mean latency (ms) of each part, and the last part's over the
first's. One row per run, other varying sweep axes and trace, then ``average`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.common import RUN, TRACE, require_rows, run_order, varying_axes

AVERAGE = "average"


def _with_average(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``table`` plus one ``average`` row (mean over traces) per ``keys``."""
    average = table.groupby(keys, sort=False, dropna=False).mean(numeric_only=True)
    average = average.reset_index()
    average.insert(len(keys), TRACE, AVERAGE)
    average["n_traces"] = table.groupby(keys, sort=False, dropna=False).size().to_numpy()
    return pd.concat([table, average], ignore_index=True)


def _restrict(frame: pd.DataFrame, runs: list[str], figure: str) -> pd.DataFrame:
    order = run_order(frame, runs, figure)
    frame = frame[frame[RUN].astype(str).isin(order)].copy()
    frame[RUN] = frame[RUN].astype(str)
    frame["_order"] = frame[RUN].map({r: i for i, r in enumerate(order)})
    return frame.sort_values("_order", kind="stable").drop(columns="_order")


@FIGURES.register("table5_variance")
@dataclass
class VarianceTable(Figure):
    """Intra-cluster variance per method: mean, early and late in the decode (Table 5)."""

    runs: list[str] = field(default_factory=list)
    window: float = 0.25
    stem: str = "table5_variance"

    def __post_init__(self) -> None:
        if not isinstance(self.window, (int, float)) or not 0 < self.window <= 0.5:
            raise ValueError(f"{self.name}: window must be in (0, 0.5], got {self.window!r}")

    def table(self, results: Results) -> pd.DataFrame:
        frame = _restrict(require_rows(results, self.name), self.runs, self.name)
        policy_axes = [a for a in varying_axes(results, frame, exclude=[])
                       if a.startswith(("policy.", "policies."))]
        keys = [RUN, *policy_axes]
        frame = frame.drop_duplicates([*keys, TRACE])  # one policy pass each
        rows = []
        for row in frame.to_dict("records"):
            clusters = results.records(row["run_id"], "clusters")
            if clusters.empty:
                if self.runs:
                    raise KvsimError(f"{self.name}: run {row[RUN]} has no clusters.parquet "
                                     "(its policy forms no groups)")
                continue
            steps = np.sort(clusters["step"].unique())
            edge = max(1, math.ceil(self.window * len(steps)))
            early = clusters[clusters["step"].isin(steps[:edge])]
            late = clusters[clusters["step"].isin(steps[-edge:])]
            variance = "intra_cluster_variance"
            rows.append({
                **{k: row[k] for k in keys},
                TRACE: row[TRACE],
                "variance_mean": clusters[variance].mean(),
                "variance_early": early[variance].mean(),
                "variance_late": late[variance].mean(),
                "late_over_early": late[variance].mean() / early[variance].mean(),
                "clusters_early": early["n_groups"].mean(),
                "clusters_late": late["n_groups"].mean(),
                "window_steps": edge,
                "n_traces": 1,
            })
        if not rows:
            raise KvsimError(f"{self.name}: no run has clusters.parquet (only policies with "
                             "groups record it, e.g. static_clusters, clusterkv, dynakv)")
        return _with_average(pd.DataFrame(rows), keys)

    def draw(self, results: Results) -> list[Path]:
        return atomic_write_table(self.table(results), results.out_dir / self.stem)


@FIGURES.register("table6_decode_length")
@dataclass
class DecodeLengthTable(Figure):
    """Mean per-token latency in each part of the decode, per policy (Table 6)."""

    buckets: int = 4
    runs: list[str] = field(default_factory=list)
    stem: str = "table6_decode_length"

    def __post_init__(self) -> None:
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or (
            self.buckets < 1
        ):
            raise ValueError(f"{self.name}: buckets must be an integer >= 1")

    def table(self, results: Results) -> pd.DataFrame:
        frame = _restrict(require_rows(results, self.name), self.runs, self.name)
        keys = [RUN, *varying_axes(results, frame, exclude=[])]
        rows, names = [], None
        for row in frame.to_dict("records"):
            steps = results.records(row["run_id"], "steps")
            if steps.empty or "latency_us" not in steps:
                raise KvsimError(f"{self.name}: run {row[RUN]} has no steps.parquet")
            n = len(steps)
            if n < self.buckets:
                raise KvsimError(f"{self.name}: run {row[RUN]} has {n} decode steps, fewer "
                                 f"than {self.buckets} buckets")
            step = steps["step"].to_numpy() if "step" in steps else np.arange(n)
            bucket = np.minimum(step * self.buckets // n, self.buckets - 1)
            latency = steps["latency_us"].to_numpy() / 1e3
            means = [latency[bucket == b].mean() for b in range(self.buckets)]
            bounds = [(int(step[bucket == b].min()), int(step[bucket == b].max()))
                      for b in range(self.buckets)]
            labels = [f"steps {lo}-{hi} (ms)" for lo, hi in bounds]
            if names is None:
                names = labels
            elif labels != names:  # traces of different lengths: name the parts generically
                names = [f"part {b + 1}/{self.buckets} (ms)" for b in range(self.buckets)]
            rows.append({**{k: row[k] for k in keys}, TRACE: row[TRACE],
                         "decode_steps": n, **{f"_b{b}": m for b, m in enumerate(means)},
                         "last_over_first": means[-1] / means[0], "n_traces": 1})
        table = pd.DataFrame(rows).rename(columns={f"_b{b}": name
                                                   for b, name in enumerate(names or [])})
        table = _with_average(table, keys)
        return table

    def draw(self, results: Results) -> list[Path]:
        return atomic_write_table(self.table(results), results.out_dir / self.stem)
