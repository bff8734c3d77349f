"""Recording a run's flash schedule: what the SimPy replay submitted to the flash model, with
the byte addresses the layouts gave it (``record_io:``, :class:`sim.config.RecordIoSpec`).

The SimPy flash model (:mod:`sim.hardware.flash`) takes command sizes only; the addresses exist
where :mod:`sim.replay.flash_io` forms the commands (the layouts' slots, the plans of
:mod:`sim.kv.io_plan`). :class:`IoRecorder` is handed each batch there, on the sampled decode
steps only, and notes its simulated issue time and, from a callback on the batch's completion
event, its completion time. It changes nothing the simulation computes: the commands are
submitted as before, and the callback only reads the clock.

Addresses. The simulated flash is a set of areas, each page-aligned: one region per (layer, KV
head) holding its entries' slots (``slot * entry_bytes`` within the region, see
:mod:`sim.kv.layouts.base`), and per layer the area its streamed index is read from
(``stream_index``) and its swap area (``swap_layers``), both read and written from their start
in sequential commands. The schedule lays the areas that were used out one after another, in
the order (layer, KV regions by head, index, swap), each starting at a multiple of
:data:`AREA_ALIGN` and of the page: a KV region spans ``n_positions * entry_bytes`` or, for a
layout with an unbounded slot space (``dual_head``), up to its highest recorded command. An
address in the schedule is the area's base plus the command's offset in it.

Files (names in :mod:`sim.result_files`), read back by :mod:`sim.io_replay`:

* ``io_schedule.json``: ``schema`` and ``schema_version`` (:data:`SCHEMA_VERSION`), the kvsim
  version, the sampling (``every``, ``steps``), the recorded decode steps, the device's flash
  parameters (queue depth, page and largest command), ``entry_bytes``, the areas (kind, layer,
  head, base, bytes) and ``extent_bytes`` (where the last area ends);
* ``io_batches.parquet``: one row per submitted batch (a layer's cache-miss reads, its
  streamed index, a swap-in; an append's writes, a swap-out): ``batch``, ``step``, ``layer``,
  ``purpose`` (:data:`PURPOSES`), ``write``, ``issue_us`` and ``done_us`` (simulated time,
  from the start of the run), ``commands``, ``bytes``;
* ``io_commands.parquet``: one row per command, in submission order: ``batch``, ``step``,
  ``layer``, ``write``, ``offset`` and ``size`` (bytes).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import simpy

from sim import __version__
from sim.result_files import IO_BATCHES, IO_COMMANDS, IO_SCHEDULE

SCHEMA = "kvsim-io-schedule"
#: bumped whenever the files' meaning changes; ``kvsim replay`` refuses another version
SCHEMA_VERSION = 1
#: every area starts at a multiple of this (and of the page): O_DIRECT's 4 KiB alignment
AREA_ALIGN = 4096
#: what a batch is for
PURPOSES = ("kv_read", "index_read", "swap_read", "kv_write", "swap_write")

_KV, _INDEX, _SWAP = "kv", "index", "swap"


@dataclass
class IoSchedule:
    """A recorded schedule: the files' three parts (see the module docstring)."""

    meta: dict[str, Any]
    batches: pd.DataFrame
    commands: pd.DataFrame

    def files(self) -> dict[str, Any]:
        """File name -> content, as a run's extra records are written
        (:func:`sim.experiment.store.write_run`)."""
        return {IO_SCHEDULE: self.meta, IO_BATCHES: self.batches, IO_COMMANDS: self.commands}


def sampled_steps(decode_steps: int, every: int, steps: int | None) -> list[int]:
    """The decode steps a ``record_io: {every, steps}`` records."""
    chosen = list(range(0, decode_steps, every))
    return chosen if steps is None else chosen[:steps]


