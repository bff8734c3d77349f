"""Helpers the summary figures share (no figure is registered here).

* axis and metric labels with units (:data:`METRIC_LABELS`, :func:`axis_label`);
* finding a sweep axis by its dotted key or its last part (:func:`axis_column`);
* metrics derived from each run's ``steps.parquet`` (:data:`STEP_METRICS`);
* row selection (``where``/``points`` options) and the one-row-per-key check;
* the "trace" grouping: every figure treats the ``trace`` column (model x text x lengths) as
  the replicate axis and shows the mean with the min-max range over traces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

from sim.errors import KvsimError
from sim.figures.base import Results
from sim.figures.style import OKABE_ITO

TRACE = "trace"
RUN = "run"

METRIC_LABELS = {
    "attention_recall_mean": "attention recall (share of mass)",
    "retrieval_recall_mean": "recall, retrieved layers (share of mass)",
    "attention_recall_p10": "attention recall, 10th percentile (share)",
    "topk_recall_mean": "top-k recall (share of exact top-k)",
    "output_rel_error_mean": "attention output error (relative L2)",
    "latency_ms_mean": "per-token latency (ms)",
    "latency_ms_p50": "per-token latency, median (ms)",
    "latency_ms_p99": "per-token latency, p99 (ms)",
    "dense_ms": "dense compute (ms/token)",
    "scoring_ms": "index scoring (ms/token)",
    "io_wait_ms": "flash I/O wait (ms/token)",
    "attention_ms": "attention (ms/token)",
    "read_mb_per_token": "KV transfer volume (MB/token)",
    "read_commands_per_token": "flash read commands (per token)",
    "mean_io_kib": "mean read command size (KiB)",
    "read_amplification": "read amplification (read / requested)",
    "effective_bandwidth_mb_s": "effective bandwidth (MB/s)",
    "hit_rate": "served from DRAM (share of selected entries)",
    "peak_dram_mb": "peak DRAM use (MB)",
    "mean_dram_mb": "mean DRAM use (MB)",
    "dram_cache_mb": "DRAM cache (MB)",
    "dram_index_mb": "DRAM index (MB)",
    "dram_buffer_mb": "DRAM buffers (MB)",
    "dram_window_mb": "DRAM window (MB)",
    "dram_dense_mb": "DRAM dense layers (MB)",
    "cache_capacity_mb": "cache capacity (MB)",
    "dram_target_mb": "total DRAM target (MB)",
    "intra_cluster_variance_mean": "intra-cluster key variance (squared key units)",
}

AXIS_LABELS = {  # key -> label; a fraction axis also has its label in % (x_percent)
    "policy.budget": "selected fraction of the context",
    "cache.capacity": "cache ratio (fraction of the full KV cache)",
    "cache.dram_total": "total DRAM (fraction of the full KV cache)",
    "cache.replacement": "cache replacement",
    "buffer_max": "delayed-split buffer size B_max (entries)",
    "device": "phone (device preset)",
    "device.flash.read_bandwidth_mb_s": "flash read bandwidth (MB/s)",
    "device.flash.queue_depth": "flash queue depth (commands)",
    "device.flash.page_size_bytes": "flash page size (bytes)",
    "device.dram.bandwidth_mb_s": "DRAM bandwidth (MB/s)",
    "device.flash.read_command_latency_us": "flash read command latency (us)",
    "device.flash.parallel_units": "flash parallel units",
    "trace.decode_from": "prompt length: decode starts at position",
    "trace.capture.decode_steps": "decode length (generated tokens)",
    "trace.capture.prompt_len": "prompt length (tokens)",
    "model": "simulated model (sizes)",
    "kv_dtype": "KV cache precision",
    "device.compute.weight_bits": "weight precision (bits per weight)",
}
PERCENT_LABELS = {
    "policy.budget": "selected share of the context (%)",
    "cache.capacity": "cache ratio (% of the full KV cache)",
    "cache.dram_total": "total DRAM (% of full KV)",
}


def _steps_mean(column: str) -> Callable[[pd.DataFrame], float]:
    return lambda steps: float(steps[column].mean())


# name -> (label with unit, function of a run's steps.parquet frame)
STEP_METRICS: dict[str, tuple[str, Callable[[pd.DataFrame], float]]] = {
    "misses_per_token": ("cache misses (entries/token)", _steps_mean("misses")),
    "hits_per_token": ("cache hits (entries/token)", _steps_mean("hits")),
    "forced_load_entries_per_token": (
        "forced-load entries (entries/token)", _steps_mean("extra_entries")
    ),
    "forced_load_entries": (
        "forced-load entries (total over the decode)",
        lambda steps: float(steps["extra_entries"].sum()),
    ),
    "write_mb_per_token": (
        "flash writes (MB/token)", lambda steps: float(steps["write_bytes"].mean() / 1e6)
    ),
}


def metric_label(metric: str) -> str:
    if metric in STEP_METRICS:
        return STEP_METRICS[metric][0]
    return METRIC_LABELS.get(metric, metric)


def axis_label(column: str, percent: bool = False) -> str:
    if percent:
        return PERCENT_LABELS.get(column, f"{axis_label(column)} (%)")
    return AXIS_LABELS.get(column) or AXIS_LABELS.get(column.rsplit(".", 1)[-1]) or column


def known_metric(metric: str) -> bool:
    return metric in STEP_METRICS or metric in METRIC_LABELS


def check_metrics(metrics: Iterable[str], figure: str) -> None:
    """Unknown metric names fail when the figure is built (so before any run)."""
    for metric in metrics:
        if not known_metric(metric):
            valid = ", ".join(sorted(METRIC_LABELS) + sorted(STEP_METRICS))
            raise ValueError(f"{figure}: unknown metric {metric!r}; valid: {valid}")


def require_rows(results: Results, figure: str) -> pd.DataFrame:
    summary = results.summary
    if summary.empty:
        raise KvsimError(f"{figure}: {results.dir}/summary.csv has no runs")
    missing = [c for c in (RUN, TRACE) if c not in summary]
    if missing:
        raise KvsimError(f"{figure}: summary.csv lacks column(s) {', '.join(missing)}")
    return summary.copy()


def axis_column(results: Results, key: str, figure: str) -> str:
    """The summary column of sweep axis ``key``: its dotted key, or the axis whose last part
    is ``key`` (``buffer_max`` finds ``policies.dynakv.buffer_max``); ``device`` and ``run``
    are columns of every summary."""
    columns = list(results.summary.columns)
    if key in columns and (key in results.axes or key in ("device", "model", RUN, TRACE)):
        return key
    suffix = [a for a in results.axes if a.rsplit(".", 1)[-1] == key and a in columns]
    if len(suffix) == 1:
        return suffix[0]
    if len(suffix) > 1:
        raise KvsimError(f"{figure}: {key!r} matches several sweep axes ({', '.join(suffix)}); "
                         "give the full dotted key")
    axes = ", ".join(results.axes) or "none"
    raise KvsimError(f"{figure}: the results have no sweep axis {key!r} (axes: {axes})")


def with_step_metrics(results: Results, frame: pd.DataFrame, metrics: Iterable[str]
                      ) -> pd.DataFrame:
    """``frame`` with a column per derived metric of :data:`STEP_METRICS` in ``metrics``."""
    derived = [m for m in metrics if m in STEP_METRICS]
    if not derived:
        return frame
    frame = frame.copy()
    cache: dict[str, pd.DataFrame] = {}
    for metric in derived:
        values = []
        for run_id in frame["run_id"]:
            if run_id not in cache:
                steps = results.records(run_id, "steps")
                if steps.empty:
                    raise KvsimError(f"{results.run_dir(run_id)}: no steps.parquet for "
                                     f"{metric}")
                cache[run_id] = steps
            values.append(STEP_METRICS[metric][1](cache[run_id]))
        frame[metric] = values
    return frame


def require_metrics(frame: pd.DataFrame, metrics: Iterable[str], figure: str) -> None:
    missing = [m for m in metrics if m not in frame]
    if missing:
        raise KvsimError(f"{figure}: summary.csv lacks metric column(s) {', '.join(missing)}")


def matches(series: pd.Series, value: Any) -> pd.Series:
    """Rows of ``series`` equal to ``value`` (a list: any of them); numbers compare as numbers,
    everything else by its text (``true`` in YAML matches ``True`` read back from CSV). An
    empty cell matches every value: the axis does not apply to that run (``full`` has no
    ``policy.budget``), so its one result stands for every point."""
    if isinstance(value, list):
        mask = pd.Series(False, index=series.index)
        for item in value:
            mask |= matches(series, item)
        return mask
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers = pd.to_numeric(series, errors="coerce")
        equal = pd.Series(np.isclose(numbers, value, rtol=1e-9, atol=0.0), index=series.index)
    else:
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        equal = series.astype(str) == str(value)
    return equal | series.isna()


def select(frame: pd.DataFrame, where: dict[str, Any], figure: str,
           results: Results | None = None) -> pd.DataFrame:
    """Rows matching every ``column: value`` of ``where`` (columns by dotted key or, with
    ``results``, by an axis's last part)."""
    for key, value in where.items():
        column = key if key in frame or results is None else axis_column(results, key, figure)
        if column not in frame:
            raise KvsimError(f"{figure}: where: no column {key!r} in summary.csv")
        frame = frame[matches(frame[column], value)]
    if frame.empty:
        raise KvsimError(f"{figure}: no run matches where={where}")
    return frame


def varying_axes(results: Results, frame: pd.DataFrame, exclude: Iterable[str]) -> list[str]:
    """Sweep axes (not the trace's own ``trace.*`` axes, nor ``exclude``) with more than one
    value among ``frame``'s rows: they split lines or rows further."""
    skip = set(exclude)
    out = []
    for axis in results.axes:
        if axis in skip or axis.startswith("trace.") or axis not in frame:
            continue
        if frame[axis].astype(str).nunique() > 1:
            out.append(axis)
    return out


def short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def key_label(values: Iterable[Any], columns: list[str]) -> str:
    """``dynakv, replacement=lru`` for the values of ``[run, cache.replacement]``."""
    parts: list[str] = []
    on: list[str] = []
    off: list[str] = []
    for column, value in zip(columns, values, strict=True):
        if isinstance(value, float) and math.isnan(value):
            continue
        if str(value) in ("True", "False"):  # a switch: named when on, left out when off
            (on if str(value) == "True" else off).append(short(column))
            continue
        parts.append(str(value) if column in (RUN, "cache.replacement", "device")
                     else f"{short(column)}={value}")
    label = " + ".join([", ".join(parts), *on] if parts else on)
    return label or ", ".join(f"no {name}" for name in off)


def one_row_per(frame: pd.DataFrame, keys: list[str], figure: str, hint: str) -> None:
    """KvsimError if two rows share ``keys`` (they differ in a column the figure ignores)."""
    duplicated = frame.duplicated(keys, keep=False)
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        shown = ", ".join(f"{k}={row[k]}" for k in keys)
        raise KvsimError(f"{figure}: several results for {shown}; {hint}")


def trace_names(traces: Iterable[str]) -> dict[str, str]:
    """Short names: the parts of ``model/text/prompt+decode`` that differ between traces."""
    traces = list(dict.fromkeys(str(t) for t in traces))
    split = [t.split("/") for t in traces]
    if len(traces) < 2 or len({len(s) for s in split}) != 1:
        return {t: t for t in traces}
    keep = [i for i in range(len(split[0])) if len({s[i] for s in split}) > 1]
    return {t: "/".join(s[i] for i in keep) for t, s in zip(traces, split, strict=True)}


def spread(frame: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """Per ``keys``: mean, min and max of ``metric`` over the rows (the traces), and their
    count (NaN values are left out)."""
    grouped = frame.groupby(keys, sort=False, dropna=False)[metric]
    out = grouped.agg(["mean", "min", "max", "count"]).reset_index()
    return out.rename(columns={"count": "n_traces"})


def colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def hatch(i: int) -> str:
    """Bars beyond the eight Okabe-Ito colours repeat them with a hatch."""
    return ("", "////", "....", "xxxx")[(i // len(OKABE_ITO)) % 4]


def bar_offsets(n_bars: int, span: float = 0.82) -> tuple[np.ndarray, float]:
    """Offsets of ``n_bars`` bars around a group's centre, and the width of one."""
    width = span / max(1, n_bars)
    return (np.arange(n_bars) - (n_bars - 1) / 2) * width, width


def pick_points(frame: pd.DataFrame, points: dict[str, dict[str, Any]], figure: str,
                results: Results) -> pd.DataFrame:
    """Rows kept per run label: ``points[label]`` (or ``points["default"]``) maps columns to
    the value the run is shown at, e.g. ``{default: {cache.replacement: lru}, dynakv:
    {cache.replacement: cluster_aligned}}``."""
    if not points:
        return frame
    kept = []
    for label, rows in frame.groupby(RUN, sort=False):
        where = points.get(str(label), points.get("default", {}))
        for key, value in where.items():
            column = key if key in rows else axis_column(results, key, figure)
            rows = rows[matches(rows[column], value)]
        if rows.empty:
            raise KvsimError(f"{figure}: run {label!r} has no result at {where}")
        kept.append(rows)
    return pd.concat(kept).sort_index()


def baseline_rows(frame: pd.DataFrame, baseline: str, figure: str, purpose: str
                  ) -> pd.DataFrame:
    """The rows of the baseline run: by run label, else by policy name."""
    rows = frame[frame[RUN].astype(str) == baseline]
    if rows.empty and "policy" in frame:
        rows = frame[frame["policy"].astype(str) == baseline]
        if rows[RUN].nunique() > 1:
            raise KvsimError(f"{figure}: several runs use policy {baseline!r} "
                             f"({', '.join(map(str, rows[RUN].unique()))}); name one by label")
    if rows.empty:
        runs = ", ".join(map(str, dict.fromkeys(frame[RUN])))
        raise KvsimError(f"{figure}: no {baseline} run to {purpose} (runs: {runs})")
    return rows


def run_order(frame: pd.DataFrame, runs: list[str], figure: str) -> list[str]:
    """The run labels to show, in order: ``runs`` if given (each must exist), else all."""
    present = [str(r) for r in dict.fromkeys(frame[RUN])]
    if not runs:
        return present
    missing = [r for r in runs if r not in present]
    if missing:
        raise KvsimError(f"{figure}: no run labelled {', '.join(missing)} "
                         f"(runs: {', '.join(present)})")
    return list(runs)
