"""Run summaries: the one place where summary metric names, units and definitions live.

Units, one convention per quantity and always in the column name: time in ``_us`` (records) or
``_ms`` (summaries); data volumes and DRAM use in decimal megabytes (``_mb``, 1e6 bytes) and
bandwidths in ``_mb_s`` (1e6 bytes/s, for flash and DRAM alike), so volume / time needs no
conversion; the size of one flash command in ``_kib`` (1024 bytes), since commands are whole
4 KiB pages; counts name what they count (``_commands``, ``_entries``).

Definitions (kvsim's own; the accuracy ones are derived in :mod:`sim.metrics.accuracy`, with
why each is measured):

* ``attention_recall``: share of the exact softmax attention mass on the attended entries;
  averaged over (step, layer, query head); ``_p10`` is the 10th percentile.
* ``retrieval_recall_mean``: ``attention_recall`` averaged over the layers the policy decides
  only, leaving out a model's own sliding-window layers (Gemma 3's local layers, exact by
  construction); equal to ``attention_recall_mean`` for models without them.
* ``topk_recall``: overlap of the selection with the exact top-k at the same size.
* ``output_rel_error``: relative L2 error of the attention output.
* ``accuracy_every``: ``k`` of the experiment's ``accuracy_every``: the accuracy columns
  above average decode steps ``0, k, 2k, ...`` only (1: every step).
* ``latency_ms_*``: simulated per-token decode latency (all layers); the breakdown columns are
  per-token means of time the decode process spent in each phase (they add up to the latency).
* ``read_amplification``: bytes read from flash / bytes of the requested entries.
* ``effective_bandwidth_mb_s``: bytes of requested entries read / time a read batch was in flight.
* ``hit_rate``: selected entries attended from DRAM without a flash read / selected entries
  (``(selected_entries - selected_misses) / selected_entries``): cache hits plus what the
  policy or layout holds in DRAM outside the cache (its sinks and window, split and write
  buffers).
* ``swap_read_mb_per_token`` / ``swap_write_mb_per_token``: per-layer cache swapping
  (``pipeline.swap_layers``): bytes of cache images read back / of newly resident entries
  written out, per decoded token (0 without swapping); not part of ``read_mb_per_token``.
* ``peak_dram_mb`` / ``mean_dram_mb``: largest / mean DRAM footprint at a step's end: the
  DRAM cache, the policy's index, split and write buffers, the policy's DRAM window (sinks,
  recent or unclustered window, an eviction policy's kept set) and the layers attended wholly
  from DRAM (full attention, sliding windows); defined part by part in :mod:`sim.footprint`.
  ``dram_<part>_mb``: the mean of each part over the steps (they add up to ``mean_dram_mb``).
* ``cache_capacity_mb``: the cache capacity the run used (split over every simulated layer),
  as configured or, with ``cache.dram_total``, as resolved; ``dram_target_mb``: that target
  (NaN for a run sized by ``cache.capacity``).
* ``intra_cluster_variance_mean``: mean over (step, layer, KV head) of the mean intra-cluster
  key variance (``sim.metrics.clusters``); NaN for policies without groups.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.footprint import PARTS
from sim.outputs import PolicyPass, SimResult

MB = 1e6

SUMMARY_COLUMNS = (
    "run",
    "policy",
    "attention_recall_mean",
    "attention_recall_p10",
    "retrieval_recall_mean",
    "topk_recall_mean",
    "output_rel_error_mean",
    "accuracy_every",
    "latency_ms_mean",
    "latency_ms_p50",
    "latency_ms_p99",
    "dense_ms",
    "scoring_ms",
    "io_wait_ms",
    "attention_ms",
    "read_mb_per_token",
    "read_commands_per_token",
    "mean_io_kib",
    "swap_read_mb_per_token",
    "swap_write_mb_per_token",
    "read_amplification",
    "effective_bandwidth_mb_s",
    "hit_rate",
    "peak_dram_mb",
    "mean_dram_mb",
    *(f"dram_{part}_mb" for part in PARTS),
    "cache_capacity_mb",
    "dram_target_mb",
    "intra_cluster_variance_mean",
)


def summarize(
    run: str, pp: PolicyPass, sim: SimResult, dram_target_bytes: int | None = None
) -> dict[str, float | str]:
    """One summary row of a run (see the module docstring for every definition);
    ``dram_target_bytes``: the run's ``cache.dram_total``, if it was sized by one."""
    acc, steps = pp.accuracy, sim.steps
    latency_ms = steps["latency_us"].to_numpy() / 1e3
    read_bytes = steps["read_bytes"].sum()
    useful = steps["useful_read_bytes"].sum()
    commands = steps["read_commands"].sum()
    selected = steps["selected_entries"].sum()
    busy_us = steps["read_busy_us"].sum()
    return {
        "run": run,
        "policy": pp.policy.name,
        "attention_recall_mean": float(acc["attention_recall"].mean()),
        "attention_recall_p10": float(acc["attention_recall"].quantile(0.10)),
        "retrieval_recall_mean": retrieval_recall(pp),
        "topk_recall_mean": float(acc["topk_recall"].mean()),
        "output_rel_error_mean": float(acc["output_rel_error"].mean()),
        "accuracy_every": int(pp.accuracy_every),
        "latency_ms_mean": float(latency_ms.mean()),
        "latency_ms_p50": float(np.percentile(latency_ms, 50)),
        "latency_ms_p99": float(np.percentile(latency_ms, 99)),
        "dense_ms": float(steps["dense_us"].mean() / 1e3),
        "scoring_ms": float(steps["scoring_us"].mean() / 1e3),
        "io_wait_ms": float(steps["io_wait_us"].mean() / 1e3),
        "attention_ms": float(steps["attention_us"].mean() / 1e3),
        "read_mb_per_token": float(read_bytes / len(steps) / MB),
        "read_commands_per_token": float(commands / len(steps)),
        "mean_io_kib": float(read_bytes / commands / 1024) if commands else 0.0,
        "swap_read_mb_per_token": float(steps["swap_read_bytes"].sum() / len(steps) / MB),
        "swap_write_mb_per_token": float(steps["swap_write_bytes"].sum() / len(steps) / MB),
        "read_amplification": float(read_bytes / useful) if useful else float("nan"),
        "effective_bandwidth_mb_s": float(useful / busy_us) if busy_us else float("nan"),
        "hit_rate": (
            float((selected - steps["selected_misses"].sum()) / selected)
            if selected else float("nan")
        ),
        "peak_dram_mb": float(steps["dram_bytes"].max() / MB),
        "mean_dram_mb": float(steps["dram_bytes"].mean() / MB),
        **{f"dram_{part}_mb": float(steps[f"dram_{part}_bytes"].mean() / MB) for part in PARTS},
        "cache_capacity_mb": float(sim.totals["cache_capacity_bytes"] / MB),
        "dram_target_mb": float("nan") if dram_target_bytes is None else dram_target_bytes / MB,
        "intra_cluster_variance_mean": (
            float(pp.clusters["intra_cluster_variance"].mean())
            if not pp.clusters.empty else float("nan")
        ),
    }


