"""The UFS flash model: exact timelines, throughput ceilings, validation, counters.

Expected numbers are derived by hand from the parameters in each test (1 MB/s = 1 byte/us), not
from the implementation. ``ResourceFlash`` (plain simpy.Resource) is the differential reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sim.hardware.flash import (
    UNIT_CHOICES,
    EventFlash,
    Flash,
    FlashParams,
    ResourceFlash,
    read_bandwidth_curve,
)

KIB = 1024


def make_params(**changes: float | str) -> FlashParams:
    base = dict(
        read_bandwidth_mb_s=4200.0,
        write_bandwidth_mb_s=2800.0,
        queue_depth=32,
        parallel_units=8,
        read_command_latency_us=46.0,
        write_command_latency_us=80.0,
        page_size_bytes=4096,
        max_io_bytes=512 * KIB,
    )
    base.update(changes)
    return FlashParams(**base)


def run_reads(params: FlashParams, sizes: list[int] | np.ndarray, cls: type = Flash) -> float:
    """Submit one batch of reads at t=0 and return its completion time (us)."""
    env = simpy.Environment()
    flash = cls(env, params)
    done = flash.read(np.asarray(sizes))
    env.run()
    assert done.processed
    return env.now


def completion_log(flash: Flash, env: simpy.Environment, batches: list[tuple[str, list[int]]]):
    """Submit each (kind, sizes) as its own batch at t=0; return [(index, completion time)]."""
    log: list[tuple[int, float]] = []

    def watch(index: int, event: simpy.Event):
        yield event
        log.append((index, env.now))

    for index, (kind, sizes) in enumerate(batches):
        event = getattr(flash, kind)(np.asarray(sizes))
        env.process(watch(index, event))
    env.run()
    return log


# --- single commands and exact timelines -------------------------------------------------------


@pytest.mark.parametrize("cls", [Flash, EventFlash, ResourceFlash])
def test_single_4k_read_takes_latency_plus_transfer(cls: type) -> None:
    params = make_params(read_bandwidth_mb_s=4000.0, read_command_latency_us=50.0)
    # 50 us on a unit, then 4096 B / 4000 B/us = 1.024 us on the link.
    assert run_reads(params, [4096], cls) == pytest.approx(51.024, rel=1e-12)


@pytest.mark.parametrize("cls", [Flash, EventFlash, ResourceFlash])
def test_timeline_three_commands_two_units(cls: type) -> None:
    # L = 10 us, 4096 B at 1024 MB/s = 4 us, 8192 B = 8 us.
    params = make_params(
        read_bandwidth_mb_s=1024.0, read_command_latency_us=10.0, parallel_units=2, queue_depth=3
    )
    env = simpy.Environment()
    log = completion_log(
        cls(env, params), env, [("read", [4096]), ("read", [4096]), ("read", [8192])]
    )
    # c0: unit 0-10, link 10-14. c1: unit 0-10, link 14-18 (waits for the link).
    # c2: waits for a unit until 10, unit 10-20, link 20-28.
    assert log == [(0, pytest.approx(14.0)), (1, pytest.approx(18.0)), (2, pytest.approx(28.0))]


@pytest.mark.parametrize("cls", [Flash, EventFlash, ResourceFlash])
def test_timeline_queue_depth_limits_admission(cls: type) -> None:
    params = make_params(
        read_bandwidth_mb_s=1024.0, read_command_latency_us=10.0, parallel_units=2, queue_depth=2
    )
    env = simpy.Environment()
    log = completion_log(cls(env, params), env, [("read", [4096])] * 3)
    # c0, c1 as above (14, 18). c2 gets c0's slot at 14: unit 14-24, link 24-28.
    assert log == [(0, pytest.approx(14.0)), (1, pytest.approx(18.0)), (2, pytest.approx(28.0))]


@pytest.mark.parametrize("cls", [Flash, EventFlash, ResourceFlash])
def test_writes_and_reads_contend(cls: type) -> None:
    params = make_params(
        read_bandwidth_mb_s=1024.0,
        write_bandwidth_mb_s=512.0,
        read_command_latency_us=10.0,
        write_command_latency_us=20.0,
        parallel_units=1,
        queue_depth=2,
    )
    env = simpy.Environment()
    log = completion_log(cls(env, params), env, [("write", [4096]), ("read", [4096])])
    # write: unit 0-20, link 20-28 (4096 B / 512 B/us = 8 us).
    # read: waits for the only unit until 20, unit 20-30, link 30-34 (alone it would end at 14).
    assert sorted(log) == [(0, pytest.approx(28.0)), (1, pytest.approx(34.0))]


@pytest.mark.parametrize("cls", [Flash, EventFlash, ResourceFlash])
def test_empty_batch_is_already_triggered(cls: type) -> None:
    env = simpy.Environment()
    flash = cls(env, make_params())
    event = flash.read(np.array([], dtype=np.int64))
    assert event.triggered
    env.run()
    assert env.now == 0.0
    assert flash.read_commands == 0 and flash.read_bytes == 0


def test_batch_event_fires_when_last_command_completes() -> None:
    params = make_params(
        read_bandwidth_mb_s=1024.0, read_command_latency_us=10.0, parallel_units=2, queue_depth=3
    )
    env = simpy.Environment()
    log = completion_log(Flash(env, params), env, [("read", [4096, 4096, 8192])])
    assert log == [(0, pytest.approx(28.0))]


# --- throughput ceilings -----------------------------------------------------------------------


def test_large_sequential_reads_reach_link_bandwidth() -> None:
    params = make_params()
    n, size = 400, 512 * KIB
    elapsed = run_reads(params, [size] * n)
    # Link-bound: the first transfer starts after one latency, then the link never idles
    # (units deliver 8 commands / 46 us, the link needs 124.8 us per command).
    assert elapsed == pytest.approx(46.0 + n * size / 4200.0, rel=1e-9)
    bandwidth_mb_s = n * size / elapsed
    assert bandwidth_mb_s == pytest.approx(4200.0, rel=0.01)


def test_small_random_reads_are_bounded_by_units() -> None:
    params = make_params()
    n = 4000
    elapsed = run_reads(params, [4096] * n)
    # 500 waves of 8 commands, 46 us each; the last wave's 8 transfers (0.975 us each) trail.
    assert elapsed == pytest.approx(500 * 46.0 + 8 * 4096 / 4200.0, rel=1e-9)
    iops = n / elapsed * 1e6
    assert iops <= 8 / 46e-6 * (1 + 1e-9)
    assert iops == pytest.approx(8 / 46e-6, rel=0.01)


def test_queue_depth_below_units_gives_qd_over_service_time() -> None:
    # QD 4 < 8 units: each slot cycles every L + b/bw = 100 + 1 us; transfers never collide.
    params = make_params(queue_depth=4, read_command_latency_us=100.0, read_bandwidth_mb_s=4096.0)
    n = 400
    elapsed = run_reads(params, [4096] * n)
    # Slot k (k = 0..3) finishes its first command at 101 + k, then every 101 us: 100 each.
    assert elapsed == pytest.approx(104.0 + 99 * 101.0, rel=1e-9)
    assert n / elapsed * 1e6 == pytest.approx(4 / 101e-6, rel=0.01)


def test_bandwidth_rises_with_io_size_and_knees() -> None:
    params = make_params()
    sizes = [4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 512 * KIB]
    curve = read_bandwidth_curve(params, sizes, n_commands=1600)
    assert all(a < b for a, b in zip(curve[:-1], curve[1:], strict=True))
    iops_limit = 8 / 46e-6  # 173,913/s; knee = 4200e6 / 173,913 = 24,150 B
    for size, mb_s in zip(sizes, curve, strict=True):
        if size < 24_150:  # IOPS-bound: bandwidth = IOPS * size
            assert mb_s == pytest.approx(iops_limit * size / 1e6, rel=0.02)
        if size >= 64 * KIB:  # link-bound
            assert mb_s == pytest.approx(4200.0, rel=0.02)


def test_busy_link_counts_transfer_time() -> None:
    env = simpy.Environment()
    flash = Flash(env, make_params(read_bandwidth_mb_s=1024.0))
    flash.read(np.array([4096, 8192]))
    flash.write(np.array([4096]))
    env.run()
    # Reads: 4 + 8 us at 1024 B/us; write: 4096 / 2800 us.
    assert flash.busy_link_us == pytest.approx(12.0 + 4096 / 2800.0)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [[0], [-4096], [512 * KIB + 1], [4096.5], [[4096, 4096]]],
    ids=["zero", "negative", "too-large", "fractional", "2-d"],
)
def test_invalid_sizes_raise(sizes: list) -> None:
    env = simpy.Environment()
    flash = Flash(env, make_params())
    with pytest.raises(ValueError):
        flash.read(np.asarray(sizes))
    with pytest.raises(ValueError):
        flash.write(np.asarray(sizes))


def test_sizes_round_up_to_whole_pages() -> None:
    env = simpy.Environment()
    flash = Flash(env, make_params(read_bandwidth_mb_s=4096.0, read_command_latency_us=10.0))
    flash.read(np.array([100]))
    env.run()
    # 100 bytes cover one 4096-byte page: 10 + 4096 / 4096 us.
    assert env.now == pytest.approx(11.0)
    assert flash.read_bytes == 4096


@pytest.mark.parametrize(
    "field", ["read_bandwidth_mb_s", "queue_depth", "parallel_units", "read_command_latency_us"]
)
def test_params_reject_non_positive(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        make_params(**{field: -5})


def test_params_reject_max_io_not_whole_pages() -> None:
    with pytest.raises(ValidationError, match="max_io_bytes"):
        make_params(max_io_bytes=5000)


def test_params_reject_unknown_field_and_are_frozen() -> None:
    with pytest.raises(ValidationError):
        make_params(tR_us=40.0)
    params = make_params()
    with pytest.raises(ValidationError):
        params.queue_depth = 1  # type: ignore[misc]


def test_derived_limits() -> None:
    params = make_params()
    assert params.read_iops_limit == pytest.approx(8 / 46e-6)
    assert params.read_knee_bytes == pytest.approx(4200.0 * 46.0 / 8)


# --- properties --------------------------------------------------------------------------------

page_counts = st.lists(st.integers(min_value=1, max_value=128), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(read_pages=page_counts, write_pages=st.lists(st.integers(1, 128), max_size=20))
def test_counters_and_completion_bounds(read_pages: list[int], write_pages: list[int]) -> None:
    params = make_params()
    reads = np.asarray(read_pages) * 4096
    writes = np.asarray(write_pages, dtype=np.int64) * 4096
    env = simpy.Environment()
    flash = Flash(env, params)
    read_done = flash.read(reads)
    flash.write(writes)
    env.run(until=read_done)
    read_time = env.now
    env.run()
    assert flash.read_commands == len(reads) and flash.read_bytes == int(reads.sum())
    assert flash.write_commands == len(writes) and flash.write_bytes == int(writes.sum())
    # Lower bounds on the read batch: the link and the units must each do at least its work.
    assert read_time >= reads.sum() / 4200.0 * (1 - 1e-9)
    assert read_time >= len(reads) * 46.0 / 8 * (1 - 1e-9)
    assert read_time >= 46.0 + reads.min() / 4200.0 - 1e-9
    # Upper bound: everything run strictly one after another.
    serial = len(reads) * 46.0 + reads.sum() / 4200.0 + len(writes) * 80.0 + writes.sum() / 2800.0
    assert env.now <= serial * (1 + 1e-9)
    assert flash.busy_link_us == pytest.approx(reads.sum() / 4200.0 + writes.sum() / 2800.0)


def finish_times(cls: type, params: FlashParams,
                 plan: list[tuple[float, str, np.ndarray]]) -> list[float]:
    """Each planned batch (submission time, read or write, sizes) submitted by its own process
    to a fresh ``cls`` device: the time each batch completes."""
    env = simpy.Environment()
    flash = cls(env, params)
    finished = [0.0] * len(plan)

    def submit(index: int, at: float, kind: str, sizes: np.ndarray):
        yield env.timeout(at)
        yield getattr(flash, kind)(sizes)
        finished[index] = env.now

    for index, (at, kind, sizes) in enumerate(plan):
        env.process(submit(index, at, kind, sizes))
    env.run()
    return finished


@pytest.mark.parametrize("unit_choice", UNIT_CHOICES)
@pytest.mark.parametrize("seed", range(8))
def test_fast_model_matches_resource_reference(seed: int, unit_choice: str) -> None:
    """Differential test: batches of mixed reads and writes submitted over time, with ties;
    with random units, the same draws give every command the same unit."""
    rng = np.random.default_rng(seed)
    params = make_params(
        unit_choice=unit_choice,
        unit_seed=seed,
        queue_depth=int(rng.integers(1, 9)),
        parallel_units=int(rng.integers(1, 5)),
        read_command_latency_us=40.0,
        write_command_latency_us=80.0,
        read_bandwidth_mb_s=4096.0,
        write_bandwidth_mb_s=2048.0,
    )
    plan = [
        (
            float(rng.integers(0, 400)),
            "read" if rng.random() < 0.7 else "write",
            rng.integers(1, 129, size=int(rng.integers(1, 30))) * 4096,
        )
        for _ in range(20)
    ]

    def simulate(cls: type) -> list[float]:
        return finish_times(cls, params, plan)

    # whole-microsecond latencies and transfers: the two ways of adding times agree to the bit
    assert simulate(Flash) == simulate(ResourceFlash)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    round_times=st.booleans(),
    queue_depth=st.integers(1, 8),
    units=st.integers(1, 4),
    unit_choice=st.sampled_from(UNIT_CHOICES),
)
def test_fast_model_matches_event_model_exactly(
    seed: int, round_times: bool, queue_depth: int, units: int, unit_choice: str
) -> None:
    """Flash processes its stage ends ahead of SimPy's clock; EventFlash has a Timeout per stage.
    Same completion and resumption times, in the same order, to the last bit: batches from
    several processes, some awaited and followed by more reads, whole-microsecond times (many
    ties between stage ends, submissions and other processes' timeouts) or arbitrary ones."""
    rng = np.random.default_rng(seed)
    params = make_params(
        unit_choice=unit_choice,
        unit_seed=seed,
        queue_depth=queue_depth,
        parallel_units=units,
        read_command_latency_us=40.0 if round_times else 46.0,
        read_bandwidth_mb_s=4096.0 if round_times else 4200.0,
        write_bandwidth_mb_s=2048.0 if round_times else 2800.0,
    )
    plan = [
        (
            float(rng.integers(0, 400)) if round_times else float(rng.random() * 400),
            "read" if rng.random() < 0.7 else "write",
            rng.integers(1, 129, size=int(rng.integers(1, 30))) * 4096,
            bool(rng.random() < 0.5),
        )
        for _ in range(12)
    ]

    def simulate(cls: type) -> tuple[list[tuple], float, float]:
        env = simpy.Environment()
        flash = cls(env, params)
        log: list[tuple] = []

        def submit(index: int, at: float, kind: str, sizes: np.ndarray, wait: bool):
            yield env.timeout(at)
            event = getattr(flash, kind)(sizes)
            event.callbacks.append(lambda _e: log.append(("done", index, env.now)))
            if wait:
                yield event
                log.append(("resumed", index, env.now))
                yield env.timeout(float(int(at) % 50) if round_times else at / 7)
                yield flash.read(sizes[:3])
                log.append(("again", index, env.now))

        for index, (at, kind, sizes, wait) in enumerate(plan):
            env.process(submit(index, at, kind, sizes, wait))
        env.run()
        return log, env.now, flash.busy_link_us

    assert simulate(Flash) == simulate(EventFlash)


# --- random units (unit_choice: random) --------------------------------------------------------


def test_params_unit_choice_default_and_validation() -> None:
    assert make_params().unit_choice == "earliest_free"
    assert make_params().unit_seed == 0
    with pytest.raises(ValidationError, match="unit_choice"):
        make_params(unit_choice="by_address")
    with pytest.raises(ValidationError, match="unit_seed"):
        make_params(unit_seed=-1)


def _draws(seed: int, units: int, n: int) -> list[int]:
    """The units of a device's first ``n`` commands (the documented draw: floor(P * u_k))."""
    import random

    rng = random.Random(seed)
    return [int(rng.random() * units) for _ in range(n)]


@pytest.mark.parametrize("cls", [Flash, EventFlash, ResourceFlash])
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**40), units=st.integers(1, 8), n=st.integers(1, 40))
def test_random_units_one_batch_takes_the_busiest_units_load(
    cls: type, seed: int, units: int, n: int
) -> None:
    """Every command admitted at once (queue_depth >= n) with a near-instant link: the batch
    ends when the unit that drew the most commands has served them one after another, that
    is ``L * max load``, plus at most every transfer (the link serialises them)."""
    transfer = 4096 / 4.096e9  # 1e-6 us
    params = make_params(
        unit_choice="random", unit_seed=seed, parallel_units=units, queue_depth=64,
        read_command_latency_us=10.0, read_bandwidth_mb_s=4.096e9,
    )
    draws = _draws(seed, units, n)
    busiest = max(draws.count(u) for u in range(units))
    took = run_reads(params, [4096] * n, cls)
    assert 10.0 * busiest + transfer - 1e-9 <= took <= 10.0 * busiest + n * transfer + 1e-9


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), queue_depth=st.integers(1, 8))
def test_random_units_with_one_unit_is_earliest_free(seed: int, queue_depth: int) -> None:
    """With one unit there is nothing to choose: a single FIFO server either way, the same
    times to the last bit."""
    rng = np.random.default_rng(seed)
    plan = [(float(rng.integers(0, 300)), "read" if rng.random() < 0.7 else "write",
             rng.integers(1, 129, size=int(rng.integers(1, 20))) * 4096) for _ in range(10)]

    def simulate(unit_choice: str) -> list[float]:
        params = make_params(unit_choice=unit_choice, unit_seed=seed, parallel_units=1,
                             queue_depth=queue_depth)
        return finish_times(Flash, params, plan)

    assert simulate("random") == simulate("earliest_free")


