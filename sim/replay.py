"""The replay: a policy pass's selections stepped through a SimPy model of the phone.

For every decode step and every layer of the simulated model:

``dense (QKV projection) -> index scoring -> cache lookup -> flash reads -> attention over the
selected entries -> append the new token's K/V (written to flash, not awaited) -> dense (output
projection + MLP)``

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
its local/global pattern spread over the target's depth.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import simpy
from tqdm import tqdm

from sim.config import PipelineSpec
from sim.hardware import (
    DeviceParams,
    Flash,
    attention_us,
    dense_layer_us,
    scoring_us,
)
from sim.kv.cache import REPLACEMENTS, LayerCache
from sim.kv.io_plan import plan_reads, plan_writes
from sim.kv.layout import LAYOUTS, FlashLayout
from sim.model import ModelGeometry, kv_dtype_bytes, trace_head_map, trace_layer_map
from sim.outputs import STEP_COLUMNS, PolicyPass, SimResult
from sim.policies.base import LayerSelection, Relabel


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


class Replay:
    """The SimPy model of one run: a decode process on the CPU, the flash beside it."""

    def __init__(self, pp: PolicyPass, setup: SimSetup) -> None:
        self.pp = pp
        self.setup = setup
        target, dtype = setup.target, setup.kv_dtype
        flash_params = setup.device.flash
        self.env = simpy.Environment()
        self.flash = Flash(self.env, flash_params)
        self.layer_map = trace_layer_map(target, pp.trace_model)
        self.head_map = trace_head_map(target, pp.trace_model)
        self.n_layers, self.n_heads = target.n_layers, target.n_kv_heads
        self.head_ids = np.arange(self.n_heads)
        self.entry_bytes = target.entry_bytes(dtype)
        self.vector_bytes = int(round(target.head_dim * kv_dtype_bytes(dtype)))
        self.page_bytes = flash_params.page_size_bytes
        self.max_io_bytes = flash_params.max_io_bytes
        self.max_positions = pp.prompt_len + pp.decode_steps
        compute, dram = setup.device.compute, setup.device.dram
        dense = dense_layer_us(target.params_per_layer, compute, dram)
        # The QKV projection runs before attention; its share of a block's weights is
        # hidden * (n_q + 2 n_kv) * head_dim with hidden = n_q * head_dim.
        hidden = target.n_q_heads * target.head_dim
        qkv_params = hidden * (target.n_q_heads + 2 * target.n_kv_heads) * target.head_dim
        share = min(1.0, qkv_params / target.params_per_layer) if target.params_per_layer else 0.0
        self.dense_pre_us = dense * share
        self.dense_post_us = dense - self.dense_pre_us
        # Q's part of the QKV projection (for overlap_transfer, which splits it from K/V's)
        self.dense_q_us = self.dense_pre_us * target.n_q_heads / (
            target.n_q_heads + 2 * target.n_kv_heads
        )
        self.compute, self.dram = compute, dram
        capacity_entries = setup.cache_capacity_bytes // (self.entry_bytes * self.n_layers)
        self.caches: list[LayerCache | None] = []
        self.layouts: list[list[FlashLayout]] = []
        layout_spec = {**setup.layout, "max_positions": self.max_positions}
        declared = {f.name for f in dataclasses.fields(LAYOUTS.get(layout_spec["type"]))}
        # sizes a layout may need (a page-aligned write buffer): filled in if it declares them
        for name, value in (("entry_bytes", self.entry_bytes), ("page_bytes", self.page_bytes)):
            if name in declared:
                layout_spec[name] = value
        for layer in range(self.n_layers):
            selection = pp.selections[self.layer_map[layer]]
            if selection.is_resident:  # full attention or a sliding window: all in DRAM
                self.caches.append(None)
                self.layouts.append([])
                continue
            replacement = REPLACEMENTS.create(setup.replacement, where="cache.replacement")
            cache = LayerCache(self.n_heads, self.max_positions, int(capacity_entries), replacement)
            if replacement.needs_future:
                # Offline replacement (Belady) sees this layer's own accesses, as replayed.
                cache.observe_future(self._future_accesses(layer))
            self.caches.append(cache)
            row = []
            for head in range(self.n_heads):
                layout = LAYOUTS.create(layout_spec, where="layout")
                trace_head = self.head_map[head]
                groups = selection.prefill_groups
                coretrieval = selection.coretrieval
                layout.place_prefill(
                    pp.prompt_len,
                    None if groups is None else groups[trace_head],
                    coretrieval=None if coretrieval is None else coretrieval[trace_head],
                )
                if groups is not None and replacement.uses_groups:
                    cache.assign_groups(head, np.arange(pp.prompt_len), groups[trace_head], -1)
                row.append(layout)
            self.layouts.append(row)
        # (simulated head, Relabel) events of each simulated layer, by decode step
        self.relabels_at: list[dict[int, list[tuple[int, Relabel]]]] = []
        for layer in range(self.n_layers):
            events: dict[int, list[tuple[int, Relabel]]] = {}
            relabels = pp.selections[self.layer_map[layer]].relabels
            if relabels is not None:
                for head in range(self.n_heads):
                    for event in relabels[self.head_map[head]]:
                        events.setdefault(event.step, []).append((head, event))
            self.relabels_at.append(events)
        # per-layer cache swapping (PipelineSpec.swap_layers): the pending swap-in of each
        # layer, and the largest (current + incoming) resident image pair of the step
        self.swap = setup.pipeline.swap_layers
        self.swap_in: list[simpy.Event | None] = [None] * self.n_layers
        # lead policies (selection_lead_layers): reads, entries and swap snapshot of the next
        # layer, issued at this layer's speculation point
        self.lead: dict[int, tuple] = {}
        self.lead_index: dict[int, simpy.Event] = {}  # the next layer's streamed index
        self.step_cache_peak = 0
        self.records = np.zeros((pp.decode_steps, len(STEP_COLUMNS)), dtype=np.float64)
        self.col = {name: i for i, name in enumerate(STEP_COLUMNS)}
        max_pages = self.max_io_bytes // self.page_bytes
        self.io_size_counts = np.zeros(max_pages + 1, dtype=np.int64)
        self.run_length_counts = np.zeros(64, dtype=np.int64)

    # -- helpers ----------------------------------------------------------------------------

    def _future_accesses(self, layer: int) -> list[tuple[int, list[np.ndarray]]]:
        """Every ``access`` then ``insert`` the replay will make on ``layer``'s cache, in order
        (the same ``now`` and positions as :meth:`_issue_reads` and :meth:`_append`)."""
        heads = self.pp.selections[self.layer_map[layer]].heads
        per_head = [heads[self.head_map[h]] for h in range(self.n_heads)]
        accesses: list[tuple[int, list[np.ndarray]]] = []
        for step in range(self.pp.decode_steps):
            now = step * self.n_layers + layer
            accesses.append((now, [selections.at(step) for selections in per_head]))
            accesses.append((now, [np.array([self.pp.prompt_len + step])] * self.n_heads))
        return accesses

    def _count_runs(self, run_entries: np.ndarray) -> None:
        counts = np.bincount(run_entries)
        if len(counts) > len(self.run_length_counts):
            grown = np.zeros(max(len(counts), 2 * len(self.run_length_counts)), dtype=np.int64)
            grown[: len(self.run_length_counts)] = self.run_length_counts
            self.run_length_counts = grown
        self.run_length_counts[: len(counts)] += counts

    def _issue_reads(self, step: int, layer: int, rec: np.ndarray) -> tuple[simpy.Event, int]:
        """Cache lookup and flash reads of one layer; returns the read event, entries attended."""
        col = self.col
        selection = self.pp.selections[self.layer_map[layer]]
        per_head = [selection.heads[self.head_map[h]].at(step) for h in range(self.n_heads)]
        lookups = per_head
        if selection.extra_reads is not None:
            # loaded into DRAM (e.g. to split a cluster) but not attended
            lookups = [
                np.union1d(attended, selection.extra_reads[self.head_map[h]].at(step))
                for h, attended in enumerate(per_head)
            ]
            rec[col["extra_entries"]] += sum(len(x) for x in lookups) - sum(map(len, per_head))
        cache = self.caches[layer]
        before = (cache.hits, cache.misses, cache.streamed)
        misses = cache.access(lookups, step * self.n_layers + layer)
        rec[col["hits"]] += cache.hits - before[0]
        rec[col["misses"]] += cache.misses - before[1]
        rec[col["streamed"]] += cache.streamed - before[2]
        # One plan for all KV heads: each head's entries live in its own flash region.
        layouts = self.layouts[layer]
        plan = plan_reads(
            np.concatenate([layouts[h].slots(missed) for h, missed in enumerate(misses)]),
            self.entry_bytes,
            self.page_bytes,
            self.max_io_bytes,
            regions=np.repeat(self.head_ids, [len(missed) for missed in misses]),
        )
        command_bytes, useful = plan.command_bytes, plan.useful_bytes
        self._count_runs(plan.run_entries)
        rec[col["read_bytes"]] += command_bytes.sum()
        rec[col["useful_read_bytes"]] += useful
        rec[col["read_commands"]] += len(command_bytes)
        rec[col["selected_entries"]] += sum(len(p) for p in per_head)
        self.io_size_counts += np.bincount(
            command_bytes // self.page_bytes, minlength=len(self.io_size_counts)
        )
        issued = self.env.now
        event = self.flash.read(command_bytes)
        if len(command_bytes):

            def _done(_event: simpy.Event, issued: float = issued) -> None:
                rec[col["read_busy_us"]] += self.env.now - issued

            event.callbacks.append(_done)
        attended = sum(len(p) for p in per_head) + self.n_heads  # + the current token per head
        return event, attended

    def _sequential_commands(self, size: int) -> np.ndarray:
        """Command sizes (bytes, whole pages) moving ``size`` contiguous bytes: maximum-size
        commands, then the remainder rounded up to pages (none for ``size`` 0)."""
        pages = -(-size // self.page_bytes)
        per_command = self.max_io_bytes // self.page_bytes
        commands = np.full(pages // per_command, per_command, dtype=np.int64)
        if pages % per_command:
            commands = np.append(commands, pages % per_command)
        return commands * self.page_bytes

    def _stream_index(self, vectors: int, rec: np.ndarray) -> simpy.Event:
        """Read one layer's index (stored contiguously on flash) in maximum-size commands."""
        commands = self._sequential_commands(vectors * self.vector_bytes)
        rec[self.col["index_read_bytes"]] += commands.sum()
        return self.flash.read(commands)

    # -- per-layer cache swapping (PipelineSpec.swap_layers) -----------------------------------

    def _swap_in(self, step: int, layer: int) -> int:
        """Issue the read of ``layer``'s cache image for decode step ``step``; returns the
        image's entries (0 for a layer without a cache, which is not swapped)."""
        cache = self.caches[layer]
        if cache is None:
            return 0
        entries = cache.resident_entries
        commands = self._sequential_commands(entries * self.entry_bytes)
        self.records[step, self.col["swap_read_bytes"]] += commands.sum()
        self.swap_in[layer] = self.flash.read(commands)
        return entries

    def _lookup(
        self, step: int, layer: int, rec: np.ndarray
    ) -> tuple[simpy.Event, int | None]:
        """:meth:`_issue_reads` once the layer's cache image is in DRAM.

        Without a swap-in in flight this is :meth:`_issue_reads` itself. Otherwise the lookup
        and reads run in a side process as soon as the swap-in lands, so the decode process
        goes on with projection and scoring meanwhile; the returned event is then that
        process (its value: the entries attended) and the entries are ``None`` until it ends.
        Either way the decode process's wait for the event is its ``io_wait``.
        """
        pending = self.swap_in[layer]
        self.swap_in[layer] = None
        if pending is None or pending.processed:
            return self._issue_reads(step, layer, rec)

        def after_swap_in():
            yield pending
            reads, attended = self._issue_reads(step, layer, rec)
            yield reads
            return attended

        return self.env.process(after_swap_in()), None

    def _swap_out(self, layer: int, before: list[np.ndarray], rec: np.ndarray) -> None:
        """Write the entries that became resident during the layer to its swap area."""
        cache = self.caches[layer]
        new = sum(
            len(np.setdiff1d(cache.resident(head), old, assume_unique=True))
            for head, old in enumerate(before)
        )
        commands = self._sequential_commands(new * self.entry_bytes)
        if len(commands):
            rec[self.col["swap_write_bytes"]] += commands.sum()
            self.flash.write(commands)

    def _append(self, step: int, layer: int, rec: np.ndarray) -> None:
        """The new token's K/V: resident in the cache, written to flash per the layout."""
        selection = self.pp.selections[self.layer_map[layer]]
        position = self.pp.prompt_len + step
        groups = selection.append_groups
        now = step * self.n_layers + layer
        cache = self.caches[layer]
        track_groups = groups is not None and cache.replacement.uses_groups
        # (head, slots to write now): the new token's, or a write buffer's full page
        writes = []
        for head, layout in enumerate(self.layouts[layer]):
            group = None if groups is None else int(groups[self.head_map[head], step])
            writes.append((head, layout.due_writes(layout.place_append(position, group))))
            if track_groups:
                cache.assign_groups(head, np.array([position]), group, now)
        relabels = self.relabels_at[layer].get(step)
        if relabels:
            # cluster splits: the layout may relocate entries (written from DRAM)
            for head, event in relabels:
                moved = self.layouts[layer][head].relabel(event.positions, event.group)
                writes.append((head, moved))
                rec[self.col["relocated_entries"]] += len(moved)
                if cache.replacement.uses_groups:
                    cache.assign_groups(head, event.positions, event.group, now)
        command_bytes = plan_writes(
            np.concatenate([slots for _, slots in writes]),
            self.entry_bytes,
            self.page_bytes,
            self.max_io_bytes,
            regions=np.concatenate([np.full(len(slots), head) for head, slots in writes]),
        )
        cache.insert([np.array([position])] * self.n_heads, now)
        rec[self.col["write_bytes"]] += command_bytes.sum()
        rec[self.col["write_commands"]] += len(command_bytes)
        self.flash.write(command_bytes)

    def _resident_entries(self, selection: LayerSelection, step: int) -> int:
        """Entries per KV head a cacheless layer holds and attends at ``step``: the whole
        context with the current token, or at most its sliding window."""
        context = self.pp.prompt_len + step + 1
        return context if selection.window is None else min(selection.window, context)

    def _dram_bytes(self, step: int) -> float:
        """Resident KV (cache, or everything for full attention, or a sliding window) plus
        every policy index.

        With ``swap_layers`` the caches count as the step's largest pair of resident images
        (the running layer's, at its end, plus the one being swapped in for the next layer)
        instead of every layer's; layouts' write buffers and full-attention layers stay.
        """
        total = 0.0
        index_bytes = []
        for layer in range(self.n_layers):
            selection = self.pp.selections[self.layer_map[layer]]
            vectors = selection.index_vectors[self.head_map, step].sum()
            index_bytes.append(vectors * self.vector_bytes)
            cache = self.caches[layer]
            if cache is None:
                resident = self._resident_entries(selection, step)
                total += resident * self.n_heads * self.entry_bytes
            else:
                buffered = sum(layout.buffered_entries for layout in self.layouts[layer])
                resident = 0 if self.swap else cache.resident_entries
                total += (resident + buffered) * self.entry_bytes
        if self.swap:
            total += self.step_cache_peak * self.entry_bytes
        # a streamed index is resident one layer at a time
        total += max(index_bytes) if self.setup.pipeline.stream_index else sum(index_bytes)
        return total

    # -- the decode process --------------------------------------------------------------------

    def _layer(self, step: int, layer: int, rec: np.ndarray):
        env, col = self.env, self.col
        selection = self.pp.selections[self.layer_map[layer]]
        full = selection.is_resident  # no cache, no reads: full attention or a window
        head_dim, group = self.setup.target.head_dim, self.setup.target.group_size
        pipeline = self.setup.pipeline
        prefetch = not full and not self.pp.policy.selection_needs_query
        incoming, before = 0, None
        if self.swap:
            # swap in the next layer's image now (one ahead); note what this layer holds
            last = layer + 1 == self.n_layers
            next_step, next_layer = (step + 1, 0) if last else (step, layer + 1)
            if next_layer != layer and next_step < self.pp.decode_steps:
                incoming = self._swap_in(next_step, next_layer)
            if not full:
                before = [self.caches[layer].resident(h) for h in range(self.n_heads)]
        lead = self.lead.pop(layer, None)  # scored and issued during the previous layer
        if lead is not None:
            reads, attended, before = lead
        elif prefetch:
            reads, attended = self._lookup(step, layer, rec)
        vectors = 0 if lead is not None else selection.index_vectors[self.head_map, step].sum()
        index_ready = None
        if pipeline.stream_index and vectors:
            index_ready = self._stream_index(int(vectors), rec)
        if pipeline.stream_index and self.pp.policy.selection_lead_layers:
            self._stream_next_index(step, layer, rec)  # overlaps the QKV projection too

        # QKV projection, or only Q's part when K/V's overlaps the transfer
        split = pipeline.overlap_transfer and not full and not prefetch and lead is None
        first_us = self.dense_q_us if split else self.dense_pre_us
        yield env.timeout(first_us)
        rec[col["dense_us"]] += first_us
        if index_ready is not None:
            waited_from = env.now
            yield index_ready
            rec[col["io_wait_us"]] += env.now - waited_from

        if split:  # clusters are fetched as they are ranked
            reads, attended = self._lookup(step, layer, rec)
        score_us = (
            float(scoring_us(vectors, head_dim, group, self.vector_bytes, self.compute, self.dram))
            if vectors
            else 0.0
        )
        if score_us:
            yield env.timeout(score_us)
            rec[col["scoring_us"]] += score_us
        if split:
            yield env.timeout(self.dense_pre_us - first_us)
            rec[col["dense_us"]] += self.dense_pre_us - first_us

        if full:
            attended = self._resident_entries(selection, step) * self.n_heads
        if not full and not prefetch and not split and lead is None:
            reads, attended = self._lookup(step, layer, rec)
        if self.pp.policy.selection_lead_layers:
            yield from self._speculate(step, layer, rec)
        if not full:
            waited_from = env.now
            yield reads
            rec[col["io_wait_us"]] += env.now - waited_from
            if attended is None:  # looked up after a swap-in (see _lookup)
                attended = reads.value

        attend_us = float(
            attention_us(attended, head_dim, group, self.entry_bytes, self.compute, self.dram)
        )
        yield env.timeout(attend_us)
        rec[col["attention_us"]] += attend_us

        if not full:
            self._append(step, layer, rec)
            if before is not None:
                self._swap_out(layer, before, rec)
        if self.swap:
            current = 0 if full else self.caches[layer].resident_entries
            self.step_cache_peak = max(self.step_cache_peak, current + incoming)

        yield env.timeout(self.dense_post_us)
        rec[col["dense_us"]] += self.dense_post_us

    def _speculated_vectors(self, step: int, layer: int) -> int:
        """Index vectors of the layer after ``layer`` if a lead policy speculates it there."""
        nxt = layer + 1
        if nxt >= self.n_layers or self.caches[nxt] is None:
            return 0
        return int(self.pp.selections[self.layer_map[nxt]].index_vectors[self.head_map, step].sum())

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
            waited_from = self.env.now
            yield index_ready
            rec[self.col["io_wait_us"]] += self.env.now - waited_from
        if vectors:
            target = self.setup.target
            score_us = float(scoring_us(vectors, target.head_dim, target.group_size,
                                        self.vector_bytes, self.compute, self.dram))
            yield self.env.timeout(score_us)
            rec[self.col["scoring_us"]] += score_us
        before = None
        if self.swap:  # what the next layer holds before its reads (see _swap_out)
            before = [self.caches[nxt].resident(h) for h in range(self.n_heads)]
        reads, attended = self._lookup(step, nxt, rec)
        self.lead[nxt] = (reads, attended, before)

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
            rec[col["latency_us"]] = self.env.now - started
            rec[col["dram_bytes"]] = self._dram_bytes(step)
            if on_step:
                on_step()


