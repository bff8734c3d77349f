"""The replay: a policy pass's selections stepped through a SimPy model of the phone.

For every decode step and every layer of the simulated model:

``dense (QKV projection) -> index scoring -> cache lookup -> flash reads -> attention over the
selected entries -> append the new token's K/V (written to flash, not awaited) -> dense (output
projection + MLP)``, and after the last layer, once per token, the final norm and the LM head
(:func:`sim.hardware.compute.lm_head_us`; none for a target without a vocabulary).

Reads of a policy whose selection does not need the current query are issued at the start of
the layer and overlap the QKV projection and scoring; otherwise they start after scoring. A
policy selecting one layer ahead (``selection_lead_layers = 1``, InfiniGen) scores layer
``l + 1``'s index and issues its reads during layer ``l``, right after its QKV projection
(layer 0 selects for itself first). The time the layer waits for its reads is the ``io_wait``
stall. Writes are not awaited but share the flash queue, units and link with later reads.

With ``pipeline.swap_layers`` each layer's cache lives on flash between its turns: its
image is read back while the previous layer runs, its lookup waits for it, and the entries
it gained are written back after it (see :class:`sim.config.PipelineSpec`).

What is simulated at prefill: nothing is timed. The prompt's K/V are on flash, laid out by the
layout; the DRAM cache starts empty (cold).

Sliding-window layers (Gemma 3's local layers; see :mod:`sim.policy_pass`) attend
``min(w, P + s + 1)`` entries per KV head from DRAM (a ring buffer of ``w`` entries per KV head,
counted in ``dram_bytes``): no index, no cache, no flash reads or writes, nothing to swap. A
simulated layer inherits the window of the trace layer it replays
(:func:`sim.model.trace_layer_map`), so a Gemma trace driving a deeper target model keeps
its local/global pattern spread over the target's depth. An eviction policy's kept set
(H2O, StreamingLLM: ``LayerSelection.kept_in_dram``) is attended the same way.

What a policy holds in DRAM outside the cache (its sinks and window, DynaKV's split buffers)
and what a layout's write buffer holds are attended from there: they are left out of the cache
lookup (neither hits nor misses: ``held_entries``), and a new token the policy or layout holds
is not inserted into the cache. The DRAM footprint and its parts are defined in
:mod:`sim.footprint`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np
import pandas as pd
import simpy

from sim.config import PipelineSpec
from sim.footprint import PART_COLUMNS, StaticFootprint
from sim.hardware import (
    DeviceParams,
    Flash,
    attention_us,
    dense_layer_us,
    lm_head_us,
    scoring_us,
)
from sim.kv.cache import LayerCache
from sim.kv.io_plan import plan_reads, plan_writes
from sim.kv.layouts import LAYOUTS, FlashLayout, engine_layout_spec, shared_slot_table
from sim.kv.replacement import REPLACEMENTS
from sim.model import ModelGeometry, kv_dtype_bytes, trace_head_map, trace_layer_map
from sim.outputs import STEP_COLUMNS, PolicyPass, SimResult
from sim.policies.base import LayerSelection, Relabel
from sim.progress import progress as progress_bar


@dataclass(frozen=True)
class SimSetup:
    """Everything the latency simulation needs besides the policy pass."""

    device: DeviceParams
    target: ModelGeometry
    kv_dtype: str
    cache_capacity_bytes: int
    replacement: dict
    layout: dict
    pipeline: PipelineSpec = PipelineSpec()


class ReadTiming(Enum):
    """When a simulated layer issues its cache lookup and flash reads; decided once per layer.

    The later the reads start, the less of the layer's own compute hides them; what remains is
    the layer's ``io_wait`` stall.
    """

    #: a resident layer (full attention or a sliding window): attended from DRAM, nothing read
    NONE = "none"
    #: a selection that needs no query (StreamingLLM): at the layer's start, overlapping the QKV
    #: projection and the scoring
    AT_LAYER_START = "at_layer_start"
    #: ``pipeline.overlap_transfer``: after Q's projection, so the scoring and K/V's projection
    #: overlap the transfer (clusters are fetched as they are ranked)
    DURING_PROJECTION = "during_projection"
    #: the default: once the layer's index is scored against its query
    AFTER_SCORING = "after_scoring"
    #: a lead policy (``selection_lead_layers``, InfiniGen) on a layer after the first: at the
    #: previous layer's speculation point, right after that layer's QKV projection and scoring
    BY_PREVIOUS_LAYER = "by_previous_layer"


@dataclass
class _PendingReads:
    """A layer's issued cache lookup and flash reads.

    ``attended``: entries the layer attends, ``None`` while a lookup deferred behind a swap-in
    has not run (see :meth:`Replay._lookup`; the event's value is then the entries).
    ``before``: with ``swap_layers``, the layer's resident entries before the lookup (flat
    indices ``head * n_positions + position``, what :meth:`Replay._swap_out` compares
    against); ``None`` otherwise.
    """

    event: simpy.Event
    attended: int | None
    before: np.ndarray | None


def _in_sorted(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """``np.isin(values, among)`` for a sorted, non-empty ``among`` (one binary search per
    value: cheaper than ``isin``'s general path on the replay's small arrays)."""
    found = among.searchsorted(values)
    np.minimum(found, len(among) - 1, out=found)
    return among[found] == values


class Replay:
    """The SimPy model of one run: a decode process on the CPU, the flash beside it."""

    def __init__(self, pp: PolicyPass, setup: SimSetup) -> None:
        self.pp = pp
        self.setup = setup
        target, dtype = setup.target, setup.kv_dtype
        flash_params = setup.device.flash
        self.env = simpy.Environment()
        self.flash = Flash(self.env, flash_params)
        self.compute, self.dram = setup.device.compute, setup.device.dram
        # the simulated model's layers and KV heads, each replaying one of the trace's
        self.layer_map = trace_layer_map(target, pp.trace_model)
        self.head_map = trace_head_map(target, pp.trace_model)
        self.n_layers, self.n_heads = target.n_layers, target.n_kv_heads
        # each simulated KV head's trace head, and the distinct ones (simulated heads that
        # replay one trace head select alike: their selections are computed once)
        self.trace_heads: list[int] = self.head_map.tolist()
        self.distinct_trace_heads = sorted(set(self.trace_heads))
        self.first_head = {t: self.trace_heads.index(t) for t in self.distinct_trace_heads}
        self.head_dim, self.queries_per_kv_head = target.head_dim, target.queries_per_kv_head
        self.entry_bytes = target.entry_bytes(dtype)
        self.vector_bytes = int(round(target.head_dim * kv_dtype_bytes(dtype)))
        self.page_bytes = flash_params.page_size_bytes
        self.max_io_bytes = flash_params.max_io_bytes
        self.n_positions = pp.prompt_len + pp.decode_steps
        self.head_offsets = np.arange(self.n_heads, dtype=np.int64) * self.n_positions
        # (selection, trace head) -> (step, split buffers at its end), see _split_buffered
        self.split_buffered: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
        self.dense_pre_us, self.dense_q_us, self.dense_post_us = self._dense_split()
        # once per token, after the last layer: final norm + LM head (none without a vocab)
        self.lm_head_us = lm_head_us(target.vocab_size, target.hidden, self.compute, self.dram)
        self.caches, self.layouts = self._caches_and_layouts()
        # each layer's flash slots, one row per trace head's layout (the rows shared with the
        # layouts, which keep placing into them), and the row of each simulated KV head
        self.slot_tables = [
            shared_slot_table([layouts[self.first_head[t]] for t in self.distinct_trace_heads])
            if layouts else None
            for layouts in self.layouts
        ]
        self.slot_rows = np.array(
            [self.distinct_trace_heads.index(t) for t in self.trace_heads], dtype=np.int64
        )
        # index vectors each layer scores per decode step, over its KV heads
        self.index_vectors = [self._layer_index_vectors(layer) for layer in range(self.n_layers)]
        # compute times by size (pure functions of it: computed once per distinct size)
        self.scoring_us: dict[int, float] = {}
        self.attention_us: dict[int, float] = {}
        self.sequential_commands: dict[int, tuple[list[int], int]] = {}
        # write commands of one entry by its byte offset within a page (the plan of one slot
        # depends on nothing else)
        self.entry_writes: dict[int, list[int]] = {}
        # the parts of the DRAM footprint the pass decides, and resident layers' entries
        self.footprint = StaticFootprint(pp, target, dtype, setup.pipeline.stream_index)
        # layers whose selection holds positions in DRAM outside the cache (sinks, a window,
        # split buffers), and layers whose layouts may hold appends in a write buffer
        self.holds = [self._holds(layer) for layer in range(self.n_layers)]
        self.may_buffer = [self._may_buffer(layer) for layer in range(self.n_layers)]
        self.relabels_at = self._relabel_events()
        self.read_timing = [self._read_timing(layer) for layer in range(self.n_layers)]
        # per-layer cache swapping (PipelineSpec.swap_layers): the pending swap-in of each
        # layer, and the largest (current + incoming) resident image pair of the step
        self.swap = setup.pipeline.swap_layers
        self.swap_in: list[simpy.Event | None] = [None] * self.n_layers
        self.step_cache_peak = 0
        # lead policies (selection_lead_layers): the next layer's reads, issued at this layer's
        # speculation point, and its streamed index
        self.lead: dict[int, _PendingReads] = {}
        self.lead_index: dict[int, simpy.Event] = {}
        self.records = np.zeros((pp.decode_steps, len(STEP_COLUMNS)), dtype=np.float64)
        self.col = {name: i for i, name in enumerate(STEP_COLUMNS)}
        max_pages = self.max_io_bytes // self.page_bytes
        # read commands by size in pages, runs of contiguous entries by length (Python ints:
        # a few per layer and step, below numpy's per-call cost)
        self._io_sizes = [0] * (max_pages + 1)
        self._run_lengths: dict[int, int] = {}

    # -- builders (run once, before the decode process) -----------------------------------------

    def _dense_split(self) -> tuple[float, float, float]:
        """A layer's dense time split around attention: (QKV projection, Q's part of it, output
        projection + MLP), in us."""
        target = self.setup.target
        dense = float(dense_layer_us(target.params_per_layer, self.compute, self.dram))
        # The QKV projection runs before attention; its share of a block's weights is
        # hidden * (n_q + 2 n_kv) * head_dim (hidden: hidden_size, else n_q * head_dim).
        qkv_params = target.hidden * (target.n_q_heads + 2 * target.n_kv_heads) * target.head_dim
        share = min(1.0, qkv_params / target.params_per_layer) if target.params_per_layer else 0.0
        pre_us = dense * share
        # Q's part of the QKV projection (for overlap_transfer, which splits it from K/V's)
        q_us = pre_us * target.n_q_heads / (target.n_q_heads + 2 * target.n_kv_heads)
        return pre_us, q_us, dense - pre_us

    def _layout_spec(self) -> dict:
        """The layout's registry spec, with the sizes the replay knows filled in."""
        return engine_layout_spec(
            self.setup.layout, self.n_positions, self.entry_bytes, self.page_bytes
        )

    def _caches_and_layouts(self) -> tuple[list[LayerCache | None], list[list[FlashLayout]]]:
        """Each simulated layer's DRAM cache and per-KV-head flash layouts, the prompt placed;
        ``None`` and no layouts for a resident layer (full attention or a sliding window)."""
        capacity_entries = self.setup.cache_capacity_bytes // (self.entry_bytes * self.n_layers)
        layout_spec = self._layout_spec()
        caches: list[LayerCache | None] = []
        layouts: list[list[FlashLayout]] = []
        for layer in range(self.n_layers):
            selection = self._selection(layer)
            if selection.is_resident:  # full attention, a sliding window, a kept set: DRAM
                caches.append(None)
                layouts.append([])
                continue
            replacement = REPLACEMENTS.create(self.setup.replacement, where="cache.replacement")
            cache = LayerCache(self.n_heads, self.n_positions, int(capacity_entries), replacement)
            if replacement.needs_future:
                # Offline replacement (Belady) sees this layer's own accesses, as replayed.
                cache.observe_future(self._future_accesses(layer))
            caches.append(cache)
            placed = {t: self._placed_layout(layout_spec, selection, t)
                      for t in self.distinct_trace_heads}
            layouts.append([placed[t] for t in self.trace_heads])
            groups = selection.prefill_groups
            if groups is not None and replacement.uses_groups:
                # the prompt's clusters go to a cluster-aware replacement too
                for head, t in enumerate(self.trace_heads):
                    cache.assign_groups(head, np.arange(self.pp.prompt_len), groups[t], -1)
        return caches, layouts

    def _placed_layout(self, spec: dict, selection: LayerSelection, trace_head: int
                       ) -> FlashLayout:
        """The flash layout of the KV heads replaying ``trace_head``, with the prompt placed
        (by cluster, if the policy has clusters).

        Each simulated KV head has its own flash region, but the regions of heads replaying
        one trace head are laid out alike: a layout decides from the trace head's groups,
        appends and relabels alone. So those heads share one layout object (the replay places
        and relabels once per trace head) and their regions hold the same slots."""
        layout = LAYOUTS.create(spec, where="layout")
        groups = selection.prefill_groups
        coretrieval = selection.coretrieval
        layout.place_prefill(
            self.pp.prompt_len,
            None if groups is None else groups[trace_head],
            coretrieval=None if coretrieval is None else coretrieval[trace_head],
        )
        return layout

    def _relabel_events(self) -> list[dict[int, list[tuple[int, Relabel]]]]:
        """(simulated head, Relabel) events of each simulated layer, by decode step."""
        relabels_at = []
        for layer in range(self.n_layers):
            events: dict[int, list[tuple[int, Relabel]]] = {}
            relabels = self._selection(layer).relabels
            if relabels is not None:
                for head in range(self.n_heads):
                    for event in relabels[self.head_map[head]]:
                        events.setdefault(event.step, []).append((head, event))
            relabels_at.append(events)
        return relabels_at

    def _read_timing(self, layer: int) -> ReadTiming:
        """When ``layer`` issues its reads (see :class:`ReadTiming`; a lead policy's reads
        take precedence over a query-free selection's, which take precedence over
        ``overlap_transfer``)."""
        if self.caches[layer] is None:
            return ReadTiming.NONE
        policy = self.pp.policy
        if policy.selection_lead_layers and layer > 0:
            return ReadTiming.BY_PREVIOUS_LAYER  # see _speculate (layer 0 selects for itself)
        if not policy.selection_needs_query:
            return ReadTiming.AT_LAYER_START
        if self.setup.pipeline.overlap_transfer:
            return ReadTiming.DURING_PROJECTION
        return ReadTiming.AFTER_SCORING

    def _future_accesses(self, layer: int) -> list[tuple[int, list[np.ndarray]]]:
        """Every ``access`` then ``insert`` the replay will make on ``layer``'s cache, in order
        (the same ``now`` and positions as :meth:`_issue_reads` and :meth:`_append`, but for
        what a layout's write buffer will hold, which only the replay knows)."""
        selection = self._selection(layer)
        heads = selection.heads
        assert heads is not None  # only resident layers (heads=None) have no cache
        trace_heads = self.head_map.tolist()
        holds = self._holds(layer)
        accesses: list[tuple[int, list[np.ndarray]]] = []
        for step in range(self.pp.decode_steps):
            now = step * self.n_layers + layer
            position = self.pp.prompt_len + step
            wanted = [heads[t].at(step) for t in trace_heads]
            if holds:
                wanted = [self._without_held(selection, step, w, t)
                          for w, t in zip(wanted, trace_heads, strict=True)]
            accesses.append((now, wanted))
            new = np.array([position])
            accesses.append((now, [new[:0] if self._policy_holds_new(selection, step, t) else new
                                   for t in trace_heads]))
        return accesses

    # -- helpers ----------------------------------------------------------------------------

    def _selection(self, layer: int) -> LayerSelection:
        """The selection simulated ``layer`` replays (its trace layer's)."""
        return self.pp.selections[self.layer_map[layer]]

    def _holds(self, layer: int) -> bool:
        """Whether ``layer``'s selection holds positions in DRAM outside its cache."""
        selection = self._selection(layer)
        return not selection.is_resident and (
            selection.dram_sinks > 0 or selection.dram_tail is not None
            or selection.split_buffers is not None
        )

    def _may_buffer(self, layer: int) -> bool:
        """Whether ``layer``'s layouts may hold appends in a DRAM write buffer."""
        selection = self._selection(layer)
        groups = selection.prefill_groups
        return any(
            layout.max_buffered_entries(None if groups is None else groups[self.head_map[h]])
            for h, layout in enumerate(self.layouts[layer])
        )

    def _split_buffered(self, selection: LayerSelection, trace_head: int, step: int
                        ) -> np.ndarray:
        """Positions in the split buffers of ``trace_head`` at the end of ``step`` (none before
        the first step); the latest step's are kept (asked for again by the next step)."""
        if selection.split_buffers is None or step < 0:
            return np.zeros(0, dtype=np.int32)
        key = (id(selection), trace_head)
        known = self.split_buffered.get(key)
        if known is not None and known[0] == step:
            return known[1]
        positions = selection.split_buffers[trace_head].at(step)
        self.split_buffered[key] = (step, positions)
        return positions

    def _without_held(
        self,
        selection: LayerSelection,
        step: int,
        positions: np.ndarray,
        trace_head: int,
        write_buffered: np.ndarray | None = None,
    ) -> np.ndarray:
        """``positions`` (stored, sorted) at ``step`` without those held in DRAM outside the
        cache: the policy's sinks and window, the split buffers (as the step starts) and the
        layout's ``write_buffered`` positions."""
        out = positions
        if selection.dram_sinks or selection.dram_tail is not None:
            # sorted: the positions in [sinks, tail) are one slice
            lo = out.searchsorted(selection.dram_sinks) if selection.dram_sinks else 0
            hi = len(out) if selection.dram_tail is None else out.searchsorted(
                selection.dram_tail[step])
            out = out[lo:hi]
        for held in (self._split_buffered(selection, trace_head, step - 1), write_buffered):
            if held is not None and len(held) and len(out):
                out = out[~_in_sorted(out, held)]
        return out

    def _policy_holds_new(self, selection: LayerSelection, step: int, trace_head: int) -> bool:
        """Whether the policy holds the token appended at ``step`` in DRAM outside the cache
        (its window or sinks, or a split buffer at the step's end)."""
        position = self.pp.prompt_len + step
        if selection.dram_tail is not None or position < selection.dram_sinks:
            return True
        return bool((self._split_buffered(selection, trace_head, step) == position).any())

    def _cache_lookups(self, layer: int, step: int,
                       lookups: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Each head's ``lookups`` (alike for the heads of one trace head) without what DRAM
        holds outside the cache, and how many entries that leaves out (computed once per trace
        head: the KV heads replaying one look up alike, their layouts buffer alike)."""
        selection = self._selection(layer)
        layouts = self.layouts[layer]
        done: dict[int, np.ndarray] = {}
        out, held = [], 0
        for h, wanted in enumerate(lookups):
            trace_head = self.trace_heads[h]
            kept = done.get(trace_head)
            if kept is None:
                buffered = None
                if self.may_buffer[layer] and layouts[h].buffered_entries:
                    buffered = layouts[h].buffered_positions()
                kept = done[trace_head] = self._without_held(
                    selection, step, wanted, trace_head, buffered
                )
            out.append(kept)
            held += len(wanted) - len(kept)
        return out, held

    def _index_vectors(self, layer: int, step: int) -> int:
        """Index vectors simulated ``layer`` scores at ``step``, over its KV heads."""
        per_step = self.index_vectors[layer]
        if per_step is not None:
            return per_step[step]
        return int(self._selection(layer).index_vectors[self.head_map, step].sum())

    def _layer_index_vectors(self, layer: int) -> list[int] | None:
        """:meth:`_index_vectors` of every decode step of ``layer``, computed at once (integer
        counts only: a float sum could round differently summed at once)."""
        vectors = np.asarray(self._selection(layer).index_vectors)
        if vectors.dtype.kind not in "iub":
            return None
        return [int(v) for v in vectors[self.head_map].sum(axis=0).tolist()]

    def _cache(self, layer: int) -> LayerCache:
        """The cache of ``layer``, a layer that has one (not resident: its read timing is not
        :attr:`ReadTiming.NONE`); only such layers look up, read, append or swap."""
        cache = self.caches[layer]
        assert cache is not None, f"layer {layer} is resident: it has no cache"
        return cache

    def _resident(self, layer: int) -> np.ndarray:
        """``layer``'s resident entries, flat indices (a swap snapshot, see :meth:`_swap_out`)."""
        return self._cache(layer).resident_flat()

    @property
    def io_size_counts(self) -> np.ndarray:
        """Read commands so far by size in pages (index: pages)."""
        return np.array(self._io_sizes, dtype=np.int64)

    @property
    def run_length_counts(self) -> np.ndarray:
        """Runs of contiguous requested entries read so far, by length (index: entries)."""
        counts = np.zeros(max(64, max(self._run_lengths, default=0) + 1), dtype=np.int64)
        for length, runs in self._run_lengths.items():
            counts[length] = runs
        return counts

    def _issue_reads(self, step: int, layer: int, rec: np.ndarray) -> tuple[simpy.Event, int]:
        """Cache lookup and flash reads of one layer; returns the read event, entries attended.

        The KV heads are looked up, planned and read together (flat indices ``head *
        n_positions + position``); what depends on the selection only is computed once per
        trace head."""
        col = self.col
        selection = self._selection(layer)
        heads = selection.heads
        assert heads is not None  # a layer that reads is not resident, so it selects per head
        trace_heads = self.trace_heads
        chosen = {t: heads[t].at(step) for t in self.distinct_trace_heads}
        per_head = [chosen[t] for t in trace_heads]
        n_selected = sum(len(p) for p in per_head)
        lookups = per_head
        if selection.extra_reads is not None:
            # loaded into DRAM (e.g. to split a cluster) but not attended
            extra = selection.extra_reads
            loaded = {}
            for t, attended in chosen.items():
                more = extra[t].at(step)
                loaded[t] = np.union1d(attended, more) if len(more) else attended
            lookups = [loaded[t] for t in trace_heads]
            rec[col["extra_entries"]] += sum(len(x) for x in lookups) - n_selected
        if self.holds[layer] or self.may_buffer[layer]:
            lookups, held = self._cache_lookups(layer, step, lookups)
            rec[col["held_entries"]] += held
        cache = self._cache(layer)
        before = (cache.hits, cache.misses, cache.streamed)
        missed = cache.access_flat(lookups, step * self.n_layers + layer)
        rec[col["hits"]] += cache.hits - before[0]
        rec[col["misses"]] += cache.misses - before[1]
        rec[col["streamed"]] += cache.streamed - before[2]
        if selection.extra_reads is None:
            rec[col["selected_misses"]] += cache.misses - before[1]
        else:  # the misses among the attended entries, without the extra reads'
            rec[col["selected_misses"]] += self._count_in(missed, per_head)
        # One plan for all KV heads: each head's entries live in its own flash region.
        table = self.slot_tables[layer]
        assert table is not None  # a layer with a cache has layouts
        regions, positions = np.divmod(missed, self.n_positions)
        plan = plan_reads(
            table[self.slot_rows[regions], positions], self.entry_bytes, self.page_bytes,
            self.max_io_bytes, regions=regions,
        )
        command_bytes = plan.command_bytes.tolist()
        runs = self._run_lengths
        for length in plan.run_entries.tolist():
            runs[length] = runs.get(length, 0) + 1
        sizes, page = self._io_sizes, self.page_bytes
        for size in command_bytes:
            sizes[size // page] += 1
        rec[col["read_bytes"]] += sum(command_bytes)
        rec[col["useful_read_bytes"]] += plan.useful_bytes
        rec[col["read_commands"]] += len(command_bytes)
        rec[col["selected_entries"]] += n_selected
        issued = self.env.now
        event = self.flash.read(command_bytes)
        if len(command_bytes):

            def _done(_event: simpy.Event, issued: float = issued) -> None:
                rec[col["read_busy_us"]] += self.env.now - issued

            event.callbacks.append(_done)
        attended = n_selected + self.n_heads  # + the current token per head
        return event, attended

    def _count_in(self, flat: np.ndarray, per_head: list[np.ndarray]) -> int:
        """How many of the flat indices ``flat`` (ascending) are among the positions
        ``per_head[h]`` (each sorted, unique) of their head."""
        sizes = [len(p) for p in per_head]
        if not flat.size or not sum(sizes):
            return 0
        among = np.concatenate(per_head).astype(np.int64)
        among += np.repeat(self.head_offsets, sizes)  # ascending: heads, then positions
        return int(np.count_nonzero(_in_sorted(flat, among)))

    def _sequential_commands(self, size: int) -> tuple[list[int], int]:
        """Command sizes (bytes, whole pages) moving ``size`` contiguous bytes, and their
        total: maximum-size commands, then the remainder rounded up to pages (none for
        ``size`` 0)."""
        known = self.sequential_commands.get(size)
        if known is not None:
            return known
        pages = -(-size // self.page_bytes)
        per_command = self.max_io_bytes // self.page_bytes
        commands = [per_command * self.page_bytes] * (pages // per_command)
        if pages % per_command:
            commands.append(pages % per_command * self.page_bytes)
        self.sequential_commands[size] = commands, sum(commands)
        return commands, sum(commands)

    def _stream_index(self, vectors: int, rec: np.ndarray) -> simpy.Event:
        """Read one layer's index (stored contiguously on flash) in maximum-size commands."""
        commands, total = self._sequential_commands(vectors * self.vector_bytes)
        rec[self.col["index_read_bytes"]] += total
        return self.flash.read(commands)

    # -- per-layer cache swapping (PipelineSpec.swap_layers) -----------------------------------

    def _swap_in(self, step: int, layer: int) -> int:
        """Issue the read of ``layer``'s cache image for decode step ``step``; returns the
        image's entries (0 for a layer without a cache, which is not swapped)."""
        cache = self.caches[layer]
        if cache is None:
            return 0
        entries = cache.resident_entries
        commands, total = self._sequential_commands(entries * self.entry_bytes)
        self.records[step, self.col["swap_read_bytes"]] += total
        self.swap_in[layer] = self.flash.read(commands)
        return entries

    def _lookup(
        self, step: int, layer: int, before: np.ndarray | None, rec: np.ndarray
    ) -> _PendingReads:
        """:meth:`_issue_reads` once the layer's cache image is in DRAM; ``before``: the
        layer's swap snapshot, carried along for :meth:`_swap_out`.

        Without a swap-in in flight this is :meth:`_issue_reads` itself. Otherwise the lookup
        and reads run in a side process as soon as the swap-in lands, so the decode process
        goes on with projection and scoring meanwhile; the returned event is then that
        process (its value: the entries attended) and the entries are ``None`` until it ends.
        Either way the decode process's wait for the event is its ``io_wait``.
        """
        pending = self.swap_in[layer]
        self.swap_in[layer] = None
        if pending is None or pending.processed:
            return _PendingReads(*self._issue_reads(step, layer, rec), before)

        def after_swap_in():
            yield pending
            reads, attended = self._issue_reads(step, layer, rec)
            yield reads
            return attended

        return _PendingReads(self.env.process(after_swap_in()), None, before)

    def _swap_out(self, layer: int, before: np.ndarray, rec: np.ndarray) -> None:
        """Write the entries that became resident during the layer to its swap area
        (``before``: the layer's resident entries before its reads, flat indices)."""
        resident = self._cache(layer).resident_flat()
        new = len(resident)
        if new and len(before):
            new -= int(np.count_nonzero(_in_sorted(resident, before)))
        commands, total = self._sequential_commands(new * self.entry_bytes)
        if commands:
            rec[self.col["swap_write_bytes"]] += total
            self.flash.write(commands)

    def _append(self, step: int, layer: int, rec: np.ndarray) -> None:
        """The new token's K/V: resident in the cache, written to flash per the layout.

        A layout is placed and relabelled once per trace head (see :meth:`_placed_layout`);
        each KV head's region gets the writes of its trace head's layout."""
        selection = self._selection(layer)
        position = self.pp.prompt_len + step
        groups = selection.append_groups
        now = step * self.n_layers + layer
        cache = self._cache(layer)
        layouts = self.layouts[layer]
        trace_heads = self.trace_heads
        group_of = None if groups is None else [int(g) for g in groups[:, step].tolist()]
        # slots to write now per trace head's layout: the new token's, a write buffer's full
        # page, relocated entries; and whether the layout's write buffer holds the new token
        written: dict[int, list[int]] = {}
        buffered: dict[int, bool] = {}
        for t in self.distinct_trace_heads:
            layout = layouts[self.first_head[t]]
            slot = layout.place_append(position, None if group_of is None else group_of[t])
            due = layout.due_writes(slot)
            written[t] = [int(due[0])] if len(due) == 1 else due.tolist()
            buffered[t] = slot not in written[t]
        if group_of is not None and cache.replacement.uses_groups:
            cache.assign_group_heads(position, [group_of[t] for t in trace_heads], now)
        relabels = self.relabels_at[layer].get(step)
        if relabels:
            # cluster splits: the layout may relocate entries (written from DRAM)
            relocated = dict.fromkeys(self.distinct_trace_heads, 0)
            for head, event in relabels:
                t = trace_heads[head]
                if head == self.first_head[t]:
                    moved = layouts[head].relabel(event.positions, event.group)
                    written[t].extend(moved.tolist())
                    relocated[t] += len(moved)
            rec[self.col["relocated_entries"]] += sum(relocated[t] for t in trace_heads)
            if cache.replacement.uses_groups:
                for head, event in relabels:
                    cache.assign_groups(head, event.positions, event.group, now)
        # each region's commands, in region order (a plan never joins two regions), planned
        # once per distinct set of slots
        plans: dict[int, list[int]] = {}
        for t in self.distinct_trace_heads:
            slots = written[t]
            if len(slots) == 1:
                offset = slots[0] * self.entry_bytes % self.page_bytes
                sizes = self.entry_writes.get(offset)
                if sizes is None:
                    sizes = self.entry_writes[offset] = self._write_commands(slots)
            else:
                sizes = self._write_commands(slots)
            plans[t] = sizes
        command_bytes = [size for t in trace_heads for size in plans[t]]
        # heads whose new entry DRAM holds outside the cache (the policy's window or sinks, a
        # split buffer, a layout's write buffer): it is not inserted into the cache
        if self.holds[layer]:
            holds = {t: buffered[t] or self._policy_holds_new(selection, step, t)
                     for t in self.distinct_trace_heads}
        else:
            holds = buffered
        held_new = [holds[t] for t in trace_heads]
        new = np.array([position])
        if not any(held_new):
            cache.insert([new] * self.n_heads, now)
        elif not all(held_new):
            cache.insert([new[:0] if held else new for held in held_new], now)
        rec[self.col["write_bytes"]] += sum(command_bytes)
        rec[self.col["write_commands"]] += len(command_bytes)
        self.flash.write(command_bytes)

    def _write_commands(self, slots: list[int]) -> list[int]:
        """Sizes of the commands writing ``slots`` of one region (:func:`plan_writes`)."""
        return plan_writes(
            np.array(slots, dtype=np.int64), self.entry_bytes, self.page_bytes, self.max_io_bytes
        ).tolist()

    def _write_buffered(self, layer: int, step: int) -> int:
        """Entries of ``layer``'s layout write buffers at the end of ``step`` that no other part
        holds (neither the policy's window nor a split buffer)."""
        selection = self._selection(layer)
        layouts = self.layouts[layer]
        per_trace_head = {}
        for t in self.distinct_trace_heads:
            layout = layouts[self.first_head[t]]
            if not layout.buffered_entries:
                per_trace_head[t] = 0
                continue
            positions = layout.buffered_positions()
            outside = positions >= selection.dram_sinks
            if selection.dram_tail is not None:
                outside &= positions < selection.dram_tail[step]
            positions = positions[outside]
            split = self._split_buffered(selection, t, step)
            per_trace_head[t] = (
                int((~np.isin(positions, split)).sum()) if len(split) else len(positions)
            )
        return sum(per_trace_head[t] for t in self.trace_heads)

    def _record_dram(self, step: int, rec: np.ndarray) -> None:
        """The step's DRAM footprint and its parts (:mod:`sim.footprint`).

        With ``swap_layers`` the caches count as the step's largest pair of resident images
        (the running layer's, at its end, plus the one being swapped in for the next layer)
        instead of every layer's; layouts' write buffers and full-attention layers stay.
        """
        cached = written = 0
        for layer, cache in enumerate(self.caches):
            if cache is None:
                continue
            if not self.swap:
                cached += cache.resident_entries
            if self.may_buffer[layer]:
                written += self._write_buffered(layer, step)
        if self.swap:
            cached = self.step_cache_peak
        static = self.footprint
        parts = (
            cached * self.entry_bytes,
            int(static.index[step]),
            int(static.split[step]) + written * self.entry_bytes,
            int(static.window[step]),
            int(static.dense[step]),
        )
        for column, value in zip(PART_COLUMNS, parts, strict=True):
            rec[self.col[column]] = value
        rec[self.col["dram_bytes"]] = sum(parts)

    # -- the decode process --------------------------------------------------------------------

    def _layer(self, step: int, layer: int, rec: np.ndarray):
        """One simulated layer of decode step ``step``: timeouts of the decode process, records
        added to ``rec``. The layer's reads are issued at its :class:`ReadTiming`."""
        timing = self.read_timing[layer]
        incoming, before = self._swap_ahead(step, layer, timing)
        early = self._reads_at_start(step, layer, timing, before, rec)
        vectors = 0 if timing is ReadTiming.BY_PREVIOUS_LAYER else self._index_vectors(layer, step)
        index_ready = self._stream_indexes(step, layer, vectors, rec)
        during = yield from self._project_and_score(
            step, layer, timing, vectors, index_ready, before, rec
        )
        late = None
        if timing is ReadTiming.AFTER_SCORING:
            late = self._lookup(step, layer, before, rec)
        if self.pp.policy.selection_lead_layers:
            yield from self._speculate(step, layer, rec)
        reads = early or during or late  # at most one, as the timing says; None: resident
        attended = yield from self._attended_entries(step, layer, reads, rec)
        yield from self._attend(attended, rec)
        self._append_and_swap_out(step, layer, reads, incoming, rec)
        yield from self._dense(self.dense_post_us, rec)

    def _swap_ahead(
        self, step: int, layer: int, timing: ReadTiming
    ) -> tuple[int, np.ndarray | None]:
        """With ``swap_layers``: swap in the next layer's image now (one layer ahead) and note
        what this layer holds before its reads. Returns the incoming image's entries and the
        snapshot (``None`` without swapping, for a resident layer, or for reads issued by the
        previous layer, which took its own)."""
        if not self.swap:
            return 0, None
        incoming = 0
        last = layer + 1 == self.n_layers
        next_step, next_layer = (step + 1, 0) if last else (step, layer + 1)
        if next_layer != layer and next_step < self.pp.decode_steps:
            incoming = self._swap_in(next_step, next_layer)
        if timing in (ReadTiming.NONE, ReadTiming.BY_PREVIOUS_LAYER):
            return incoming, None
        return incoming, self._resident(layer)

    def _reads_at_start(
        self,
        step: int,
        layer: int,
        timing: ReadTiming,
        before: np.ndarray | None,
        rec: np.ndarray,
    ) -> _PendingReads | None:
        """The reads in flight when the layer starts: the previous layer's speculation's, or
        issued now for a selection that needs no query."""
        if timing is ReadTiming.BY_PREVIOUS_LAYER:
            return self.lead.pop(layer)
        if timing is ReadTiming.AT_LAYER_START:
            return self._lookup(step, layer, before, rec)
        return None

    def _stream_indexes(
        self, step: int, layer: int, vectors: int, rec: np.ndarray
    ) -> simpy.Event | None:
        """With ``stream_index``: start reading this layer's index (the event the scoring waits
        for, ``None`` if it has none) and, for a lead policy, the next layer's."""
        if not self.setup.pipeline.stream_index:
            return None
        index_ready = self._stream_index(int(vectors), rec) if vectors else None
        if self.pp.policy.selection_lead_layers:
            self._stream_next_index(step, layer, rec)  # overlaps the QKV projection too
        return index_ready

    def _project_and_score(
        self,
        step: int,
        layer: int,
        timing: ReadTiming,
        vectors: int,
        index_ready: simpy.Event | None,
        before: np.ndarray | None,
        rec: np.ndarray,
    ):
        """The QKV projection, then the scoring of ``vectors`` index vectors once the streamed
        index (if any) is in. With :attr:`ReadTiming.DURING_PROJECTION` only Q's projection
        comes first: the reads are issued then, and K/V's projection follows the scoring.
        Returns the reads issued here, if any."""
        split = timing is ReadTiming.DURING_PROJECTION
        first_us = self.dense_q_us if split else self.dense_pre_us
        yield from self._dense(first_us, rec)
        if index_ready is not None:
            yield from self._wait(index_ready, rec)
        reads = self._lookup(step, layer, before, rec) if split else None
        yield from self._score(vectors, rec)
        if split:
            yield from self._dense(self.dense_pre_us - first_us, rec)
        return reads

    def _attended_entries(
        self, step: int, layer: int, reads: _PendingReads | None, rec: np.ndarray
    ):
        """Entries the layer attends, over its KV heads: a resident layer's whole context or
        window; else its lookup's, once the reads are in (the wait is ``io_wait``)."""
        if reads is None:
            resident = self.footprint.resident[layer]
            assert resident is not None  # only a resident layer issues no reads
            return int(resident[step])
        yield from self._wait(reads.event, rec)
        return reads.event.value if reads.attended is None else reads.attended

    def _append_and_swap_out(
        self,
        step: int,
        layer: int,
        reads: _PendingReads | None,
        incoming: int,
        rec: np.ndarray,
    ) -> None:
        """After attention: the new token's K/V appended (written to flash, not awaited), the
        layer's newly resident entries swapped out, the step's resident image peak updated."""
        cache = self.caches[layer]
        if cache is not None:
            self._append(step, layer, rec)
            assert reads is not None  # a layer with a cache issues reads at every timing
            if reads.before is not None:
                self._swap_out(layer, reads.before, rec)
        if self.swap:
            current = 0 if cache is None else cache.resident_entries
            self.step_cache_peak = max(self.step_cache_peak, current + incoming)

    def _dense(self, duration_us: float, rec: np.ndarray):
        yield self.env.timeout(duration_us)
        rec[self.col["dense_us"]] += duration_us

    def _score(self, vectors: int, rec: np.ndarray):
        """Score the query heads against ``vectors`` index vectors (none: no time)."""
        if not vectors:
            return
        score_us = self.scoring_us.get(vectors)
        if score_us is None:
            score_us = self.scoring_us[vectors] = float(
                scoring_us(vectors, self.head_dim, self.queries_per_kv_head, self.vector_bytes,
                           self.compute, self.dram)
            )
        yield self.env.timeout(score_us)
        rec[self.col["scoring_us"]] += score_us

    def _attend(self, attended: int, rec: np.ndarray):
        attend_us = self.attention_us.get(attended)
        if attend_us is None:
            attend_us = self.attention_us[attended] = float(
                attention_us(attended, self.head_dim, self.queries_per_kv_head,
                             self.entry_bytes, self.compute, self.dram)
            )
        yield self.env.timeout(attend_us)
        rec[self.col["attention_us"]] += attend_us

    def _wait(self, event: simpy.Event, rec: np.ndarray):
        """Wait for ``event`` (reads, an index, a swap-in); the time waited is ``io_wait``."""
        waited_from = self.env.now
        yield event
        rec[self.col["io_wait_us"]] += self.env.now - waited_from

    def _speculated_vectors(self, step: int, layer: int) -> int:
        """Index vectors of the layer after ``layer`` if a lead policy speculates it there."""
        nxt = layer + 1
        if nxt >= self.n_layers or self.caches[nxt] is None:
            return 0
        return int(self._index_vectors(nxt, step))

    def _stream_next_index(self, step: int, layer: int, rec: np.ndarray) -> None:
        """``stream_index`` with a lead policy: start reading the next layer's index at the
        start of ``layer``, so it overlaps this layer's QKV projection as a layer's own does."""
        vectors = self._speculated_vectors(step, layer)
        if vectors:
            self.lead_index[layer + 1] = self._stream_index(vectors, rec)

    def _speculate(self, step: int, layer: int, rec: np.ndarray):
        """A lead policy's speculation point in ``layer`` (InfiniGen): score the next layer's
        index (once streamed in, with ``stream_index``) and issue its reads now; the next layer
        waits on them instead of scoring and reading for itself. Nothing past the last layer
        (the next step's layer 0 selects for itself) or for a layer without a cache."""
        nxt = layer + 1
        if nxt >= self.n_layers or self.caches[nxt] is None:
            return
        vectors = self._speculated_vectors(step, layer)
        index_ready = self.lead_index.pop(nxt, None)
        if index_ready is not None:
            yield from self._wait(index_ready, rec)
        yield from self._score(vectors, rec)
        # with swapping, what the next layer holds before its reads (see _swap_out)
        before = self._resident(nxt) if self.swap else None
        self.lead[nxt] = self._lookup(step, nxt, before, rec)

    def decode(self, on_step: Callable[[], None] | None):
        col = self.col
        for step in range(self.pp.decode_steps):
            rec = self.records[step]
            started = self.env.now
            if self.swap:
                self.step_cache_peak = 0
                if step == 0 or self.n_layers == 1:  # nothing earlier swapped layer 0 in
                    self._swap_in(step, 0)
            for layer in range(self.n_layers):
                yield from self._layer(step, layer, rec)
            if self.lm_head_us:  # counted in dense_us
                yield from self._dense(self.lm_head_us, rec)
            rec[col["latency_us"]] = self.env.now - started
            self._record_dram(step, rec)
            if on_step:
                on_step()


def simulate(
    pp: PolicyPass,
    setup: SimSetup,
    progress: bool = False,
    on_step: Callable[[], None] | None = None,
) -> SimResult:
    """Replay ``pp``'s selections on the device of ``setup``; deterministic. ``on_step`` is
    called after each decode step (progress reports)."""
    started = time.perf_counter()
    replay = Replay(pp, setup)
    bar = progress_bar(pp.decode_steps, f"{pp.policy.name}: simulate", "step", enabled=progress)
    tick = on_step
    if progress:
        def tick() -> None:
            bar.update()
            if on_step is not None:
                on_step()
    replay.env.process(replay.decode(tick))
    replay.env.run()
    bar.close()
    steps = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    steps.insert(0, "step", np.arange(pp.decode_steps, dtype=np.int32))
    size_counts = replay.io_size_counts
    sizes = np.nonzero(size_counts)[0]
    io_sizes = pd.DataFrame(
        {"size_bytes": sizes * replay.page_bytes, "commands": size_counts[sizes]}
    )
    length_counts = replay.run_length_counts
    lengths = np.nonzero(length_counts)[0]
    run_lengths = pd.DataFrame({"run_entries": lengths, "runs": length_counts[lengths]})
    peak_cache = sum(c.peak_resident_entries for c in replay.caches if c is not None)
    totals = {
        "entry_bytes": replay.entry_bytes,
        "cache_capacity_bytes": setup.cache_capacity_bytes,
        "peak_cache_bytes": peak_cache * replay.entry_bytes,
        "simulated_time_us": replay.env.now,
    }
    return SimResult(steps, io_sizes, run_lengths, totals, time.perf_counter() - started)