@pytest.mark.parametrize("cls", [Flash, EventFlash, ResourceFlash])
def test_random_units_queue_depth_one_is_latency_plus_transfer(cls: type) -> None:
    """At QD 1 a command never meets another: L + b / bw each, whatever unit it draws."""
    params = make_params(unit_choice="random", unit_seed=7, queue_depth=1, parallel_units=4,
                         read_bandwidth_mb_s=1024.0, read_command_latency_us=10.0)
    assert run_reads(params, [4096] * 50, cls) == pytest.approx(50 * 14.0, rel=1e-12)


@pytest.mark.parametrize("units", [1, 2, 3, 4, 8])
def test_random_units_two_in_flight_throughput(units: int) -> None:
    """Two commands in flight, deterministic latency L, an instant link: completions happen at
    multiples of L. After each, the new command lands on the other command's unit with
    probability 1/P, whatever happened before, so each period of L ends one command (a
    collision) with probability 1/P and two otherwise: (2 - 1/P) / L commands per us, i.e.
    a mean latency of L (1 + 1 / (2P - 1)); ``earliest_free`` would give 2 / L. About 8,000
    periods: the binomial standard error is under 0.3%."""
    n = 15_000
    params = make_params(unit_choice="random", unit_seed=units, parallel_units=units,
                         queue_depth=2, read_command_latency_us=10.0,
                         read_bandwidth_mb_s=4.096e9)
    took = run_reads(params, [4096] * n, Flash)
    assert n / took == pytest.approx((2 - 1 / units) / 10.0, rel=0.015)


def test_random_units_seed_decides_and_repeats() -> None:
    params = make_params(unit_choice="random", unit_seed=1, queue_depth=8, parallel_units=4)
    first = run_reads(params, [4096] * 200)
    assert run_reads(params, [4096] * 200) == first
    other = params.model_copy(update={"unit_seed": 2})
    assert run_reads(other, [4096] * 200) != first
