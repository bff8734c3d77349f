"""The policy pass: a trace and a policy in, selections and accuracy out; no device.

kvsim keeps accuracy and latency apart in two passes. This one walks the trace layer by layer
(one layer's arrays in memory at a time), asks the policy for its selections and scores them
against exact attention (:mod:`sim.metrics.accuracy`). What a policy selects depends on the
trace only, never on the device, the cache or simulated time, so the pass is pure numpy and its
result (:class:`sim.outputs.PolicyPass`) is computed once and replayed on every device, layout
and cache of a hardware sweep by :func:`sim.replay.simulate`.

Sliding-window layers (Gemma 3's local layers; the trace manifest's ``model.sliding_window``
lists a window per layer, ``null`` for a global one): their attention is the model's own, not a
retrieval decision. The pass never asks the policy about them: their selection is
:meth:`LayerSelection.sliding_window` (the last ``w`` positions, current token included) and
the accuracy reference is windowed attention, so they score recall 1.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from sim.errors import KvsimError
from sim.metrics.accuracy import layer_accuracy
from sim.metrics.clusters import cluster_variance
from sim.outputs import ACCURACY_COLUMNS, PolicyPass
from sim.policies.base import HeadSelections, LayerContext, LayerSelection, RetrievalPolicy
from sim.progress import progress as progress_bar
from sim.trace.format import Trace


def sliding_windows(trace: Trace) -> list[int | None]:
    """Each trace layer's sliding window from the manifest (``None``: global attention).

    Raises KvsimError if ``model.sliding_window`` is present but not one integer >= 1 or
    ``null`` per layer.
    """
    n_layers = trace.model.n_layers
    windows = trace.manifest["model"].get("sliding_window")
    if windows is None:
        return [None] * n_layers

    def valid(w: object) -> bool:
        return w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 1)

    if not isinstance(windows, list) or len(windows) != n_layers or not all(map(valid, windows)):
        raise KvsimError(
            f"trace {trace.path.name}: model.sliding_window must list {n_layers} windows (an "
            f"integer >= 1, or null for a global layer), got {windows!r}"
        )
    return list(windows)


def _layer_pass(
    trace: Trace, policy: RetrievalPolicy, seed: int, layer: int, accuracy_every: int = 1
) -> tuple[LayerSelection, pd.DataFrame, pd.DataFrame | None]:
    """Selections, accuracy records and cluster records of one trace layer."""
    # float32 copies of one layer (a few MB); the trace itself stays memory-mapped.
    keys = np.asarray(trace.keys(layer), dtype=np.float32)
    queries = np.asarray(trace.decode_queries(layer), dtype=np.float32)
    ctx = LayerContext(
        layer=layer,
        keys=keys,
        queries=queries,
        prompt_len=trace.prompt_len,
        # one stream per layer: results do not depend on the order layers are visited
        rng=np.random.default_rng([seed, layer]),
        stored_queries=trace.queries(layer),
        query_start=trace.query_start,
        speculative_queries=(
            None if (spec := trace.speculative_queries(layer)) is None
            else np.asarray(spec, dtype=np.float32)
        ),
    )
    window = sliding_windows(trace)[layer]
    if window is not None:  # the model's own local attention: no retrieval to decide
        selection = LayerSelection.sliding_window(ctx, window)
    else:
        try:
            selection = policy.select_layer(ctx)
        except ValueError as exc:  # the policy's settings do not fit this trace
            raise KvsimError(f"policy {policy.name!r} on trace layer {layer}: {exc}") from None
    scores = layer_accuracy(
        queries, keys, trace.values(layer), trace.prompt_len, selection, window=window,
        every=accuracy_every,
    )
    n_q, steps = queries.shape[0], queries.shape[1]
    scored = np.arange(0, steps, accuracy_every, dtype=np.int32)
    frame = pd.DataFrame(
        {
            "step": np.tile(scored, n_q),
            "layer": np.full(n_q * len(scored), layer, dtype=np.int16),
            "q_head": np.repeat(np.arange(n_q, dtype=np.int16), len(scored)),
        }
    )
    for column in ACCURACY_COLUMNS:
        frame[column] = np.asarray(scores[column]).reshape(-1)
    groups = cluster_variance(keys, trace.prompt_len, selection)
    clusters = None
    if groups is not None:
        variance, n_groups = groups
        n_kv = variance.shape[0]
        clusters = pd.DataFrame(
            {
                "step": np.tile(np.arange(steps, dtype=np.int32), n_kv),
                "layer": np.full(n_kv * steps, layer, dtype=np.int16),
                "kv_head": np.repeat(np.arange(n_kv, dtype=np.int16), steps),
                "n_groups": n_groups.reshape(-1),
                "intra_cluster_variance": variance.reshape(-1),
            }
        )
    return compact_selection(selection, trace.n_positions), frame, clusters


def compact_selection(selection: LayerSelection, n_positions: int) -> LayerSelection:
    """``selection`` with its per-step positions (attended, extra reads, split buffers) in the
    smallest unsigned dtype holding ``n_positions`` (:meth:`HeadSelections.compacted`): every
    layer's selections are held until the replay, and at thousands of decode steps they are
    most of a run's memory (7168 steps x 90 KV heads x ~400 entries: ~1 GB as int32). Values,
    offsets and everything else are unchanged; a head list shared between KV heads stays
    shared."""
    def compact(heads: list[HeadSelections] | None) -> list[HeadSelections] | None:
        if heads is None:
            return None
        done: dict[int, HeadSelections] = {}
        return [done.setdefault(id(h), h.compacted(n_positions)) for h in heads]

    return dataclasses.replace(
        selection, heads=compact(selection.heads), extra_reads=compact(selection.extra_reads),
        split_buffers=compact(selection.split_buffers),
    )


def run_policy_pass(
    trace: Trace,
    policy: RetrievalPolicy,
    seed: int,
    progress: bool = False,
    workers: int | None = None,
    accuracy_every: int = 1,
    on_layer: Callable[[], None] | None = None,
) -> PolicyPass:
    """Selections and accuracy of ``policy`` on every layer of ``trace``.

    Layers are independent, so ``workers`` threads (default: up to 2, the cores of a phone-
    simulation laptop) process them concurrently; numpy, BLAS and scikit-learn release the GIL
    in their kernels. Each layer's math runs single-threaded, which keeps results bit-identical
    whatever the number of workers, and at most ``workers`` layers are in memory at once.
    ``accuracy_every``: accuracy records of decode steps ``0, k, 2k, ...`` only (see
    :func:`sim.metrics.accuracy.layer_accuracy`); selections cover every step.
    ``on_layer``: called (in this thread) each time a layer is done, for progress reports.
    """
    if getattr(policy, "needs_speculative_queries", False):
        gap = getattr(trace, "speculative_gap", None)
        if gap:
            raise KvsimError(f"policy {policy.name!r} needs speculative queries: {gap}")
    started = time.perf_counter()
    workers = workers or min(2, os.cpu_count() or 1)
    n_layers = trace.model.n_layers
    by_layer: dict[int, tuple[LayerSelection, pd.DataFrame, pd.DataFrame | None]] = {}
    bar = progress_bar(n_layers, f"{policy.name}: policy pass", "layer", enabled=progress)
    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(_layer_pass, trace, policy, seed, layer, accuracy_every): layer
            for layer in range(n_layers)
        }
        for future in as_completed(futures):
            by_layer[futures[future]] = future.result()
            bar.update()
            if on_layer is not None:
                on_layer()
    bar.close()
    results = [by_layer[layer] for layer in range(n_layers)]
    return PolicyPass(
        policy=policy,
        prompt_len=trace.prompt_len,
        decode_steps=trace.decode_steps,
        trace_model=trace.model,
        selections=[result[0] for result in results],
        accuracy=pd.concat([result[1] for result in results], ignore_index=True),
        wall_s=time.perf_counter() - started,
        clusters=pd.concat([result[2] for result in results if result[2] is not None]
                           or [pd.DataFrame()], ignore_index=True),
        accuracy_every=accuracy_every,
    )