class IoRecorder:
    """Collects the batches of the sampled steps (see the module docstring). ``region_bytes``:
    a KV region's span in the simulation (``n_positions * entry_bytes``)."""

    def __init__(
        self, env: simpy.Environment, *, decode_steps: int, every: int, steps: int | None,
        entry_bytes: int, region_bytes: int, page_bytes: int, max_io_bytes: int,
        queue_depth: int, flash: dict[str, Any], device: str,
    ) -> None:
        self.env = env
        self.every, self.steps = every, steps
        self.sampled = sampled_steps(decode_steps, every, steps)
        self._sampled = set(self.sampled)
        self.decode_steps = decode_steps
        self.entry_bytes, self.region_bytes = entry_bytes, region_bytes
        self.page_bytes, self.max_io_bytes = page_bytes, max_io_bytes
        self.queue_depth, self.flash, self.device = queue_depth, flash, device
        # per batch: step, layer, purpose, write, issue_us, done_us
        self._batches: list[list[Any]] = []
        # the areas by id: (kind, layer, head); head -1 for a layer's index and swap areas
        self._area_keys: list[tuple[str, int, int]] = []
        self._area_ids: dict[tuple[str, int, int], int] = {}
        # per command (compact: a long run's schedule has millions): batch, area id, offset in
        # the area, size
        self._batch_of = array("q")
        self._areas = array("q")
        self._offsets = array("q")
        self._sizes = array("q")

    def wants(self, step: int) -> bool:
        """Whether decode step ``step`` is recorded."""
        return step in self._sampled

    def add(
        self, step: int, layer: int, purpose: str, event: simpy.Event,
        areas: list[int], offsets: list[int], sizes: list[int],
    ) -> None:
        """One batch submitted now, completing with ``event``: command ``i`` moves
        ``sizes[i]`` bytes at ``offsets[i]`` of area ``areas[i]`` (an id from :meth:`kv` or
        :meth:`sequential`)."""
        if not sizes:
            return
        batch = len(self._batches)
        row = [step, layer, purpose, purpose.endswith("_write"), self.env.now, math.nan]
        self._batches.append(row)

        def _done(_event: simpy.Event) -> None:
            row[5] = self.env.now

        event.callbacks.append(_done)
        self._batch_of.extend([batch] * len(sizes))
        self._areas.extend(areas)
        self._offsets.extend(offsets)
        self._sizes.extend(sizes)

    def _area(self, key: tuple[str, int, int]) -> int:
        area = self._area_ids.get(key)
        if area is None:
            area = self._area_ids[key] = len(self._area_keys)
            self._area_keys.append(key)
        return area

    def kv(self, layer: int, heads: list[int]) -> list[int]:
        """The area ids of KV heads ``heads`` of ``layer`` (each head's region)."""
        return [self._area((_KV, layer, head)) for head in heads]

    def sequential(self, kind: str, layer: int, sizes: list[int]) -> tuple[list[int], list[int]]:
        """Area ids and offsets of ``sizes`` read or written from the start of ``layer``'s
        ``kind`` area (``"index"`` or ``"swap"``), one after another."""
        offsets = [0] * len(sizes)
        for i in range(1, len(sizes)):
            offsets[i] = offsets[i - 1] + sizes[i - 1]
        return [self._area((kind, layer, -1))] * len(sizes), offsets

    def schedule(self) -> IoSchedule:
        """The schedule recorded so far, laid out (see the module docstring)."""
        align = math.lcm(AREA_ALIGN, self.page_bytes)
        offsets = np.frombuffer(self._offsets, dtype=np.int64) if self._offsets else np.zeros(
            0, dtype=np.int64)
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if self._sizes else np.zeros(
            0, dtype=np.int64)
        area_of = np.frombuffer(self._areas, dtype=np.int64) if self._areas else np.zeros(
            0, dtype=np.int64)
        ends = np.zeros(len(self._area_keys), dtype=np.int64)
        np.maximum.at(ends, area_of, offsets + sizes)
        order = {_KV: 0, _INDEX: 1, _SWAP: 2}
        base_of = np.zeros(len(self._area_keys), dtype=np.int64)
        areas, cursor = [], 0
        for area in sorted(range(len(self._area_keys)),
                           key=lambda a: (self._area_keys[a][1], order[self._area_keys[a][0]],
                                          self._area_keys[a][2])):
            kind, layer, head = self._area_keys[area]
            span = int(ends[area])
            if kind == _KV:
                span = max(span, self.region_bytes)
            span = -(-span // align) * align
            base_of[area] = cursor
            areas.append({"kind": kind, "layer": layer, "head": head, "base": cursor,
                          "bytes": span})
            cursor += span
        bases = base_of[area_of]
        batch_of = (np.frombuffer(self._batch_of, dtype=np.int64).copy() if self._batch_of
                    else np.zeros(0, dtype=np.int64))
        rows = self._batches
        batches = pd.DataFrame({
            "batch": np.arange(len(rows), dtype=np.int64),
            "step": np.array([r[0] for r in rows], dtype=np.int64),
            "layer": np.array([r[1] for r in rows], dtype=np.int64),
            "purpose": [r[2] for r in rows],
            "write": np.array([r[3] for r in rows], dtype=bool),
            "issue_us": np.array([r[4] for r in rows], dtype=np.float64),
            "done_us": np.array([r[5] for r in rows], dtype=np.float64),
            "commands": np.bincount(batch_of, minlength=len(rows)).astype(np.int64),
            "bytes": np.bincount(batch_of, weights=sizes, minlength=len(rows)).astype(np.int64),
        })
        commands = pd.DataFrame({
            "batch": batch_of,
            "step": batches["step"].to_numpy()[batch_of],
            "layer": batches["layer"].to_numpy()[batch_of],
            "write": batches["write"].to_numpy()[batch_of],
            "offset": bases + offsets,
            "size": sizes,
        })
        meta = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kvsim_version": __version__,
            "every": self.every,
            "steps_requested": self.steps,
            "decode_steps": self.decode_steps,
            "recorded_steps": self.sampled,
            "device": self.device,
            "queue_depth": self.queue_depth,
            "page_bytes": self.page_bytes,
            "max_io_bytes": self.max_io_bytes,
            "entry_bytes": self.entry_bytes,
            "flash": self.flash,
            "time_unit": "us",
            "areas": areas,
            "extent_bytes": cursor,
            "batches": len(rows),
            "commands": int(sizes.size),
        }
        return IoSchedule(meta, batches, commands)
