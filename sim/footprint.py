"""A run's DRAM footprint: what the modelled phone holds in DRAM, in parts, and the cache
capacity that makes a policy's total equal a target (``cache.dram_total``).

Every decode step's footprint is measured at its end (every layer's new token appended) and
summed over the simulated layers and KV heads, in bytes; the parts, each a step column
``dram_<part>_bytes``, add up exactly to ``dram_bytes``:

* ``cache``: entries resident in the layers' DRAM caches (with ``pipeline.swap_layers``, the
  step's largest pair of resident layer images instead of every layer's cache);
* ``index``: the policy's index vectors (cluster representatives, page bounds, codebooks and
  codes, partial keys, token_topk's keys; ``LayerSelection.index_vectors``) at one key's size
  each; with ``pipeline.stream_index`` only the largest layer's is resident;
* ``buffer``: DynaKV's delayed-split buffers (``LayerSelection.split_buffers``) and the
  layouts' page-aligned write buffers (entries not yet on flash);
* ``window``: KV entries the policy holds outside the cache by design: its forced sinks and
  recent window, ClusterKV's unclustered window (``dram_sinks`` / ``dram_tail``), or the kept
  set of an eviction policy (``kept_in_dram``: H2O, StreamingLLM), each with the new token;
* ``dense``: layers attended wholly from DRAM: full attention (the reference, a policy's dense
  first layers) and the model's own sliding-window layers.

An entry is counted once, in the first part that holds it in the order window, buffer, cache:
the replay never inserts an entry the policy or a layout holds into the cache, and what the
policies hold is only the prompt's sinks and window or newly appended tokens, never a cached one.
Buffers, windows and sinks are attended from DRAM: they are neither cache hits nor flash reads
(step column ``held_entries``).

Equal total DRAM (:func:`resolve_cache_capacity`): everything but the cache is known from the
policy pass (the write buffers by their bound, :meth:`FlashLayout.max_buffered_entries`), so
the cache gets what the target leaves at the step where the rest peaks: each layer with a cache
holds ``(target - peak of the rest) / (layers with a cache)`` (with ``swap_layers``: over
two resident images) whole entries, and the run's total DRAM never exceeds the target. A
target below the rest's peak is an error naming the policy and that minimum. Before any pass,
:func:`floor_lower_bound` bounds the same minimum from the policy's settings and the trace's
shape, so a hopeless target fails before any work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sim.errors import ConfigError
from sim.kv.layouts import LAYOUTS, engine_layout_spec
from sim.model import ModelGeometry, kv_dtype_bytes, trace_head_map, trace_layer_map

if TYPE_CHECKING:
    from sim.outputs import PolicyPass
    from sim.policies.base import LayerSelection, RetrievalPolicy
    from sim.replay import SimSetup

#: the parts of ``dram_bytes``, in the order of their step columns ``dram_<part>_bytes``
PARTS = ("cache", "index", "buffer", "window", "dense")
PART_COLUMNS = tuple(f"dram_{part}_bytes" for part in PARTS)

MB = 1e6


def window_entries(sinks: int, tail: int | np.ndarray | None, context: int | np.ndarray):
    """Entries per KV head in a policy's DRAM window at the end of a decode step whose stored
    context is ``context`` (``P + s``): ``[0, sinks) U [tail, context]``, the appended token
    (position ``context``) included when there is a window (``tail`` not ``None``). Works
    elementwise on arrays of ``tail`` and ``context``."""
    held_sinks = np.minimum(sinks, np.asarray(context) + 1)
    if tail is None:
        return held_sinks
    return held_sinks + np.asarray(context) + 1 - np.maximum(tail, held_sinks)


def resident_entries(
    selection: LayerSelection, prompt_len: int, decode_steps: int, per_trace_head: np.ndarray
) -> np.ndarray:
    """Entries a resident layer attends and holds at each decode step, summed over the
    simulated KV heads (``per_trace_head[t]``: how many replay trace KV head ``t``): the whole
    context with the current token (full attention), at most the window (a sliding window),
    or the kept set with the current token (``kept_in_dram``)."""
    context = prompt_len + np.arange(decode_steps, dtype=np.int64) + 1
    n_heads = int(per_trace_head.sum())
    if selection.kept_in_dram:
        assert selection.heads is not None  # a kept set is a selection
        counts = np.stack([head.counts() for head in selection.heads])  # (H_trace, S)
        return per_trace_head @ (counts + 1)
    if selection.window is not None:
        return np.minimum(selection.window, context) * n_heads
    return context * n_heads


class StaticFootprint:
    """The parts of a run's footprint the policy pass decides (no replay needed), per decode
    step, in bytes: ``index``, ``window``, ``dense`` and ``split`` (the split buffers' entries
    outside the window, part of ``buffer``). Also, per simulated layer, the resident entries
    of the layers without a cache (``resident[layer]``, ``None`` for a layer with one)."""

    def __init__(self, pp: PolicyPass, target: ModelGeometry, kv_dtype: str,
                 stream_index: bool) -> None:
        layer_map = trace_layer_map(target, pp.trace_model)
        head_map = trace_head_map(target, pp.trace_model)
        per_trace_head = np.bincount(head_map, minlength=pp.trace_model.n_kv_heads)
        n_heads, steps = target.n_kv_heads, pp.decode_steps
        entry = target.entry_bytes(kv_dtype)
        vector = int(round(target.head_dim * kv_dtype_bytes(kv_dtype)))
        context = pp.prompt_len + np.arange(steps, dtype=np.int64)
        index = np.zeros((target.n_layers, steps), dtype=np.int64)
        window = np.zeros(steps, dtype=np.int64)
        dense = np.zeros(steps, dtype=np.int64)
        split = np.zeros(steps, dtype=np.int64)
        self.resident: list[np.ndarray | None] = []
        for layer, trace_layer in enumerate(layer_map.tolist()):
            selection = pp.selections[trace_layer]
            index[layer] = selection.index_vectors[head_map].sum(axis=0) * vector
            if selection.is_resident:
                entries = resident_entries(selection, pp.prompt_len, steps, per_trace_head)
                self.resident.append(entries)
                if selection.kept_in_dram:
                    window += entries * entry
                else:
                    dense += entries * entry
                continue
            self.resident.append(None)
            window += n_heads * entry * window_entries(
                selection.dram_sinks, selection.dram_tail, context
            )
            if selection.split_buffers is not None:
                for trace_head, buffers in enumerate(selection.split_buffers):
                    outside = outside_window(selection, buffers.positions, buffers.counts())
                    split += int(per_trace_head[trace_head]) * entry * outside
        self.index = index.max(axis=0) if stream_index else index.sum(axis=0)
        self.window, self.dense, self.split = window, dense, split

    def rest(self) -> np.ndarray:
        """Every part but the cache and the write buffers, per step (bytes)."""
        return self.index + self.window + self.dense + self.split


def outside_window(
    selection: LayerSelection, positions: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Per decode step, how many of its ``positions`` (``counts[s]`` of them for step ``s``,
    concatenated) lie outside the selection's DRAM window at the end of that step."""
    step_of = np.repeat(np.arange(len(counts)), counts)
    positions = np.asarray(positions, dtype=np.int64)
    outside = positions >= selection.dram_sinks
    if selection.dram_tail is not None:
        outside &= positions < selection.dram_tail[step_of]
    return np.bincount(step_of[outside], minlength=len(counts))


