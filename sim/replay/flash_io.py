"""A replay's traffic between the DRAM cache and the flash, and what it adds to a step's
records: each layer's cache lookup and flash reads, its appended K/V written per the layout,
its streamed index (``stream_index``) and, with ``swap_layers``, its cache image read back
before its lookup and the entries it gained written after it.

Reads are awaited by the decode process (:mod:`sim.replay.process`); writes are not, but share
the flash queue, units and link with later reads. The KV heads of a layer are looked up,
planned and read together (flat indices ``head * n_positions + position``: each head's
entries live in its own flash region); what depends on the selection only is computed once
per trace KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from sim.hardware import Flash
from sim.kv.io_plan import plan_reads, plan_write_commands, plan_writes
from sim.replay.held import in_sorted
from sim.replay.io_record import IoRecorder
from sim.replay.setup import PreparedRun


@dataclass
class PendingReads:
    """A layer's issued cache lookup and flash reads.

    ``attended``: entries the layer attends, ``None`` while a lookup deferred behind a swap-in
    has not run (see :meth:`FlashIO.lookup`; the event's value is then the entries).
    ``before``: with ``swap_layers``, the layer's resident entries before the lookup (flat
    indices, what :meth:`FlashIO.swap_out` compares against); ``None`` otherwise.
    """

    event: simpy.Event
    attended: int | None
    before: np.ndarray | None


class FlashIO:
    """The flash traffic of one replay, recorded into ``records`` (one row per decode step,
    columns by ``col``), with the histograms of read command sizes and run lengths."""

    def __init__(self, env: simpy.Environment, flash: Flash, run: PreparedRun,
                 records: np.ndarray, col: dict[str, int]) -> None:
        self.env, self.flash, self.run = env, flash, run
        self.records, self.col = records, col
        # the pending swap-in of each layer (PipelineSpec.swap_layers)
        self.swap_in_pending: list[simpy.Event | None] = [None] * run.n_layers
        # command sizes moving a contiguous size, by size (see sequential_commands)
        self.sequential: dict[int, tuple[list[int], int]] = {}
        # write commands of one entry by its byte offset within a page (the plan of one slot
        # depends on nothing else)
        self.entry_writes: dict[int, list[int]] = {}
        max_pages = run.max_io_bytes // run.page_bytes
        # read commands by size in pages, runs of contiguous entries by length (Python ints:
        # a few per layer and step, below numpy's per-call cost)
        self._io_sizes = [0] * (max_pages + 1)
        self._run_lengths: dict[int, int] = {}
        # the flash schedule's recorder (record_io; None: nothing is recorded)
        self.recorder: IoRecorder | None = None

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

    # -- reads -----------------------------------------------------------------------------

    def lookup(
        self, step: int, layer: int, before: np.ndarray | None, rec: np.ndarray
    ) -> PendingReads:
        """The layer's cache lookup and flash reads, once its cache image is in DRAM;
        ``before``: the layer's swap snapshot, carried along for :meth:`swap_out`.

        Without a swap-in in flight the lookup and reads are issued now. Otherwise they run in
        a side process as soon as the swap-in lands, so the decode process goes on with
        projection and scoring meanwhile; the returned event is then that process (its value:
        the entries attended) and the entries are ``None`` until it ends. Either way the decode
        process's wait for the event is its ``io_wait``.
        """
        pending = self.swap_in_pending[layer]
        self.swap_in_pending[layer] = None
        if pending is None or pending.processed:
            return PendingReads(*self._issue_reads(step, layer, rec), before)

        def after_swap_in():
            yield pending
            reads, attended = self._issue_reads(step, layer, rec)
            yield reads
            return attended

        return PendingReads(self.env.process(after_swap_in()), None, before)

    def _issue_reads(self, step: int, layer: int, rec: np.ndarray) -> tuple[simpy.Event, int]:
        """Cache lookup and flash reads of one layer; returns the read event, entries attended.
        """
        col, run = self.col, self.run
        selection = run.selection(layer)
        heads = selection.heads
        assert heads is not None  # a layer that reads is not resident, so it selects per head
        trace_heads = run.trace_heads
        chosen = {t: heads[t].at(step) for t in run.distinct_trace_heads}
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
        if run.holds[layer] or run.may_buffer[layer]:
            lookups, held = self._cache_lookups(layer, step, lookups)
            rec[col["held_entries"]] += held
        cache = run.cache(layer)
        before = (cache.hits, cache.misses, cache.streamed)
        missed = cache.access_flat(lookups, step * run.n_layers + layer)
        rec[col["hits"]] += cache.hits - before[0]
        rec[col["misses"]] += cache.misses - before[1]
        rec[col["streamed"]] += cache.streamed - before[2]
        if selection.extra_reads is None:
            rec[col["selected_misses"]] += cache.misses - before[1]
        else:  # the misses among the attended entries, without the extra reads'
            rec[col["selected_misses"]] += self._count_in(missed, per_head)
        # One plan for all KV heads: each head's entries live in its own flash region.
        table = run.slot_tables[layer]
        assert table is not None  # a layer with a cache has layouts
        regions, positions = np.divmod(missed, run.n_positions)
        plan = plan_reads(
            table[run.slot_rows[regions], positions], run.entry_bytes, run.page_bytes,
            run.max_io_bytes, regions=regions,
        )
        command_bytes = plan.command_bytes.tolist()
        runs = self._run_lengths
        for length in plan.run_entries.tolist():
            runs[length] = runs.get(length, 0) + 1
        sizes, page = self._io_sizes, run.page_bytes
        for size in command_bytes:
            sizes[size // page] += 1
        rec[col["read_bytes"]] += sum(command_bytes)
        rec[col["useful_read_bytes"]] += plan.useful_bytes
        rec[col["read_commands"]] += len(command_bytes)
        rec[col["selected_entries"]] += n_selected
        issued = self.env.now
        event = self.flash.read(command_bytes)
        recorder = self.recorder
        if recorder is not None and command_bytes and recorder.wants(step):
            recorder.add(step, layer, "kv_read", event,
                         recorder.kv(layer, plan.command_regions.tolist()),
                         plan.command_offset_bytes.tolist(), command_bytes)
        if len(command_bytes):

            def _done(_event: simpy.Event, issued: float = issued) -> None:
                rec[col["read_busy_us"]] += self.env.now - issued

            event.callbacks.append(_done)
        attended = n_selected + run.n_heads  # + the current token per head
        return event, attended

    def _cache_lookups(self, layer: int, step: int,
                       lookups: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Each head's ``lookups`` (alike for the heads of one trace head) without what DRAM
        holds outside the cache, and how many entries that leaves out (computed once per trace
        head: the KV heads replaying one look up alike, their layouts buffer alike)."""
        run = self.run
        selection = run.selection(layer)
        layouts = run.layouts[layer]
        done: dict[int, np.ndarray] = {}
        out, held = [], 0
        for h, wanted in enumerate(lookups):
            trace_head = run.trace_heads[h]
            kept = done.get(trace_head)
            if kept is None:
                buffered = None
                if run.may_buffer[layer] and layouts[h].buffered_entries:
                    buffered = layouts[h].buffered_positions()
                kept = done[trace_head] = run.held.without(
                    selection, step, wanted, trace_head, buffered
                )
            out.append(kept)
            held += len(wanted) - len(kept)
        return out, held

    def _count_in(self, flat: np.ndarray, per_head: list[np.ndarray]) -> int:
        """How many of the flat indices ``flat`` (ascending) are among the positions
        ``per_head[h]`` (each sorted, unique) of their head."""
        sizes = [len(p) for p in per_head]
        if not flat.size or not sum(sizes):
            return 0
        among = np.concatenate(per_head).astype(np.int64)
        among += np.repeat(self.run.head_offsets, sizes)  # ascending: heads, then positions
        return int(np.count_nonzero(in_sorted(flat, among)))

    def sequential_commands(self, size: int) -> tuple[list[int], int]:
        """Command sizes (bytes, whole pages) moving ``size`` contiguous bytes, and their
        total: maximum-size commands, then the remainder rounded up to pages (none for
        ``size`` 0)."""
        known = self.sequential.get(size)
        if known is not None:
            return known
        page_bytes = self.run.page_bytes
        pages = -(-size // page_bytes)
        per_command = self.run.max_io_bytes // page_bytes
        commands = [per_command * page_bytes] * (pages // per_command)
        if pages % per_command:
            commands.append(pages % per_command * page_bytes)
        self.sequential[size] = commands, sum(commands)
        return commands, sum(commands)

    def stream_index(self, step: int, layer: int, vectors: int, rec: np.ndarray) -> simpy.Event:
        """Read ``layer``'s index (stored contiguously on flash) in maximum-size commands."""
        commands, total = self.sequential_commands(vectors * self.run.vector_bytes)
        rec[self.col["index_read_bytes"]] += total
        event = self.flash.read(commands)
        if self.recorder is not None and commands and self.recorder.wants(step):
            self.recorder.add(step, layer, "index_read", event,
                              *self.recorder.sequential("index", layer, commands), commands)
        return event

    # -- per-layer cache swapping (PipelineSpec.swap_layers) -----------------------------------

    def swap_in(self, step: int, layer: int) -> int:
        """Issue the read of ``layer``'s cache image for decode step ``step``; returns the
        image's entries (0 for a layer without a cache, which is not swapped)."""
        cache = self.run.caches[layer]
        if cache is None:
            return 0
        entries = cache.resident_entries
        commands, total = self.sequential_commands(entries * self.run.entry_bytes)
        self.records[step, self.col["swap_read_bytes"]] += total
        event = self.swap_in_pending[layer] = self.flash.read(commands)
        if self.recorder is not None and commands and self.recorder.wants(step):
            self.recorder.add(step, layer, "swap_read", event,
                              *self.recorder.sequential("swap", layer, commands), commands)
        return entries

    def swap_out(self, step: int, layer: int, before: np.ndarray, rec: np.ndarray) -> None:
        """Write the entries that became resident during the layer to its swap area
        (``before``: the layer's resident entries before its reads, flat indices)."""
        resident = self.run.resident(layer)
        new = len(resident)
        if new and len(before):
            new -= int(np.count_nonzero(in_sorted(resident, before)))
        commands, total = self.sequential_commands(new * self.run.entry_bytes)
        if commands:
            rec[self.col["swap_write_bytes"]] += total
            event = self.flash.write(commands)
            if self.recorder is not None and self.recorder.wants(step):
                self.recorder.add(step, layer, "swap_write", event,
                                  *self.recorder.sequential("swap", layer, commands), commands)

    # -- writes ----------------------------------------------------------------------------

    def append(self, step: int, layer: int, rec: np.ndarray) -> None:
        """The new token's K/V: resident in the cache, written to flash per the layout.

        A layout is placed and relabelled once per trace head (see
        :meth:`sim.replay.setup.PreparedRun._placed_layout`); each KV head's region gets the
        writes of its trace head's layout."""
        run = self.run
        selection = run.selection(layer)
        position = run.pp.prompt_len + step
        groups = selection.append_groups
        now = step * run.n_layers + layer
        cache = run.cache(layer)
        layouts = run.layouts[layer]
        trace_heads = run.trace_heads
        group_of = None if groups is None else [int(g) for g in groups[:, step].tolist()]
        # slots to write now per trace head's layout: the new token's, a write buffer's full
        # page, relocated entries; and whether the layout's write buffer holds the new token
        written: dict[int, list[int]] = {}
        buffered: dict[int, bool] = {}
        for t in run.distinct_trace_heads:
            layout = layouts[run.first_head[t]]
            slot = layout.place_append(position, None if group_of is None else group_of[t])
            due = layout.due_writes(slot)
            written[t] = [int(due[0])] if len(due) == 1 else due.tolist()
            buffered[t] = slot not in written[t]
        if group_of is not None and cache.replacement.uses_groups:
            cache.assign_group_heads(position, [group_of[t] for t in trace_heads], now)
        relabels = run.relabels_at[layer].get(step)
        if relabels:
            # cluster splits: the layout may relocate entries (written from DRAM)
            relocated = dict.fromkeys(run.distinct_trace_heads, 0)
            for head, event in relabels:
                t = trace_heads[head]
                if head == run.first_head[t]:
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
        for t in run.distinct_trace_heads:
            slots = written[t]
            if len(slots) == 1:
                offset = slots[0] * run.entry_bytes % run.page_bytes
                sizes = self.entry_writes.get(offset)
                if sizes is None:
                    sizes = self.entry_writes[offset] = self._write_commands(slots)
            else:
                sizes = self._write_commands(slots)
            plans[t] = sizes
        command_bytes = [size for t in trace_heads for size in plans[t]]
        # heads whose new entry DRAM holds outside the cache (the policy's window or sinks, a
        # split buffer, a layout's write buffer): it is not inserted into the cache
        if run.holds[layer]:
            holds = {t: buffered[t] or run.held.holds_new(selection, step, t)
                     for t in run.distinct_trace_heads}
        else:
            holds = buffered
        held_new = [holds[t] for t in trace_heads]
        new = np.array([position])
        if not any(held_new):
            cache.insert([new] * run.n_heads, now)
        elif not all(held_new):
            cache.insert([new[:0] if held else new for held in held_new], now)
        rec[self.col["write_bytes"]] += sum(command_bytes)
        rec[self.col["write_commands"]] += len(command_bytes)
        submitted = self.flash.write(command_bytes)
        if self.recorder is not None and command_bytes and self.recorder.wants(step):
            self._record_appends(step, layer, written, submitted)

    def _record_appends(self, step: int, layer: int, written: dict[int, list[int]],
                        event: simpy.Event) -> None:
        """Hand an append's writes to the recorder, with the offsets in each KV head's region
        (the commands :meth:`append` submitted, in the same order)."""
        run, recorder = self.run, self.recorder
        assert recorder is not None
        areas, offsets, sizes = [], [], []
        for head, t in enumerate(run.trace_heads):
            at, size = plan_write_commands(
                np.array(written[t], dtype=np.int64), run.entry_bytes, run.page_bytes,
                run.max_io_bytes,
            )
            areas += recorder.kv(layer, [head] * len(size))
            offsets += at.tolist()
            sizes += size.tolist()
        recorder.add(step, layer, "kv_write", event, areas, offsets, sizes)

    def _write_commands(self, slots: list[int]) -> list[int]:
        """Sizes of the commands writing ``slots`` of one region (:func:`plan_writes`)."""
        run = self.run
        return plan_writes(
            np.array(slots, dtype=np.int64), run.entry_bytes, run.page_bytes, run.max_io_bytes
        ).tolist()
