"""Executing a recorded flash schedule on real storage, timed.

One O_DIRECT file under the given directory (:class:`sim.calibrate.storage.DirectFile`, always
removed) stands for the simulated flash: the schedule's areas at their recorded byte addresses
(:mod:`sim.replay.io_record`), so a command reads or writes the same bytes of the file as it
did of the simulated flash. The whole file is first written once (unwritten blocks would be
read as zeros without reaching the device) and flushed to the medium (``fsync``), then every
recorded step is replayed in order.

A step's batches are replayed as the simulation submitted them, in *phases*: a phase is a
maximal set of the step's batches whose simulated intervals ``[issue, completion]`` overlap
(the device busy throughout); between two phases the simulated device was idle while the CPU
computed, and the replay goes straight on to the next phase (compute is not replayed). A phase
is one :meth:`sim.calibrate.storage.Issuer.run` at the run's queue depth: its commands start
in the simulation's submission order (the flash model's command queue is FIFO), at most
``queue_depth`` in flight, reads and writes mixed as submitted, and each batch after the first
is held back until its simulated offset from the phase's start has passed in wall-clock time.
A layer's reads are thus all in flight together up to the queue depth and the step waits for
them (the phase ends when its last command completes); writes are issued where the simulation
issued them and overlap what they overlapped there.

Alignment: O_DIRECT needs 4 KiB (:data:`sim.calibrate.storage.ALIGN`) offsets and sizes. The
simulated commands cover whole flash pages, so with a page of 4 KiB or a multiple they already
are; otherwise each command is rounded out to the 4 KiB blocks it touches and the report says
how many were.

A batch's measured interval is from its first command's issue (the system call's start) to
its last command's completion, as its simulated interval is from its submission (when its
first command enters the queue) to its last completion.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.calibrate.storage import (
    ALIGN,
    Command,
    DirectFile,
    Issuer,
    check_directory,
)
from sim.calibrate.uring import UringIssuer, choose_issuer
from sim.errors import StorageError
from sim.io_replay.schedule import Schedule

#: the measurement file's name under the directory (one per process)
FILE_PREFIX = ".kvsim-replay-"
#: the fill's command size and queue depth (large sequential writes)
FILL_IO_BYTES, FILL_QD = 512 * 1024, 8
#: the deepest queue replayed: one thread and one buffer of up to 512 KiB per queue slot (UFS
#: 2.x-4.0 has 32 slots, NVMe drives are driven at up to a few hundred in flight)
MAX_QUEUE_DEPTH = 256


@dataclass(frozen=True)
class Aligned:
    """The schedule's commands as issued: 4 KiB-aligned offsets and sizes, and how many of the
    recorded commands had to be rounded out (and by how many bytes in all)."""

    offsets: np.ndarray
    sizes: np.ndarray
    rounded: int
    added_bytes: int


def aligned_commands(schedule: Schedule) -> Aligned:
    """Each command rounded out to the :data:`ALIGN` blocks it touches."""
    offsets = schedule.commands["offset"].to_numpy(dtype=np.int64)
    sizes = schedule.commands["size"].to_numpy(dtype=np.int64)
    low = offsets // ALIGN * ALIGN
    high = -(-(offsets + sizes) // ALIGN) * ALIGN
    changed = (low != offsets) | (high != offsets + sizes)
    return Aligned(low, high - low, int(changed.sum()), int((high - low - sizes).sum()))


def file_bytes(schedule: Schedule) -> int:
    """The measurement file's size: the schedule's extent in whole :data:`ALIGN` blocks (at
    least one)."""
    return max(ALIGN, -(-schedule.extent_bytes // ALIGN) * ALIGN)


def phases(issue_us: np.ndarray, done_us: np.ndarray) -> list[np.ndarray]:
    """Batches (indices into the two arrays, in issue order) grouped into maximal sets whose
    intervals ``[issue, done]`` overlap, chained; phases in time order. Touching intervals
    (one ends exactly when the next starts) are one phase: the device never idled between."""
    order = np.argsort(issue_us, kind="stable")
    groups: list[list[int]] = []
    end = -np.inf
    for index in order.tolist():
        if not groups or issue_us[index] > end:
            groups.append([])
            end = -np.inf
        groups[-1].append(index)
        end = max(end, float(done_us[index]))
    return [np.array(group, dtype=np.int64) for group in groups]


@dataclass(frozen=True)
class Execution:
    """What :func:`execute` measured: per batch its measured ``start_us`` / ``end_us`` (from
    its step's replay start) beside the schedule's, the fill (with its ``fsync``, and the
    file's creation), the alignment, and the replay's own time."""

    batches: pd.DataFrame
    aligned: Aligned
    file_bytes: int
    fill_seconds: float
    fill_mb_s: float
    seconds: float
    #: how the commands were issued: ``threads`` or ``io_uring``
    issuer: str = "threads"


def execute(
    schedule: Schedule, directory: Path, on_step: Callable[[], None] | None = None,
    issuer: str = "auto",
) -> Execution:
    """Replay ``schedule`` on a file under ``directory`` (see the module docstring);
    ``on_step`` is called after each step. ``issuer``: ``threads``
    (:class:`sim.calibrate.storage.Issuer`), ``io_uring``
    (:class:`sim.calibrate.uring.UringIssuer`) or ``auto`` (io_uring where it works)."""
    use_uring = choose_issuer(issuer, "replay") == "io_uring"
    size = file_bytes(schedule)
    depth = schedule.queue_depth
    if depth > MAX_QUEUE_DEPTH:
        raise StorageError(
            f"replay: the run's queue depth is {depth}; the replay keeps one thread per queue "
            f"slot and replays at most {MAX_QUEUE_DEPTH}"
        )
    check_directory(directory, size, command="replay",
                    smaller="record fewer steps or replay on a larger file system")
    aligned = aligned_commands(schedule)
    batches = schedule.batches
    max_io = max(FILL_IO_BYTES, int(aligned.sizes.max()) if aligned.sizes.size else ALIGN)
    started = time.perf_counter()
    writes = batches["write"].to_numpy(dtype=bool)
    issue_us = batches["issue_us"].to_numpy(dtype=np.float64)
    done_us = batches["done_us"].to_numpy(dtype=np.float64)
    # the commands of each batch, in submission order
    batch_of = schedule.commands["batch"].to_numpy(dtype=np.int64)
    order = np.argsort(batch_of, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(batch_of, minlength=len(batches)))))
    start = np.full(len(batches), np.nan)
    end = np.full(len(batches), np.nan)
    make = UringIssuer if use_uring else Issuer
    with DirectFile(directory, size, command="replay", prefix=FILE_PREFIX) as file, make(
        file.fd, max(depth, FILL_QD), max_io
    ) as io:
        fill = io.run(_fill_commands(size), queue_depth=min(FILL_QD, io.queue_depth))
        file.written_bytes = fill.bytes
        os.fsync(file.fd)  # the fill on the medium (a device's write cache flushed) first
        fill_seconds = time.perf_counter() - started
        by_step = batches.groupby("step").indices
        for step in schedule.steps:
            in_step = np.asarray(by_step.get(step, []), dtype=np.int64)
            step_zero = time.perf_counter_ns()
            for phase in phases(issue_us[in_step], done_us[in_step]):
                members = in_step[phase]
                source, index_of, releases = _phase_commands(
                    members, issue_us, writes, order, bounds, aligned, hold=not use_uring
                )
                # no more threads than commands: idle ones would only contend for the source
                commands = max(last for _, last in index_of.values())
                if isinstance(io, UringIssuer):  # holds batches back itself, reaping
                    result = io.run(source, queue_depth=min(depth, commands),
                                    timeline=True, releases_s=releases)
                else:
                    result = io.run(source, queue_depth=min(depth, commands), timeline=True)
                timeline = result.timeline_us
                assert timeline is not None
                shift = (result.start_ns - step_zero) / 1e3
                for batch, (first, last) in index_of.items():
                    start[batch] = timeline[first:last, 0].min() + shift
                    end[batch] = timeline[first:last, 1].max() + shift
            if on_step is not None:
                on_step()
    measured = batches.copy()
    measured["start_us"] = start
    measured["end_us"] = end
    return Execution(measured, aligned, size, fill_seconds, size / fill_seconds / 1e6,
                     time.perf_counter() - started - fill_seconds,
                     "io_uring" if use_uring else "threads")


def _fill_commands(size: int) -> Iterator[Command]:
    """Sequential writes over ``[0, size)``: whole :data:`FILL_IO_BYTES` commands, the last
    one shorter."""
    for offset in range(0, size, FILL_IO_BYTES):
        yield (True, offset, min(FILL_IO_BYTES, size - offset))


def _phase_commands(
    members: np.ndarray, issue_us: np.ndarray, writes: np.ndarray, order: np.ndarray,
    bounds: np.ndarray, aligned: Aligned, hold: bool = True,
) -> tuple[Iterator[Command], dict[int, tuple[int, int]], np.ndarray]:
    """The commands of one phase's batches as an Issuer source; each batch's commands' range
    in the source's order; and each command's release (s from the phase's start: its batch's
    simulated offset from the phase's first submission). ``hold``: the source itself holds
    each batch back until its release (for the thread issuer; io_uring's issuer takes the
    releases instead and keeps reaping while it waits)."""
    index_of: dict[int, tuple[int, int]] = {}
    at = 0
    for batch in members.tolist():
        count = int(bounds[batch + 1] - bounds[batch])
        index_of[batch] = (at, at + count)
        at += count
    first_issue = float(issue_us[members[0]])
    releases = np.zeros(at)
    for batch, (first, last) in index_of.items():
        releases[first:last] = (float(issue_us[batch]) - first_issue) / 1e6

    def source() -> Iterator[Command]:
        zero = time.perf_counter()
        for batch in members.tolist():
            wait = zero + (float(issue_us[batch]) - first_issue) / 1e6 - time.perf_counter()
            if hold and wait > 0:
                time.sleep(wait)
            write = bool(writes[batch])
            for row in order[bounds[batch]:bounds[batch + 1]].tolist():
                yield (write, int(aligned.offsets[row]), int(aligned.sizes[row]))

    return source(), index_of, releases