def write_buffer_bound(pp: PolicyPass, setup: SimSetup) -> int:
    """Bytes the layouts' write buffers may hold at once (their bound, summed over the
    simulated layers with a cache and their KV heads)."""
    target = setup.target
    entry = target.entry_bytes(setup.kv_dtype)
    spec = engine_layout_spec(
        setup.layout, pp.prompt_len + pp.decode_steps, entry,
        setup.device.flash.page_size_bytes,
    )
    layout = LAYOUTS.create(spec, where="layout")
    head_map = trace_head_map(target, pp.trace_model)
    total = 0
    for trace_layer in trace_layer_map(target, pp.trace_model).tolist():
        selection = pp.selections[trace_layer]
        if selection.is_resident:
            continue
        groups = selection.prefill_groups
        for trace_head in head_map.tolist():
            total += layout.max_buffered_entries(None if groups is None else groups[trace_head])
    return total * entry


def cache_layers(pp: PolicyPass, target: ModelGeometry) -> int:
    """Simulated layers with a DRAM cache (those not attended wholly from DRAM)."""
    layer_map = trace_layer_map(target, pp.trace_model)
    return sum(not pp.selections[t].is_resident for t in layer_map.tolist())


def below_floor(where: str, policy: str, target: int, floor: int, full_kv: int,
                exact: bool) -> ConfigError:
    """The one-line error of a total DRAM target below what ``policy`` holds without a
    cache (``exact``: the pass's peak; else a lower bound from its settings)."""
    bound = "at its peak" if exact else "at least"
    return ConfigError(
        f"{where}: cache.dram_total {target / MB:.4g} MB is below what {policy} holds in DRAM "
        f"without a cache (index, window, buffers, dense layers): {bound} {floor / MB:.4g} MB, "
        f"{floor / full_kv:.4g} of the full KV cache"
    )


