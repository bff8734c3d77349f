"""What a run produces: the policy pass's result, the replay's result and their column schemas.

A low module on purpose: the records and summaries (:mod:`sim.metrics.records`), the figures and
the experiment runner read these types without importing the pass (:mod:`sim.policy_pass`) or
the SimPy replay (:mod:`sim.replay`) that fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sim.model import ModelGeometry
from sim.policies.base import LayerSelection, RetrievalPolicy

#: Accuracy record columns, one row per (step, layer, query head); each is defined in
#: :mod:`sim.metrics.accuracy`, whose :func:`~sim.metrics.accuracy.layer_accuracy` returns them.
ACCURACY_COLUMNS = ("attention_recall", "topk_recall", "output_rel_error", "n_selected")

#: Per-decode-step record columns of the replay (times in us, sizes in bytes, counts).
#: ``held_entries``: looked-up entries (selected, or read without being attended) that DRAM
#: holds outside the cache (a policy's sinks and window, split and write buffers): neither
#: hits nor misses, so ``hits + misses + held_entries = selected_entries + extra_entries``.
#: ``selected_misses``: the misses among the selected entries (``misses`` also counts the
#: extra reads'). ``dram_bytes`` is the DRAM footprint at the step's end and the
#: ``dram_<part>_bytes`` its parts, which add up to it (defined in :mod:`sim.footprint`).
STEP_COLUMNS = (
    "latency_us",
    "dense_us",
    "scoring_us",
    "io_wait_us",
    "attention_us",
    "read_busy_us",
    "index_read_bytes",
    "read_bytes",
    "useful_read_bytes",
    "read_commands",
    "write_bytes",
    "write_commands",
    "selected_entries",
    "extra_entries",
    "relocated_entries",
    "hits",
    "misses",
    "streamed",
    "dram_bytes",
    "swap_read_bytes",
    "swap_write_bytes",
    "held_entries",
    "selected_misses",
    "dram_cache_bytes",
    "dram_index_bytes",
    "dram_buffer_bytes",
    "dram_window_bytes",
    "dram_dense_bytes",
)


@dataclass
class PolicyPass:
    """Device-independent result of a policy over a trace.

    ``selections[l]``: the policy's decisions for trace layer ``l``; ``accuracy``: one row per
    (step, layer, query head) with the columns of :data:`ACCURACY_COLUMNS`; ``clusters``: one
    row per (step, layer, KV head) with ``n_groups`` and ``intra_cluster_variance`` (see
    :mod:`sim.metrics.clusters`), empty for policies without groups; ``accuracy_every``: the
    accuracy rows are those of decode steps ``0, k, 2k, ...`` (1: every step).
    """

    policy: RetrievalPolicy
    prompt_len: int
    decode_steps: int
    trace_model: ModelGeometry
    selections: list[LayerSelection]
    accuracy: pd.DataFrame
    wall_s: float
    clusters: pd.DataFrame = field(default_factory=pd.DataFrame)
    accuracy_every: int = 1


@dataclass
class SimResult:
    """Per-step records plus run-wide distributions of one simulation."""

    steps: pd.DataFrame  # "step" then the columns of STEP_COLUMNS
    io_sizes: pd.DataFrame  # size_bytes, commands
    run_lengths: pd.DataFrame  # run_entries, runs (contiguous requested entries on flash)
    totals: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    #: the flash schedule of the sampled steps (an :class:`sim.replay.io_record.IoSchedule`)
    #: when the run recorded one (``record_io:``), else None
    io_schedule: Any = None
