"""UFS flash storage as a SimPy model: command queue slots, parallel NAND units, one shared link.

One command of ``b`` bytes (reads and writes alike, sharing every resource):

1. takes one of ``queue_depth`` command-queue slots, FIFO in submission order, and holds it until
   it completes (UFS: a task-management slot; the host stack keeps at most QD commands in flight);
2. gets one of ``parallel_units`` internal units (channel x die able to work at once), waiting
   FIFO, and holds it for the command latency (``read_command_latency_us``: NAND tR plus
   controller and firmware time; ``write_command_latency_us`` for writes). ``unit_choice``
   says which unit:

   - ``earliest_free`` (the default, every built-in preset): the first unit to become free,
     as if the controller could send any command to any idle die;
   - ``random``: one unit drawn uniformly at random when the command gets its slot, where it
     waits FIFO behind the commands already sent there, even while other units are idle. A
     real SSD or UFS device reads a page from the die its FTL wrote it to, so the die is
     fixed by the data, not chosen free; random addresses (what calibration measures) land on
     random dies. Command ``k`` of the device (in submission order, reads and writes
     counted together) goes to unit ``floor(parallel_units * u_k)``, ``u_k`` the ``k``-th
     ``random.Random(unit_seed).random()`` of the device's own generator, so a run is
     deterministic for ``unit_seed``;

3. releases the unit and moves ``ceil(b / page_size_bytes) * page_size_bytes`` bytes over the single
   shared link, FIFO, at ``read_bandwidth_mb_s`` (or ``write_bandwidth_mb_s``);
4. completes and frees its slot.

**Earliest free.** A closed tandem queue with deterministic service. In steady state, with
every slot busy, commands/s = min(queue_depth / (latency + b/bw), parallel_units / latency,
bw / b): IOPS-bound for small I/O, bandwidth-bound for large I/O, with the knee at ``b = bw *
latency / parallel_units`` (DynaKV, arXiv 2511.07427, Fig. 3b: about 24 KB on UFS 4.0).
Throughput is linear in the commands in flight up to ``parallel_units`` and flat beyond
(piecewise linear); a command's latency does not grow until the units are all busy.

**Random units.** With ``n`` small commands in flight, a command finds its unit busy with
probability about ``(n - 1) / parallel_units`` at low ``n`` and then waits about half a
command latency (the residual of a deterministic service), so its latency grows by about
``latency / (2 parallel_units)`` per extra command at first; once the units are mostly busy,
every extra command adds about ``latency / parallel_units`` (Little's law at the IOPS
ceiling). QD 1 gives ``latency + b / bw`` as above. QD 2 with an instant link is exact:
completions fall on multiples of ``L = latency``, and after each the new command lands on the
other's unit with probability ``1 / P`` whatever came before, so each period ``L`` ends one
command with probability ``1 / P`` and two otherwise: ``(2 - 1/P) / L`` commands per us, a
mean latency of ``L (1 + 1 / (2P - 1))`` (``earliest_free``: ``2 / L`` and ``L``). Throughput is
therefore sublinear in the queue depth and only approaches the same ceilings,
``parallel_units / latency`` and ``bw / b``, as the queue deepens (with exponential service
the busy fraction of the units would be ``n / (n + P - 1)``, a product-form closed network;
with deterministic service there is no closed form, and :mod:`sim.calibrate.fit`
approximates it by mean-value analysis before fitting on this model itself).
``parallel_units = 1`` is the same model as ``earliest_free``. The unit is drawn, not derived
from the command's address: the device model is given sizes only (the engine's writes,
streamed indexes and swaps are planned without offsets, and reads' offsets are relative to a
(layer, head) region whose placement on the device is a kvsim convention), and a logical
address says nothing certain about the die anyway, which the FTL chose when it wrote the
page; for the uniformly random addresses that calibration measures, any address-to-die hash
is this model. One command holds one unit whatever its size (a large command striped over
several dies is not modelled).

Three implementations of the same model:

* :class:`Flash` — the fast one used by the engine: :class:`EventFlash`'s arithmetic, with the
  stage ends of the commands kept on the device's own heap and processed ahead of SimPy's clock
  (up to the next event in SimPy's queue, before which nothing can submit), so SimPy handles a
  few events per batch (its completion, wake-ups) instead of two per command. Same times to
  the last bit as :class:`EventFlash` (a differential test checks this, ties included).
* :class:`EventFlash` — the same model with two SimPy ``Timeout`` events per command. Queue
  slots are a counter plus a FIFO of waiting commands; the unit pool and the link are FIFO
  servers whose next-free times are kept inline (a heap of unit free times, one link free time)
  instead of ``simpy.Resource`` request/release events — the technique SimPy itself uses when
  it inlines hot paths "for performance reasons". Because SimPy delivers arrivals at each stage
  in time order, this is exactly a FIFO multi-server queue (Kiefer-Wolfowitz recursion)
  followed by a FIFO single server; with ``random`` units, a free time per unit instead of
  the heap (FIFO single servers). Kept as :class:`Flash`'s exact reference.
* :class:`ResourceFlash` — the textbook version: one process per command and three
  ``simpy.Resource`` objects (with ``random`` units one per unit). Slow (about 8 events per
  command), kept as the differential-test reference and as readable documentation of the model.

Units: simulated time in microseconds; ``1 MB/s = 1e6 bytes/s = 1 byte/us``, so a transfer of
``b`` bytes at ``bw`` MB/s takes ``b / bw`` microseconds.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Generator, Sequence
from typing import Any, Literal

import numpy as np
import simpy
from pydantic import BaseModel, Field, ValidationInfo, field_validator
from simpy.events import NORMAL, Timeout
from simpy.resources.resource import Request

from sim.validation import STRICT_CONFIG

#: most command-queue slots and NAND units a device may have (see FlashParams)
MAX_SLOTS = 4096
#: how a command gets its unit (FlashParams.unit_choice; see the module docstring)
UnitChoice = Literal["earliest_free", "random"]
UNIT_CHOICES: tuple[UnitChoice, ...] = ("earliest_free", "random")


class FlashParams(BaseModel):
    """Parameters of a UFS device (see the module docstring for the queueing model).

    - ``read_bandwidth_mb_s`` / ``write_bandwidth_mb_s``: link (sequential) bandwidth, MB/s.
    - ``queue_depth``: command-queue slots (UFS 2.x-4.0 single queue: 32).
    - ``parallel_units``: commands the device can have in the NAND stage at once.
    - ``read_command_latency_us`` / ``write_command_latency_us``: time one command holds a unit.
    - ``page_size_bytes``: logical page / mapping unit; every command covers whole pages.
    - ``max_io_bytes``: largest command; a multiple of ``page_size_bytes``.
    - ``unit_choice``: ``earliest_free`` (default) or ``random``: which unit a command waits
      for (module docstring); ``unit_seed`` (>= 0, default 0): the seed of the ``random``
      units' draws (no effect with ``earliest_free``).

    Every number is > 0 and finite (``unit_seed`` >= 0). ``parallel_units /
    read_command_latency_us * 1e6`` is the small-I/O read IOPS ceiling, ``read_bandwidth_mb_s
    * read_command_latency_us / parallel_units`` the knee size.

    Upper bounds, far above any UFS device but below what exhausts memory or overflows:
    ``queue_depth`` and ``parallel_units`` <= 4096 (UFS 2.x-4.0's single command queue has 32
    slots; the presets have 4-8 units; the model keeps one entry per unit, so ``1e9`` units
    was 8 GB), ``page_size_bytes`` <= 1 MiB (UFS maps 4 KiB pages) and ``max_io_bytes`` <= 1 GiB
    (the presets' 512 KiB; command sizes are summed in int64).
    """

    model_config = STRICT_CONFIG

    read_bandwidth_mb_s: float = Field(gt=0)
    write_bandwidth_mb_s: float = Field(gt=0)
    queue_depth: int = Field(gt=0, le=MAX_SLOTS)
    parallel_units: int = Field(gt=0, le=MAX_SLOTS)
    read_command_latency_us: float = Field(gt=0)
    write_command_latency_us: float = Field(gt=0)
    page_size_bytes: int = Field(gt=0, le=2**20)
    max_io_bytes: int = Field(gt=0, le=2**30)
    unit_choice: UnitChoice = "earliest_free"
    unit_seed: int = Field(default=0, ge=0, lt=2**63)

    @field_validator("max_io_bytes")
    @classmethod
    def _max_io_whole_pages(cls, value: int, info: ValidationInfo) -> int:
        page = info.data.get("page_size_bytes")
        if page and value % page:
            raise ValueError(f"must be a multiple of page_size_bytes ({page})")
        return value

    @property
    def read_iops_limit(self) -> float:
        """Small-read IOPS ceiling set by the units: ``parallel_units / read latency`` (with
        ``random`` units approached only as the queue deepens)."""
        return self.parallel_units / self.read_command_latency_us * 1e6

    @property
    def read_knee_bytes(self) -> float:
        """I/O size where the unit ceiling meets the link ceiling (DynaKV Fig. 3b's knee)."""
        return self.read_bandwidth_mb_s * self.read_command_latency_us / self.parallel_units


class _Batch:
    """Completion counter of one submitted batch; triggers ``done`` when the last command ends."""

    __slots__ = ("remaining", "done")

    def __init__(self, remaining: int, done: simpy.Event) -> None:
        self.remaining = remaining
        self.done = done


class _FlashBase:
    """Argument checking and counters shared by every implementation."""

    def __init__(self, env: simpy.Environment, params: FlashParams) -> None:
        if not isinstance(params, FlashParams):
            raise TypeError(f"params must be a FlashParams, got {type(params).__name__}")
        self.env = env
        self.params = params
        self.read_commands = 0
        self.read_bytes = 0
        self.write_commands = 0
        self.write_bytes = 0
        self.busy_link_us = 0.0

    def _transfer_bytes(self, sizes_bytes: np.ndarray | Sequence[int]) -> list[int]:
        """Validate sizes and round each up to whole pages: the bytes each command moves.

        Python ints: the engine submits a handful of commands at a time, where numpy's
        per-call overhead would dominate."""
        if isinstance(sizes_bytes, np.ndarray):
            if sizes_bytes.ndim != 1:
                raise ValueError(f"sizes_bytes must be 1-D, got shape {sizes_bytes.shape}")
            if sizes_bytes.dtype.kind not in "iu":
                sizes = np.asarray(sizes_bytes)
                if sizes.size and (
                    sizes.dtype.kind != "f" or not np.all(sizes == np.floor(sizes))
                ):
                    raise ValueError(
                        f"sizes_bytes must be whole numbers of bytes, got {sizes.dtype}"
                    )
                sizes_bytes = sizes.astype(np.int64)
            values = sizes_bytes.tolist()
        elif type(sizes_bytes) is list and all(type(v) is int for v in sizes_bytes):
            values = sizes_bytes
        else:
            sizes = np.asarray(sizes_bytes)
            if sizes.ndim != 1:
                raise ValueError(f"sizes_bytes must be 1-D, got shape {sizes.shape}")
            return self._transfer_bytes(sizes) if sizes.size else []
        if not values:
            return []
        low, high = min(values), max(values)
        if low <= 0:
            raise ValueError(f"every command size must be > 0 bytes, got {low}")
        if high > self.params.max_io_bytes:
            raise ValueError(
                f"command size {high} bytes exceeds max_io_bytes ({self.params.max_io_bytes});"
                " split it into several commands"
            )
        page = self.params.page_size_bytes
        return [-(-size // page) * page for size in values]

    def read(self, sizes_bytes: np.ndarray | Sequence[int]) -> simpy.Event:
        """Submit one read command per entry of ``sizes_bytes`` at ``env.now``, in order.

        Each size is in bytes, 0 < size <= ``max_io_bytes``; it is rounded up to whole pages
        (a caller that knows an extent's offset must pass its page span). Returns an event that
        fires when every command of the batch has completed (already triggered if empty).
        """
        moved = self._transfer_bytes(sizes_bytes)
        self.read_commands += len(moved)
        self.read_bytes += sum(moved)
        return self._submit(
            moved, self.params.read_command_latency_us, self.params.read_bandwidth_mb_s
        )

    def write(self, sizes_bytes: np.ndarray | Sequence[int]) -> simpy.Event:
        """Like :meth:`read` for write commands (same queue, units and link)."""
        moved = self._transfer_bytes(sizes_bytes)
        self.write_commands += len(moved)
        self.write_bytes += sum(moved)
        return self._submit(
            moved, self.params.write_command_latency_us, self.params.write_bandwidth_mb_s
        )

    def _submit(
        self, moved_bytes: list[int], latency_us: float, bandwidth_mb_s: float
    ) -> simpy.Event:
        raise NotImplementedError


class _CommandQueueFlash(_FlashBase):
    """The command queue, unit and link state of the two implementations that schedule each
    command's stages arithmetically (:class:`Flash` on its own heap, :class:`EventFlash` with
    SimPy timeouts)."""

    def __init__(self, env: simpy.Environment, params: FlashParams) -> None:
        super().__init__(env, params)
        # Commands waiting for a queue slot: (latency_us, transfer_us, batch), FIFO.
        self._pending: deque[tuple[float, float, _Batch]] = deque()
        self._free_slots = params.queue_depth
        # Times at which each unit becomes free (earliest_free: a min-heap; random: by unit)
        # and the link becomes free.
        self._unit_free_us = [0.0] * params.parallel_units
        self._link_free_us = 0.0
        # random units: the device's own generator (see the module docstring)
        self._draw = random.Random(params.unit_seed).random
        self._n_units = params.parallel_units

    def _random_unit_done(self, latency_us: float, now: float) -> float:
        """A ``random``-unit command started at ``now``: the next draw's unit, FIFO behind the
        commands already sent there; returns (and books) the end of its unit time."""
        unit_free = self._unit_free_us
        unit = int(self._draw() * self._n_units)
        start = unit_free[unit]
        if start < now:
            start = now
        unit_done = start + latency_us
        unit_free[unit] = unit_done
        return unit_done


class Flash(_CommandQueueFlash):
    """Fast UFS model: :class:`EventFlash`'s commands without a SimPy event per stage.

    ``read(sizes)`` / ``write(sizes)`` submit a batch at ``env.now`` and return one event for the
    whole batch. Running counters: ``read_commands``, ``read_bytes``, ``write_commands``,
    ``write_bytes`` (bytes moved, page-rounded, counted at submission) and ``busy_link_us``
    (link time of completed transfers).

    The two stage ends of each command (its unit time, its transfer) are kept on the device's
    own heap, ordered as SimPy orders :class:`EventFlash`'s ``Timeout`` events (by time, then
    by creation), and computed with the same floating-point operations. The device processes
    them ahead of SimPy's clock, up to (not including) the time of the next event in SimPy's
    queue: nothing can submit a command before then, so its state there is the one
    :class:`EventFlash` reaches. A batch's ``done`` event is put into SimPy's queue at the
    time its last command completes (as ``succeed`` would schedule it then), and one wake-up
    event brings SimPy's clock to the device's next stage end whenever nothing else will, so
    SimPy processes a few events per batch instead of two per command.

    Two events of different origins at exactly the same float time (a stage end and a
    compute step, say) are ordered by SimPy by creation; the device, which creates its
    events earlier, may order such a tie differently from :class:`EventFlash`. That needs two
    independent timelines to meet to the last bit; submissions and stage ends at one time
    commute (the queue, units and link end in the same state either way).
    """

    #: kinds of stage ends on the device's heap
    _UNIT, _LINK = 0, 1

    def __init__(self, env: simpy.Environment, params: FlashParams) -> None:
        super().__init__(env, params)
        # Stage ends not processed yet: (time, creation order, kind, command).
        self._stages: list[tuple[float, int, int, tuple[float, float, _Batch]]] = []
        self._created = 0
        # The wake-up event in SimPy's queue and its time (None, inf: none).
        self._wake_event: simpy.Event | None = None
        self._wake_at = float("inf")
        if params.unit_choice == "random":
            self._start = self._start_random  # type: ignore[method-assign]

    def _submit(
        self, moved_bytes: list[int], latency_us: float, bandwidth_mb_s: float
    ) -> simpy.Event:
        env = self.env
        now = env._now
        if self._stages and self._stages[0][0] < now:
            self._run_until(now)
        done = env.event()
        n = len(moved_bytes)
        if n == 0:
            done.succeed()
            return done
        batch = _Batch(n, done)
        pending = self._pending
        # b / bw of a Python int is numpy's int64 / float64: the same correctly rounded double
        commands = [(latency_us, b / bandwidth_mb_s, batch) for b in moved_bytes]
        if not pending and self._free_slots >= n:  # every command gets a slot now
            self._free_slots -= n
            for command in commands:
                self._start(command, now)
        else:
            pending.extend(commands)
            while self._free_slots and pending:
                self._free_slots -= 1
                self._start(pending.popleft(), now)
        self._wake()
        return done

    # The methods below run once per command and dominate the simulator's run time; they use
    # SimPy's queue, clock and event ids directly like SimPy's own hot paths.

    def _start(self, command: tuple[float, float, _Batch], now: float) -> None:
        """A command that got a slot at ``now``: FIFO over identical units, take the earliest
        free; its unit time ends when :class:`EventFlash`'s ``Timeout`` would fire."""
        unit_free = self._unit_free_us
        start = unit_free[0]
        if start < now:
            start = now
        unit_done = start + command[0]
        heapq.heapreplace(unit_free, unit_done)
        self._created += 1
        heapq.heappush(self._stages, (now + (unit_done - now), self._created, 0, command))

    def _start_random(self, command: tuple[float, float, _Batch], now: float) -> None:
        """:meth:`_start` with ``random`` units: the next draw's unit, FIFO behind the
        commands already sent there (slots are granted in submission order, so command ``k``
        takes draw ``k`` whichever way ties are processed)."""
        unit_done = self._random_unit_done(command[0], now)
        self._created += 1
        heapq.heappush(self._stages, (now + (unit_done - now), self._created, 0, command))

    def _run_until(self, limit: float) -> None:
        """Process the stage ends before ``limit``, in SimPy's order; a completed batch's
        ``done`` event goes into SimPy's queue (and stops the run at its time, where the
        batch's waiters may submit)."""
        stages = self._stages
        queue = self.env._queue
        while stages and stages[0][0] < limit:
            now, _, kind, command = heapq.heappop(stages)
            if kind == 0:
                # Unit released; the link serves commands FIFO in order of unit completion.
                start = self._link_free_us
                if start < now:
                    start = now
                link_done = start + command[1]
                self._link_free_us = link_done
                self._created += 1
                heapq.heappush(stages, (now + (link_done - now), self._created, 1, command))
                continue
            # Command complete: count it, then hand its slot to the next waiting command.
            _, transfer_us, batch = command
            self.busy_link_us += transfer_us
            batch.remaining -= 1
            if not batch.remaining:
                done = batch.done
                done._ok = True
                done._value = None
                heapq.heappush(queue, (now, NORMAL, next(self.env._eid), done))
                if now < limit:
                    limit = now
            if self._pending:
                self._start(self._pending.popleft(), now)
            else:
                self._free_slots += 1

    def _wake(self) -> None:
        """Make sure SimPy's clock reaches the next stage end: a wake-up event then, unless an
        earlier one is queued (a later one is superseded: it will do nothing)."""
        if self._stages:
            at = self._stages[0][0]
            if at < self._wake_at:
                env = self.env
                wake = simpy.Event(env)
                wake._ok = True
                wake._value = None
                wake.callbacks.append(self._on_wake)
                self._wake_at, self._wake_event = at, wake
                heapq.heappush(env._queue, (at, NORMAL, next(env._eid), wake))

    def _on_wake(self, event: simpy.Event) -> None:
        """A wake-up: process the stage ends before SimPy's next event, then wake again."""
        if event is not self._wake_event:
            return  # superseded by an earlier wake-up
        self._wake_at, self._wake_event = float("inf"), None
        queue = self.env._queue
        self._run_until(queue[0][0] if queue else float("inf"))
        self._wake()


class EventFlash(_CommandQueueFlash):
    """UFS model with two SimPy events per command: queue slots as a counter, inline FIFO unit
    pool and link. The exact reference of :class:`Flash` (a differential test checks that
    they give the same times to the last bit).

    ``read(sizes)`` / ``write(sizes)`` submit a batch at ``env.now`` and return one event for the
    whole batch. Running counters: ``read_commands``, ``read_bytes``, ``write_commands``,
    ``write_bytes`` (bytes moved, page-rounded, counted at submission) and ``busy_link_us``
    (link time of completed transfers).

    Each admitted command is driven by two SimPy ``Timeout`` events (end of its unit time, end of
    its transfer) whose callbacks advance it; no process or resource event is needed per command,
    which makes small batches (the engine's per-layer reads) about twice as fast as worker
    processes that must be woken per batch.
    """

    def __init__(self, env: simpy.Environment, params: FlashParams) -> None:
        super().__init__(env, params)
        if params.unit_choice == "random":
            self._start = self._start_random  # type: ignore[method-assign]

    def _submit(
        self, moved_bytes: list[int], latency_us: float, bandwidth_mb_s: float
    ) -> simpy.Event:
        done = self.env.event()
        n = len(moved_bytes)
        if n == 0:
            done.succeed()
            return done
        batch = _Batch(n, done)
        pending = self._pending
        # b / bw of a Python int is numpy's int64 / float64: the same correctly rounded double
        pending.extend([(latency_us, b / bandwidth_mb_s, batch) for b in moved_bytes])
        while self._free_slots and pending:
            self._free_slots -= 1
            self._start(pending.popleft())
        return done

    # The three methods below run once per command and dominate the simulator's run time; they
    # use SimPy's Timeout directly and read ``env._now`` like SimPy's own hot paths.

    def _start(self, command: tuple[float, float, _Batch]) -> None:
        """A command that just got a slot: FIFO over identical units, take the earliest free."""
        env = self.env
        now = env._now
        unit_free = self._unit_free_us
        start = unit_free[0]
        if start < now:
            start = now
        unit_done = start + command[0]
        heapq.heapreplace(unit_free, unit_done)
        Timeout(env, unit_done - now, command).callbacks.append(self._unit_done)

    def _start_random(self, command: tuple[float, float, _Batch]) -> None:
        """:meth:`_start` with ``random`` units: the next draw's unit, FIFO there."""
        env = self.env
        now = env._now
        unit_done = self._random_unit_done(command[0], now)
        Timeout(env, unit_done - now, command).callbacks.append(self._unit_done)

    def _unit_done(self, event: simpy.Event) -> None:
        """Unit released; the link serves commands FIFO in order of unit completion."""
        command = event._value
        env = self.env
        now = env._now
        start = self._link_free_us
        if start < now:
            start = now
        link_done = start + command[1]
        self._link_free_us = link_done
        Timeout(env, link_done - now, command).callbacks.append(self._transfer_done)

    def _transfer_done(self, event: simpy.Event) -> None:
        """Command complete: count it, then hand its slot to the next waiting command."""
        _, transfer_us, batch = event._value
        self.busy_link_us += transfer_us
        batch.remaining -= 1
        if not batch.remaining:
            batch.done.succeed()
        if self._pending:
            self._start(self._pending.popleft())
        else:
            self._free_slots += 1


class ResourceFlash(_FlashBase):
    """Reference UFS model with ``simpy.Resource`` for slots, units and the link.

    Same contract and the same timings as :class:`Flash` (a differential test checks this), about
    ten times slower: one process and three request/release pairs per command. With ``random``
    units each unit is a ``simpy.Resource`` of its own and a command's unit is drawn when it is
    submitted (the order in which slots, FIFO, are granted).
    """

    def __init__(self, env: simpy.Environment, params: FlashParams) -> None:
        super().__init__(env, params)
        self.slots = simpy.Resource(env, capacity=params.queue_depth)
        self.units = simpy.Resource(env, capacity=params.parallel_units)
        self.link = simpy.Resource(env, capacity=1)
        self.unit_list: list[simpy.Resource] | None = None
        if params.unit_choice == "random":
            self.unit_list = [simpy.Resource(env, capacity=1)
                              for _ in range(params.parallel_units)]
        self._draw = random.Random(params.unit_seed).random

    def _submit(
        self, moved_bytes: list[int], latency_us: float, bandwidth_mb_s: float
    ) -> simpy.Event:
        done = self.env.event()
        if not moved_bytes:
            done.succeed()
            return done
        batch = _Batch(len(moved_bytes), done)
        for transfer_us in [b / bandwidth_mb_s for b in moved_bytes]:
            self._command(latency_us, transfer_us, batch)
        return done

    def _command(self, latency_us: float, transfer_us: float, batch: _Batch) -> None:
        # Request the slot now (not in the process's first step) so slots go in submission order.
        slot = self.slots.request()
        units = self.units
        if self.unit_list is not None:
            units = self.unit_list[int(self._draw() * len(self.unit_list))]
        self.env.process(self._run(slot, units, latency_us, transfer_us, batch))

    def _run(
        self, slot: Request, units: simpy.Resource, latency_us: float, transfer_us: float,
        batch: _Batch,
    ) -> Generator[simpy.Event, Any, None]:
        yield slot
        with units.request() as unit:
            yield unit
            yield self.env.timeout(latency_us)
        with self.link.request() as link:
            yield link
            yield self.env.timeout(transfer_us)
        self.slots.release(slot)
        self.busy_link_us += transfer_us
        batch.remaining -= 1
        if not batch.remaining:
            batch.done.succeed()


def read_bandwidth_curve(
    params: FlashParams, io_sizes_bytes: Sequence[int] | np.ndarray, n_commands: int = 2000
) -> list[float]:
    """Simulated read bandwidth (MB/s of requested bytes) at full queue depth, per I/O size.

    For each size, ``n_commands`` reads are submitted at once to a fresh device (so the queue stays
    full) and bandwidth is ``n_commands * size / completion time``; the start-up transient (one
    command latency) costs about ``latency / (n_commands * per-command time)`` of the figure.
    Used for DynaKV Fig. 3b (bandwidth vs contiguous I/O size).
    """
    if n_commands <= 0:
        raise ValueError(f"n_commands must be > 0, got {n_commands}")
    result = []
    for size in np.asarray(io_sizes_bytes).tolist():
        env = simpy.Environment()
        flash = Flash(env, params)
        flash.read(np.full(n_commands, size, dtype=np.int64))
        env.run()
        result.append(n_commands * size / env.now)
    return result
