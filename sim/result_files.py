"""The names of an experiment's result files, shared by their writer and their readers.

:mod:`sim.experiment.store` and the pass group write them; :class:`sim.figures.base.Results`
and the figures read them. Layout of a results directory (``<output>/``)::

    experiment.yaml                  the experiment as given (``kvsim plot`` reads its figures)
    .kvsim-run.lock                  held by the ``kvsim run`` writing here (empty but its pid)
    summary.csv, summary.md          one row per run: label, sweep axes, summary metrics
    accuracy_vs_latency.png / .pdf   the default plot
    figures/                         the experiment's ``figures:`` (PNG + PDF, tables as CSV + MD)
    runs/<run_id>/run.yaml           the run's exact resolved settings (run_id hashes them)
    runs/<run_id>/summary.json       its summary row
    runs/<run_id>/accuracy.parquet   (step, layer, q_head) accuracy records
    runs/<run_id>/clusters.parquet   (step, layer, kv_head) group count and intra-cluster
                                     variance (policies with groups only)
    runs/<run_id>/steps.parquet      per-step latency breakdown, I/O and DRAM records
    runs/<run_id>/io_sizes.csv       flash read command size distribution
    runs/<run_id>/run_lengths.csv    contiguous flash access lengths (entries)

and, when the experiment's ``record:`` block asks for them (:class:`sim.config.RecordSpec`)::

    runs/<run_id>/cluster_labels.parquet  (step, position, group) of one KV head
    runs/<run_id>/cluster_keys.parquet    that head's keys on their first two principal axes
    runs/<run_id>/coretrieval.npy         that head's prefill-cluster co-retrieval counts
    runs/<run_id>/cluster_record.json     what the figures need to read the three above
    runs/<run_id>/update_retrieval.csv    P(an updated cluster is retrieved within t steps)

when it asks for the flash schedule (``record_io:``, :mod:`sim.replay.io_record`)::

    runs/<run_id>/io_schedule.json        the schedule's version, sampled steps, device, areas
    runs/<run_id>/io_batches.parquet      each submitted batch: step, layer, purpose, simulated
                                          issue and completion time
    runs/<run_id>/io_commands.parquet     each command: batch, step, layer, write, offset, size

a closed-loop run (``closed_loop:``, :mod:`sim.experiment.closed_loop`) has run.yaml,
summary.json and instead of the replay's records::

    runs/<run_id>/closed_loop.csv         perplexity: per position bucket and over all, mean
                                          NLL and perplexity under the policy and under full
                                          attention, and their ratio; needle: per needle its
                                          depth, start position, fact, expected code, the
                                          answers under the policy and under full attention
                                          and whether each is exactly right
    runs/<run_id>/tokens.parquet          per continuation position: the token and its NLL
                                          under both (perplexity), or both greedy tokens
                                          (agreement; generation: with the full-attention
                                          model's NLL of each, and the loop's own); none for
                                          needle
    runs/<run_id>/closed_loop.csv         generation: per position bucket and over all,
                                          agreement, both texts' mean NLL under full
                                          attention and attention recall in the loop
    runs/<run_id>/loop_accuracy.parquet   generation: (step, layer, q_head) accuracy of the
                                          selection in the loop, on the scored steps

and once ``kvsim replay`` has executed that schedule on real storage (:mod:`sim.io_replay`)::

    runs/<run_id>/io_replay.csv           measured against simulated I/O time per step and layer
    runs/<run_id>/io_replay_steps.csv     the same per step
    runs/<run_id>/io_replay.md            the summary: totals, per layer, correlation, limits
    runs/<run_id>/io_replay.png / .pdf    measured against simulated I/O time per step
"""

from __future__ import annotations

EXPERIMENT = "experiment.yaml"
RUN_LOCK = ".kvsim-run.lock"
PROGRESS_DIR = ".progress"  # workers' progress reports while a run is going
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
DEFAULT_PLOT = "accuracy_vs_latency"  # stem: .png and .pdf
FIGURES_DIR = "figures"
RUNS_DIR = "runs"

# in each run directory
RUN_SETTINGS = "run.yaml"
RUN_SUMMARY = "summary.json"
ACCURACY = "accuracy.parquet"
CLUSTERS = "clusters.parquet"
STEPS = "steps.parquet"
IO_SIZES = "io_sizes.csv"
CLOSED_LOOP_TABLE = "closed_loop.csv"
CLOSED_LOOP_TOKENS = "tokens.parquet"
LOOP_ACCURACY = "loop_accuracy.parquet"
#: ``closed_loop.save_trace``: the run's own trace (a trace directory) and its selections
CLOSED_LOOP_TRACE = "trace"
CLOSED_LOOP_SELECTIONS = "selections.parquet"
#: a closed-loop summary's metric columns, per task
CLOSED_LOOP_COLUMNS = {
    "perplexity": ["task", "tokens", "mean_nll", "perplexity", "mean_nll_full",
                   "perplexity_full", "ppl_ratio", "quality", "recall_open_loop",
                   "topk_recall_open_loop", "decode_s", "hook_s"],
    "agreement": ["task", "tokens", "first_divergence", "match_share", "decode_s", "hook_s"],
    "generation": ["task", "tokens", "first_divergence", "match_share", "mean_nll",
                   "mean_nll_full", "ppl_ratio", "loop_recall", "loop_recall_last",
                   "loop_topk_recall", "recall_every", "decode_s", "hook_s", "recall_s"],
    "needle": ["task", "context_len", "needles", "accuracy", "accuracy_full", "accuracy_ratio",
               "decode_s", "hook_s"],
}
RUN_LENGTHS = "run_lengths.csv"

# optional records (``record:``)
CLUSTER_LABELS = "cluster_labels.parquet"
CLUSTER_KEYS = "cluster_keys.parquet"
CORETRIEVAL = "coretrieval.npy"
CLUSTER_RECORD = "cluster_record.json"
UPDATE_RETRIEVAL = "update_retrieval.csv"

# the flash schedule (``record_io:``) and its replay on real storage (``kvsim replay``)
IO_SCHEDULE = "io_schedule.json"
IO_BATCHES = "io_batches.parquet"
IO_COMMANDS = "io_commands.parquet"
IO_REPLAY = "io_replay"  # stem: .csv (per step and layer), .md, .png, .pdf
IO_REPLAY_STEPS = "io_replay_steps.csv"