def retrieval_recall(pp: PolicyPass) -> float:
    """``retrieval_recall_mean`` of a pass (see the module docstring)."""
    windowed = [i for i, sel in enumerate(pp.selections) if getattr(sel, "window", None)]
    acc = pp.accuracy
    if windowed:
        acc = acc[~acc["layer"].isin(windowed)]
    return float(acc["attention_recall"].mean()) if len(acc) else float("nan")


DISPLAY_COLUMNS = {
    "run": "run",
    "attention_recall_mean": "recall",
    "topk_recall_mean": "top-k recall",
    "output_rel_error_mean": "out err",
    "latency_ms_mean": "latency ms",
    "io_wait_ms": "io wait ms",
    "read_mb_per_token": "read MB/tok",
    "read_commands_per_token": "cmds/tok",
    "mean_io_kib": "I/O KiB",
    "hit_rate": "hit rate",
    "peak_dram_mb": "DRAM MB",
}


#: the printed table of a closed-loop run (sim.experiment.closed_loop): summary column -> header
CLOSED_LOOP_DISPLAY = {
    "task": "task", "tokens": "tokens", "perplexity": "ppl", "perplexity_full": "ppl_full",
    "ppl_ratio": "ppl_ratio", "first_divergence": "first_divergence",
    "match_share": "match_share", "quality": "quality", "recall_open_loop": "recall_open",
    "loop_recall": "loop_recall", "loop_recall_last": "loop_recall_last",
    "context_len": "context", "needles": "needles", "accuracy": "accuracy",
    "accuracy_full": "acc_full", "accuracy_ratio": "acc_ratio", "decode_s": "decode_s",
}


def format_table(summary: pd.DataFrame, axes: list[str] | tuple[str, ...] = ()) -> str:
    """The results table printed after a run (a subset of the summary, rounded); ``axes``: the
    sweep's columns, shown after the run label."""
    metrics = DISPLAY_COLUMNS if "task" not in summary else CLOSED_LOOP_DISPLAY
    columns = {"run": "run", **{a: a for a in axes}, **metrics}
    columns = {key: name for key, name in columns.items() if key in summary}
    shown = summary[list(columns)].rename(columns=columns)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")
