"""What a replay is given and what it builds from it once, before the decode process starts.

:class:`SimSetup` is the caller's part (device, simulated model, KV dtype, cache, layout,
pipeline); :class:`PreparedRun` is the run as the decode process steps through it: the sizes,
the simulated model's layers and KV heads mapped to the trace's, and each simulated layer's
DRAM cache, flash layouts (the prompt placed: prefill is not timed, its K/V start on flash and
the cache starts cold), slot table, index vectors per step, relabel events and
:class:`ReadTiming`.

A resident layer (full attention, a sliding window, an eviction policy's kept set) has no
cache and no layouts: it is attended from DRAM. A simulated layer inherits the window of the
trace layer it replays (:func:`sim.model.trace_layer_map`), so a Gemma trace driving a deeper
target model keeps its local/global pattern spread over the target's depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from sim.config import PipelineSpec
from sim.footprint import StaticFootprint
from sim.hardware import DeviceParams
from sim.kv.cache import LayerCache
from sim.kv.layouts import LAYOUTS, FlashLayout, engine_layout_spec, shared_slot_table
from sim.kv.replacement import REPLACEMENTS
from sim.model import ModelGeometry, kv_dtype_bytes, trace_head_map, trace_layer_map
from sim.outputs import PolicyPass
from sim.policies.base import LayerSelection, Relabel
from sim.replay.held import HeldPositions, holds_outside_cache


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


class PreparedRun:
    """The run a replay steps through, built once from the policy pass and the setup."""

    def __init__(self, pp: PolicyPass, setup: SimSetup) -> None:
        self.pp = pp
        self.setup = setup
        target, dtype = setup.target, setup.kv_dtype
        flash_params = setup.device.flash
        # the simulated model's layers and KV heads, each replaying one of the trace's
        self.layer_map = trace_layer_map(target, pp.trace_model)
        self.head_map = trace_head_map(target, pp.trace_model)
        self.n_layers, self.n_heads = target.n_layers, target.n_kv_heads
        # each simulated KV head's trace head, and the distinct ones (simulated heads that
        # replay one trace head select alike: their selections are computed once)
        self.trace_heads: list[int] = self.head_map.tolist()
        self.distinct_trace_heads = sorted(set(self.trace_heads))
        self.first_head = {t: self.trace_heads.index(t) for t in self.distinct_trace_heads}
        self.entry_bytes = target.entry_bytes(dtype)
        self.vector_bytes = int(round(target.head_dim * kv_dtype_bytes(dtype)))
        self.page_bytes = flash_params.page_size_bytes
        self.max_io_bytes = flash_params.max_io_bytes
        self.n_positions = pp.prompt_len + pp.decode_steps
        self.head_offsets = np.arange(self.n_heads, dtype=np.int64) * self.n_positions
        # what each layer's policy holds in DRAM outside the cache
        self.held = HeldPositions(pp.prompt_len)
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
        # the parts of the DRAM footprint the pass decides, and resident layers' entries
        self.footprint = StaticFootprint(pp, target, dtype, setup.pipeline.stream_index)
        # layers whose selection holds positions in DRAM outside the cache (sinks, a window,
        # split buffers), and layers whose layouts may hold appends in a write buffer
        self.holds = [holds_outside_cache(self.selection(layer)) for layer in range(self.n_layers)]
        self.may_buffer = [self._may_buffer(layer) for layer in range(self.n_layers)]
        self.relabels_at = self._relabel_events()
        self.read_timing = [self._read_timing(layer) for layer in range(self.n_layers)]

    # -- what the decode process asks ------------------------------------------------------

    def selection(self, layer: int) -> LayerSelection:
        """The selection simulated ``layer`` replays (its trace layer's)."""
        return self.pp.selections[self.layer_map[layer]]

    def cache(self, layer: int) -> LayerCache:
        """The cache of ``layer``, a layer that has one (not resident: its read timing is not
        :attr:`ReadTiming.NONE`); only such layers look up, read, append or swap."""
        cache = self.caches[layer]
        assert cache is not None, f"layer {layer} is resident: it has no cache"
        return cache

    def resident(self, layer: int) -> np.ndarray:
        """``layer``'s resident entries, flat indices ``head * n_positions + position`` (a swap
        snapshot, see :meth:`sim.replay.flash_io.FlashIO.swap_out`)."""
        return self.cache(layer).resident_flat()

    def index_vectors_at(self, layer: int, step: int) -> int:
        """Index vectors simulated ``layer`` scores at ``step``, over its KV heads."""
        per_step = self.index_vectors[layer]
        if per_step is not None:
            return per_step[step]
        return int(self.selection(layer).index_vectors[self.head_map, step].sum())

    def write_buffered(self, layer: int, step: int) -> int:
        """Entries of ``layer``'s layout write buffers at the end of ``step`` that no other part
        holds (neither the policy's window nor a split buffer)."""
        selection = self.selection(layer)
        layouts = self.layouts[layer]
        per_trace_head = {}
        for t in self.distinct_trace_heads:
            layout = layouts[self.first_head[t]]
            per_trace_head[t] = self.held.only_write_buffered(
                selection, t, step, layout.buffered_positions()
            ) if layout.buffered_entries else 0
        return sum(per_trace_head[t] for t in self.trace_heads)

    # -- builders ------------------------------------------------------------------------------

    def _caches_and_layouts(self) -> tuple[list[LayerCache | None], list[list[FlashLayout]]]:
        """Each simulated layer's DRAM cache and per-KV-head flash layouts, the prompt placed;
        ``None`` and no layouts for a resident layer (full attention or a sliding window)."""
        capacity_entries = self.setup.cache_capacity_bytes // (self.entry_bytes * self.n_layers)
        layout_spec = engine_layout_spec(
            self.setup.layout, self.n_positions, self.entry_bytes, self.page_bytes
        )
        caches: list[LayerCache | None] = []
        layouts: list[list[FlashLayout]] = []
        for layer in range(self.n_layers):
            selection = self.selection(layer)
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
            relabels = self.selection(layer).relabels
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
            return ReadTiming.BY_PREVIOUS_LAYER  # the previous layer speculates this one's
        if not policy.selection_needs_query:
            return ReadTiming.AT_LAYER_START
        if self.setup.pipeline.overlap_transfer:
            return ReadTiming.DURING_PROJECTION
        return ReadTiming.AFTER_SCORING

    def _future_accesses(self, layer: int) -> list[tuple[int, list[np.ndarray]]]:
        """Every ``access`` then ``insert`` the replay will make on ``layer``'s cache, in order
        (the same ``now`` and positions as :class:`sim.replay.flash_io.FlashIO`'s reads and
        appends, but for what a layout's write buffer will hold, which only the replay knows).
        """
        selection = self.selection(layer)
        heads = selection.heads
        assert heads is not None  # only resident layers (heads=None) have no cache
        trace_heads = self.head_map.tolist()
        holds = holds_outside_cache(selection)
        accesses: list[tuple[int, list[np.ndarray]]] = []
        for step in range(self.pp.decode_steps):
            now = step * self.n_layers + layer
            position = self.pp.prompt_len + step
            wanted = [heads[t].at(step) for t in trace_heads]
            if holds:
                wanted = [self.held.without(selection, step, w, t)
                          for w, t in zip(wanted, trace_heads, strict=True)]
            accesses.append((now, wanted))
            new = np.array([position])
            accesses.append((now, [new[:0] if self.held.holds_new(selection, step, t) else new
                                   for t in trace_heads]))
        return accesses

    def _may_buffer(self, layer: int) -> bool:
        """Whether ``layer``'s layouts may hold appends in a DRAM write buffer."""
        selection = self.selection(layer)
        groups = selection.prefill_groups
        return any(
            layout.max_buffered_entries(None if groups is None else groups[self.head_map[h]])
            for h, layout in enumerate(self.layouts[layer])
        )

    def _layer_index_vectors(self, layer: int) -> list[int] | None:
        """:meth:`index_vectors_at` of every decode step of ``layer``, computed at once (integer
        counts only: a float sum could round differently summed at once)."""
        vectors = np.asarray(self.selection(layer).index_vectors)
        if vectors.dtype.kind not in "iub":
            return None
        return [int(v) for v in vectors[self.head_map].sum(axis=0).tolist()]