def simulate(pp: PolicyPass, setup: SimSetup, progress: bool = False) -> SimResult:
    """Replay ``pp``'s selections on the device of ``setup``; deterministic."""
    started = time.perf_counter()
    replay = Replay(pp, setup)
    bar = tqdm(
        total=pp.decode_steps,
        desc=f"{pp.policy.name}: simulate",
        unit="step",
        disable=not progress,
        leave=False,
    )
    replay.env.process(replay.decode(bar.update if progress else None))
    replay.env.run()
    bar.close()
    steps = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    steps.insert(0, "step", np.arange(pp.decode_steps, dtype=np.int32))
    sizes = np.nonzero(replay.io_size_counts)[0]
    io_sizes = pd.DataFrame(
        {"size_bytes": sizes * replay.page_bytes, "commands": replay.io_size_counts[sizes]}
    )
    lengths = np.nonzero(replay.run_length_counts)[0]
    run_lengths = pd.DataFrame({"run_entries": lengths, "runs": replay.run_length_counts[lengths]})
    peak_cache = sum(c.peak_resident_entries for c in replay.caches if c is not None)
    totals = {
        "entry_bytes": replay.entry_bytes,
        "cache_capacity_bytes": setup.cache_capacity_bytes,
        "peak_cache_bytes": peak_cache * replay.entry_bytes,
        "simulated_time_us": replay.env.now,
    }
    return SimResult(steps, io_sizes, run_lengths, totals, time.perf_counter() - started)
