"""The decode process: every decode step, every simulated layer, as SimPy timeouts and waits.

One layer runs ``dense (QKV projection) -> index scoring -> cache lookup -> flash reads ->
attention over the selected entries -> append the new token's K/V -> dense (output projection +
MLP)``; its reads are issued at its :class:`~sim.replay.setup.ReadTiming` and the time it waits
for them (or a streamed index, or a swap-in) is its ``io_wait``. After the last layer, once per
token, the final norm and the LM head. The step's latency and DRAM footprint end its record.
The flash traffic itself is :mod:`sim.replay.flash_io`'s, the compute times
:mod:`sim.replay.compute`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import simpy

from sim.config import RecordIoSpec
from sim.footprint import PART_COLUMNS
from sim.hardware import Flash
from sim.outputs import STEP_COLUMNS, PolicyPass
from sim.replay.compute import ComputeTimes
from sim.replay.flash_io import FlashIO, PendingReads
from sim.replay.io_record import IoRecorder
from sim.replay.setup import PreparedRun, ReadTiming, SimSetup


class Replay:
    """The SimPy model of one run: a decode process on the CPU, the flash beside it.

    ``env.process(decode(on_step))`` then ``env.run()`` fills ``records`` (a row per decode
    step, :data:`sim.outputs.STEP_COLUMNS`; ``col``: a column's index). ``run``: what the
    replay built before the decode (caches, layouts, sizes); ``io``: the flash traffic and its
    histograms; ``flash``: the SimPy flash model. ``record_io``: record the flash schedule of
    the sampled steps (``io.recorder``; simulated numbers are the same with or without).
    """

    def __init__(
        self, pp: PolicyPass, setup: SimSetup, record_io: RecordIoSpec | None = None
    ) -> None:
        self.pp = pp
        self.setup = setup
        self.env = simpy.Environment()
        self.flash = Flash(self.env, setup.device.flash)
        self.run = run = PreparedRun(pp, setup)
        self.times = ComputeTimes(
            setup.target, run.entry_bytes, run.vector_bytes, setup.device.compute,
            setup.device.dram,
        )
        # per-layer cache swapping (PipelineSpec.swap_layers): the largest (current +
        # incoming) resident image pair of the step
        self.swap = setup.pipeline.swap_layers
        self.step_cache_peak = 0
        # lead policies (selection_lead_layers): the next layer's reads, issued at this layer's
        # speculation point, and its streamed index
        self.lead: dict[int, PendingReads] = {}
        self.lead_index: dict[int, simpy.Event] = {}
        self.records = np.zeros((pp.decode_steps, len(STEP_COLUMNS)), dtype=np.float64)
        self.col = {name: i for i, name in enumerate(STEP_COLUMNS)}
        self.io = FlashIO(self.env, self.flash, run, self.records, self.col)
        if record_io is not None:  # the flash schedule of sampled steps (sim.replay.io_record)
            flash = setup.device.flash
            self.io.recorder = IoRecorder(
                self.env, decode_steps=pp.decode_steps, every=record_io.every,
                steps=record_io.steps, entry_bytes=run.entry_bytes,
                region_bytes=run.n_positions * run.entry_bytes, page_bytes=run.page_bytes,
                max_io_bytes=run.max_io_bytes, queue_depth=flash.queue_depth,
                flash=flash.model_dump(mode="json"), device=setup.device.name,
            )

    def decode(self, on_step: Callable[[], None] | None):
        """The decode process: every step's layers, then its LM head; the step's latency and
        DRAM footprint end its record. ``on_step`` is called after each step."""
        col = self.col
        for step in range(self.pp.decode_steps):
            rec = self.records[step]
            started = self.env.now
            if self.swap:
                self.step_cache_peak = 0
                if step == 0 or self.run.n_layers == 1:  # nothing earlier swapped layer 0 in
                    self.io.swap_in(step, 0)
            for layer in range(self.run.n_layers):
                yield from self._layer(step, layer, rec)
            if self.times.lm_head_us:  # counted in dense_us
                yield from self._dense(self.times.lm_head_us, rec)
            rec[col["latency_us"]] = self.env.now - started
            self._record_dram(step, rec)
            if on_step:
                on_step()

    def _layer(self, step: int, layer: int, rec: np.ndarray):
        """One simulated layer of decode step ``step``: timeouts of the decode process, records
        added to ``rec``. The layer's reads are issued at its :class:`ReadTiming`."""
        timing = self.run.read_timing[layer]
        incoming, before = self._swap_ahead(step, layer, timing)
        early = self._reads_at_start(step, layer, timing, before, rec)
        vectors = (
            0 if timing is ReadTiming.BY_PREVIOUS_LAYER
            else self.run.index_vectors_at(layer, step)
        )
        index_ready = self._stream_indexes(step, layer, vectors, rec)
        during = yield from self._project_and_score(
            step, layer, timing, vectors, index_ready, before, rec
        )
        late = None
        if timing is ReadTiming.AFTER_SCORING:
            late = self.io.lookup(step, layer, before, rec)
        if self.pp.policy.selection_lead_layers:
            yield from self._speculate(step, layer, rec)
        reads = early or during or late  # at most one, as the timing says; None: resident
        attended = yield from self._attended_entries(step, layer, reads, rec)
        yield from self._attend(attended, rec)
        self._append_and_swap_out(step, layer, reads, incoming, rec)
        yield from self._dense(self.times.dense_post_us, rec)

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
        last = layer + 1 == self.run.n_layers
        next_step, next_layer = (step + 1, 0) if last else (step, layer + 1)
        if next_layer != layer and next_step < self.pp.decode_steps:
            incoming = self.io.swap_in(next_step, next_layer)
        if timing in (ReadTiming.NONE, ReadTiming.BY_PREVIOUS_LAYER):
            return incoming, None
        return incoming, self.run.resident(layer)

    def _reads_at_start(
        self,
        step: int,
        layer: int,
        timing: ReadTiming,
        before: np.ndarray | None,
        rec: np.ndarray,
    ) -> PendingReads | None:
        """The reads in flight when the layer starts: the previous layer's speculation's, or
        issued now for a selection that needs no query."""
        if timing is ReadTiming.BY_PREVIOUS_LAYER:
            return self.lead.pop(layer)
        if timing is ReadTiming.AT_LAYER_START:
            return self.io.lookup(step, layer, before, rec)
        return None

    def _stream_indexes(
        self, step: int, layer: int, vectors: int, rec: np.ndarray
    ) -> simpy.Event | None:
        """With ``stream_index``: start reading this layer's index (the event the scoring waits
        for, ``None`` if it has none) and, for a lead policy, the next layer's."""
        if not self.setup.pipeline.stream_index:
            return None
        index_ready = self.io.stream_index(step, layer, int(vectors), rec) if vectors else None
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
        first_us = self.times.dense_q_us if split else self.times.dense_pre_us
        yield from self._dense(first_us, rec)
        if index_ready is not None:
            yield from self._wait(index_ready, rec)
        reads = self.io.lookup(step, layer, before, rec) if split else None
        yield from self._score(vectors, rec)
        if split:
            yield from self._dense(self.times.dense_pre_us - first_us, rec)
        return reads

    def _attended_entries(
        self, step: int, layer: int, reads: PendingReads | None, rec: np.ndarray
    ):
        """Entries the layer attends, over its KV heads: a resident layer's whole context or
        window; else its lookup's, once the reads are in (the wait is ``io_wait``)."""
        if reads is None:
            resident = self.run.footprint.resident[layer]
            assert resident is not None  # only a resident layer issues no reads
            return int(resident[step])
        yield from self._wait(reads.event, rec)
        return reads.event.value if reads.attended is None else reads.attended

    def _append_and_swap_out(
        self,
        step: int,
        layer: int,
        reads: PendingReads | None,
        incoming: int,
        rec: np.ndarray,
    ) -> None:
        """After attention: the new token's K/V appended (written to flash, not awaited), the
        layer's newly resident entries swapped out, the step's resident image peak updated."""
        cache = self.run.caches[layer]
        if cache is not None:
            self.io.append(step, layer, rec)
            assert reads is not None  # a layer with a cache issues reads at every timing
            if reads.before is not None:
                self.io.swap_out(step, layer, reads.before, rec)
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
        score_us = self.times.scoring_us(vectors)
        yield self.env.timeout(score_us)
        rec[self.col["scoring_us"]] += score_us

    def _attend(self, attended: int, rec: np.ndarray):
        attend_us = self.times.attention_us(attended)
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
        if nxt >= self.run.n_layers or self.run.caches[nxt] is None:
            return 0
        return int(self.run.index_vectors_at(nxt, step))

    def _stream_next_index(self, step: int, layer: int, rec: np.ndarray) -> None:
        """``stream_index`` with a lead policy: start reading the next layer's index at the
        start of ``layer``, so it overlaps this layer's QKV projection as a layer's own does."""
        vectors = self._speculated_vectors(step, layer)
        if vectors:
            self.lead_index[layer + 1] = self.io.stream_index(step, layer + 1, vectors, rec)

    def _speculate(self, step: int, layer: int, rec: np.ndarray):
        """A lead policy's speculation point in ``layer`` (InfiniGen): score the next layer's
        index (once streamed in, with ``stream_index``) and issue its reads now; the next layer
        waits on them instead of scoring and reading for itself. Nothing past the last layer
        (the next step's layer 0 selects for itself) or for a layer without a cache."""
        nxt = layer + 1
        if nxt >= self.run.n_layers or self.run.caches[nxt] is None:
            return
        vectors = self._speculated_vectors(step, layer)
        index_ready = self.lead_index.pop(nxt, None)
        if index_ready is not None:
            yield from self._wait(index_ready, rec)
        yield from self._score(vectors, rec)
        # with swapping, what the next layer holds before its reads (see FlashIO.swap_out)
        before = self.run.resident(nxt) if self.swap else None
        self.lead[nxt] = self.io.lookup(step, nxt, before, rec)

    def _record_dram(self, step: int, rec: np.ndarray) -> None:
        """The step's DRAM footprint and its parts (:mod:`sim.footprint`).

        With ``swap_layers`` the caches count as the step's largest pair of resident images
        (the running layer's, at its end, plus the one being swapped in for the next layer)
        instead of every layer's; layouts' write buffers and full-attention layers stay.
        """
        run = self.run
        cached = written = 0
        for layer, cache in enumerate(run.caches):
            if cache is None:
                continue
            if not self.swap:
                cached += cache.resident_entries
            if run.may_buffer[layer]:
                written += run.write_buffered(layer, step)
        if self.swap:
            cached = self.step_cache_peak
        static = run.footprint
        parts = (
            cached * run.entry_bytes,
            int(static.index[step]),
            int(static.split[step]) + written * run.entry_bytes,
            int(static.window[step]),
            int(static.dense[step]),
        )
        for column, value in zip(PART_COLUMNS, parts, strict=True):
            rec[self.col[column]] = value
        rec[self.col["dram_bytes"]] = sum(parts)