def resolve_cache_capacity(pp: PolicyPass, setup: SimSetup, target_bytes: int,
                           where: str) -> int:
    """The ``cache_capacity_bytes`` (split over every simulated layer by the replay) that
    makes the run's total DRAM at most ``target_bytes`` at every step and equal to it when the
    caches are full at the step where the rest peaks (see the module docstring). Raises
    ConfigError if the rest alone exceeds the target."""
    target = setup.target
    entry = target.entry_bytes(setup.kv_dtype)
    static = StaticFootprint(pp, target, setup.kv_dtype, setup.pipeline.stream_index)
    floor = int(static.rest().max()) + write_buffer_bound(pp, setup)
    full_kv = (pp.prompt_len + pp.decode_steps) * target.kv_bytes_per_token(setup.kv_dtype)
    if target_bytes < floor:
        raise below_floor(where, pp.policy.name, target_bytes, floor, full_kv, exact=True)
    n_cached = cache_layers(pp, target)
    if n_cached == 0:
        return 0
    images = min(2, n_cached) if setup.pipeline.swap_layers else n_cached
    per_layer = (target_bytes - floor) // (entry * images)
    return int(per_layer * entry * target.n_layers)


def floor_lower_bound(
    policy: RetrievalPolicy,
    trace_model: ModelGeometry,
    windows: list[int | None],
    prompt_len: int,
    decode_steps: int,
    target: ModelGeometry,
    kv_dtype: str,
    stream_index: bool,
) -> int:
    """A lower bound on what ``policy`` holds in DRAM without a cache at the last decode step,
    from its settings and the trace's shape only (``windows``: each trace layer's sliding
    window or ``None``): dense and sliding-window layers exactly, the other layers' windows
    exactly (:meth:`RetrievalPolicy.dram_held_entries`) and their indexes by
    :meth:`RetrievalPolicy.index_floor`."""
    step = decode_steps - 1
    context = prompt_len + step
    n_heads, entry = target.n_kv_heads, target.entry_bytes(kv_dtype)
    vector = int(round(target.head_dim * kv_dtype_bytes(kv_dtype)))
    held = policy.dram_held_entries(prompt_len, step) * n_heads * entry
    index = policy.index_floor(prompt_len, step, trace_model.head_dim) * n_heads * vector
    total, indexes = 0, [0]
    for trace_layer in trace_layer_map(target, trace_model).tolist():
        window = windows[trace_layer]
        if window is not None:
            total += min(window, context + 1) * n_heads * entry
        elif policy.is_dense_layer(trace_layer):
            total += (context + 1) * n_heads * entry
        else:
            total += held
            indexes.append(index)
    return total + (max(indexes) if stream_index else sum(indexes))
