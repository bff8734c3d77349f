"""Fitting the flash model's parameters to storage measurements.

The model (:mod:`sim.hardware.flash`) is a closed tandem queue with deterministic service: a
command of ``b`` bytes holds one of ``queue_depth`` slots, one of ``parallel_units`` units for
the command latency ``L`` and then the single link for ``s = b / bw`` microseconds. A
measurement that keeps ``q`` commands in flight (``q`` threads, or fio's ``iodepth``) sees at
most ``n = min(q, queue_depth)`` of them inside the device. Both ways a command can get its
unit (``unit_choice``) are fitted, and the one whose rms log error is lower is kept (the
default, ``earliest_free``, on a tie within :data:`TIE_TOLERANCE`); :class:`FlashFit` carries
the other's fit too, so calibrate prints both.

**earliest_free**: in steady state the measurement delivers exactly

    commands/us = min(n / (L + s), parallel_units / L, 1 / s)

(:func:`model_mb_s`; a test checks it against the SimPy model, :func:`simulated_mb_s`). The fit
chooses the read link bandwidth and command latency (continuous, by least squares on the log
of the throughput: every measurement weighs by its relative error) for every integer pair
``parallel_units <= queue_depth`` (more units than slots are never busy at once, so the pair
``P > Q`` is the same model as ``P = Q``), with ``queue_depth`` among the queue depths the
measurements used (a device whose throughput still grows at the deepest measured queue is
fitted with that depth: nothing measured says more).

**random** units have no closed form. :func:`random_units_per_us` approximates their steady
state by mean-value analysis (MVA) of the closed network of ``n`` commands cycling through
``P`` unit stations, each visited with probability ``1 / P`` (service ``L``), and then the link
(service ``s``). With ``Q_k, U_k`` the mean queue and busy fraction of station ``k`` with
``n - 1`` commands, a command arriving at ``k`` finds ``Q_k`` there (the arrival theorem, exact
for exponential service) and the one in service half done on average (deterministic
service), so it stays ``R_k = S_k (1 + Q_k - U_k / 2)``; then ``X = n / (R_unit + R_link)``,
and with ``n`` commands ``Q_unit = X R_unit / P``, ``U_unit = X L / P``, ``Q_link = X R_link``,
``U_link = X s``; ``X`` is capped by the model's bounds ``n / (L + s)``, ``P / L`` and ``1 / s``
(a saturated single server's arrivals follow its own departures, so the half-done residual
overstates it). It is exact at ``n = 1``, 4P^2 / (4P^2 - 1) times the exact rate at ``n = 2``,
and within :data:`MVA_TOLERANCE` of the SimPy model's steady state (tests/test_calibrate.py).
That is good enough for a start, not to report: for each measured depth a continuous least
squares over (bandwidth, latency, units) on the MVA, from a few starts, then the integers
either side of its units (``P > Q`` is a model of its own with random units: fewer
collisions); the best (depth, units) pair is then refined on the SimPy model itself
(:func:`steady_mb_s`, :data:`REFINE_COMMANDS` commands per measurement, the same unit draws in
every evaluation: common random numbers make the cost a deterministic function of the
parameters), moving to a neighbouring unit count or measured depth while the cost falls.
The residuals are the SimPy model's.

Writes share the units and slots; their bandwidth and latency are fitted to the write
measurements once the read fit has fixed them. (units, depth) pairs whose cost is within
:data:`TIE_TOLERANCE` of the best explain the data equally well; of those, the deepest queue,
then the fewest units, is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import simpy
from scipy.optimize import least_squares

from sim.hardware.flash import UNIT_CHOICES, Flash, FlashParams, UnitChoice

#: relative difference in fit cost under which two (units, queue depth) pairs, or the two unit
#: choices' rms log errors, count as equal
TIE_TOLERANCE = 0.01
#: the most units the random-unit fit considers
MAX_RANDOM_UNITS = 256
#: largest relative difference between :func:`random_units_per_us` and the SimPy model's
#: steady state that tests/test_calibrate.py accepts. The worst found (grids over 1-16 units,
#: queue depths 1-32, 1-128 pages, 200-8,000 MB/s at 50 us) is -20%: one unit, two commands in
#: flight and a transfer as long as the unit time, where the deterministic tandem pipelines
#: perfectly and the approximation, built for memoryless service, charges the queueing anyway;
#: elsewhere within about 15%. Only the fit's start: the fit is refined on the SimPy model.
MVA_TOLERANCE = 0.21
#: commands timed per measurement when a random-unit fit is refined on the SimPy model
REFINE_COMMANDS = 800
#: function evaluations of one SimPy refinement, besides its Jacobians' (each simulates every
#: measurement once; started from the approximation's fit, a few Gauss-Newton steps converge)
REFINE_EVALUATIONS = 6


@dataclass(frozen=True)
class Observation:
    """One storage measurement: ``io_bytes`` commands kept ``queue_depth`` deep delivered
    ``mb_s`` (MB/s of requested bytes, 1 MB/s = 1 byte/us); ``label`` names it."""

    write: bool
    io_bytes: int
    queue_depth: int
    mb_s: float
    label: str

    def __post_init__(self) -> None:
        if self.io_bytes <= 0 or self.queue_depth <= 0:
            raise ValueError(f"{self.label}: io_bytes and queue_depth must be > 0")
        if not (math.isfinite(self.mb_s) and self.mb_s > 0):
            raise ValueError(f"{self.label}: throughput must be finite and > 0, got {self.mb_s}")


def earliest_free_per_us(
    sizes: np.ndarray, in_flight: np.ndarray, bandwidth_mb_s: float, latency_us: float,
    parallel_units: float,
) -> np.ndarray:
    """Commands per us with ``earliest_free`` units and ``in_flight`` commands of ``sizes``
    bytes inside the device (the exact steady state)."""
    return np.minimum(
        np.minimum(in_flight / (latency_us + sizes / bandwidth_mb_s),
                   parallel_units / latency_us),
        bandwidth_mb_s / sizes,
    )


def random_units_per_us(
    sizes: np.ndarray, in_flight: np.ndarray, bandwidth_mb_s: float, latency_us: float,
    parallel_units: float,
) -> np.ndarray:
    """Commands per us with ``random`` units and ``in_flight`` commands of ``sizes`` bytes
    inside the device: mean-value analysis with deterministic residuals (module docstring).
    ``parallel_units`` may be fractional (the continuous fit)."""
    link = np.asarray(sizes, dtype=np.float64) / bandwidth_mb_s
    unit_queue = unit_busy = link_queue = link_busy = np.zeros_like(link)
    out = np.zeros_like(link)
    for n in range(1, int(np.max(in_flight)) + 1):
        at_unit = latency_us * (1.0 + unit_queue - 0.5 * unit_busy)
        at_link = link * (1.0 + link_queue - 0.5 * link_busy)
        per_us = n / (at_unit + at_link)
        unit_queue = per_us * at_unit / parallel_units
        unit_busy = per_us * (latency_us / parallel_units)
        link_queue = per_us * at_link
        link_busy = per_us * link
        out = np.where(in_flight == n, per_us, out)
    # the deterministic residual overstates a nearly saturated station's throughput (its
    # arrivals are not random but follow its own departures): keep the model's bounds
    return np.minimum(
        np.minimum(out, in_flight / (latency_us + link)),
        np.minimum(parallel_units / latency_us, 1.0 / link),
    )


_PER_US: dict[str, Callable[[np.ndarray, np.ndarray, float, float, float], np.ndarray]] = {
    "earliest_free": earliest_free_per_us,
    "random": random_units_per_us,
}


def model_mb_s(
    io_bytes: float,
    host_queue_depth: int,
    bandwidth_mb_s: float,
    latency_us: float,
    parallel_units: float,
    queue_depth: int,
    unit_choice: UnitChoice = "earliest_free",
) -> float:
    """Steady-state throughput (MB/s) of the flash model for one command size kept
    ``host_queue_depth`` deep (see the module docstring; ``random`` units: its mean-value
    approximation)."""
    in_flight = np.array([min(host_queue_depth, queue_depth)])
    per_us = _PER_US[unit_choice](
        np.array([float(io_bytes)]), in_flight, bandwidth_mb_s, latency_us, parallel_units
    )
    return float(per_us[0]) * float(io_bytes)


def simulated_mb_s(
    params: FlashParams, io_bytes: int, host_queue_depth: int, write: bool = False,
    n_commands: int = 2000,
) -> float:
    """The same figure from the SimPy model itself (with its ``unit_choice`` and
    ``unit_seed``): ``n_commands`` commands submitted at once to a device whose queue is
    ``min(host_queue_depth, queue_depth)`` deep (what a host keeping that many in flight lets
    in), MB/s of requested bytes until the last completes."""
    device = params.model_copy(
        update={"queue_depth": min(host_queue_depth, params.queue_depth)}
    )
    env = simpy.Environment()
    flash = Flash(env, device)
    sizes = np.full(n_commands, io_bytes, dtype=np.int64)
    (flash.write if write else flash.read)(sizes)
    env.run()
    return n_commands * io_bytes / env.now


def steady_mb_s(
    params: FlashParams, io_bytes: int, host_queue_depth: int, write: bool = False,
    n_commands: int = REFINE_COMMANDS,
) -> float:
    """The SimPy model's steady-state throughput (MB/s, its ``unit_choice`` and ``unit_seed``)
    with ``min(host_queue_depth, queue_depth)`` commands of ``io_bytes`` inside the device:
    ``n_commands`` commands timed from the last completion of a batch submitted before them
    to their own last, with as many again submitted after them (so neither the start nor the
    drain of the queue is timed)."""
    depth = min(host_queue_depth, params.queue_depth)
    device = params.model_copy(update={"queue_depth": depth})
    env = simpy.Environment()
    flash = Flash(env, device)
    submit = flash.write if write else flash.read
    pad = [int(io_bytes)] * (4 * depth + 16)
    ends = [0.0, 0.0]  # the warm-up batch's last completion, then the timed batch's

    def ended(index: int) -> Callable[[simpy.Event], None]:
        return lambda _event: ends.__setitem__(index, env.now)

    submit(pad).callbacks.append(ended(0))
    submit([int(io_bytes)] * n_commands).callbacks.append(ended(1))
    submit(pad)
    env.run()
    return n_commands * io_bytes / (ends[1] - ends[0])


@dataclass(frozen=True)
class Residual:
    """One measurement against the fitted model."""

    observation: Observation
    model_mb_s: float

    @property
    def error(self) -> float:
        """(model - measured) / measured."""
        return self.model_mb_s / self.observation.mb_s - 1.0


@dataclass(frozen=True)
class FlashFit:
    """The fitted parameters and every measurement's residual; ``others``: the fits with the
    other unit choices (empty on those fits themselves)."""

    read_bandwidth_mb_s: float
    read_command_latency_us: float
    write_bandwidth_mb_s: float
    write_command_latency_us: float
    parallel_units: int
    queue_depth: int
    residuals: tuple[Residual, ...]
    unit_choice: UnitChoice = "earliest_free"
    others: tuple[FlashFit, ...] = ()

    @property
    def rms_log_error(self) -> float:
        """Root mean square of ``log(model / measured)`` over the measurements."""
        logs = [math.log1p(r.error) for r in self.residuals]
        return math.sqrt(sum(x * x for x in logs) / len(logs))

    def summary(self) -> str:
        """One line: the unit choice, the parameters and the rms log error."""
        return (
            f"{self.unit_choice} units: read {self.read_bandwidth_mb_s:,.0f} MB/s, "
            f"{self.read_command_latency_us:.1f} us/command; write "
            f"{self.write_bandwidth_mb_s:,.0f} MB/s, {self.write_command_latency_us:.1f} "
            f"us/command; {self.parallel_units} units, queue depth {self.queue_depth}; "
            f"rms log error {self.rms_log_error:.3f}"
        )

    def residual_lines(self) -> list[str]:
        """One line per measurement: measured, model, relative error."""
        width = max(len(r.observation.label) for r in self.residuals)
        return [
            f"{r.observation.label:<{width}}  measured {r.observation.mb_s:9.1f} MB/s"
            f"  model {r.model_mb_s:9.1f} MB/s  {100 * r.error:+6.1f}%"
            for r in self.residuals
        ]


def _fit_continuous(
    obs: Sequence[Observation], units: float | None, depth: int, bandwidth0: float,
    latency0: float, unit_choice: UnitChoice, units0: float = 4.0,
) -> tuple[float, float, float, float]:
    """Least squares over (log bandwidth, log latency) for fixed units and depth, or over the
    units too (``units`` None, from ``units0``): (bandwidth, latency, units, cost)."""
    sizes = np.array([o.io_bytes for o in obs], dtype=np.float64)
    in_flight = np.minimum(np.array([o.queue_depth for o in obs]), depth)
    measured = np.log([o.mb_s for o in obs])
    per_us = _PER_US[unit_choice]

    def units_of(x: np.ndarray) -> float:
        if units is not None:
            return units
        return 1.0 + math.exp(min(float(x[2]), math.log(MAX_RANDOM_UNITS)))

    def residuals(x: np.ndarray) -> np.ndarray:
        rate = per_us(sizes, in_flight, math.exp(x[0]), math.exp(x[1]), units_of(x))
        return np.log(rate * sizes) - measured

    best: tuple[float, float, float, float] | None = None
    for scale in (1.0, 0.3, 3.0):  # a few starts: the min() makes the surface piecewise
        start = [math.log(bandwidth0), math.log(latency0 * scale)]
        if units is None:
            start.append(math.log(max(units0 - 1.0, 1e-3)))
        result = least_squares(residuals, np.array(start), method="trf", x_scale=1.0)
        cost = float(result.cost)
        if best is None or cost < best[3]:
            best = (math.exp(result.x[0]), math.exp(result.x[1]), units_of(result.x), cost)
    assert best is not None
    return best


def _starts(obs: Sequence[Observation]) -> tuple[float, float]:
    """Starting bandwidth (the best measured) and latency (the shallowest, smallest command's
    time less its transfer at that bandwidth)."""
    bandwidth = max(o.mb_s for o in obs) * 1.05
    first = min(obs, key=lambda o: (o.queue_depth, o.io_bytes))
    time_us = first.io_bytes / first.mb_s * first.queue_depth
    return bandwidth, max(time_us - first.io_bytes / bandwidth, 1e-3)


def _unit_counts(
    reads: Sequence[Observation], depth: int, unit_choice: UnitChoice, bandwidth0: float,
    latency0: float,
) -> list[int]:
    """The unit counts tried with ``depth`` slots: every one up to the depth for
    ``earliest_free``; for ``random``, the integers either side of the best continuous fit's
    units from a few starts."""
    if unit_choice == "earliest_free":
        return list(range(1, depth + 1))
    counts: set[int] = set()
    for units0 in (2.0, 8.0, 32.0):
        *_, real, _ = _fit_continuous(reads, None, depth, bandwidth0, latency0, unit_choice,
                                      units0)
        real = min(real, float(MAX_RANDOM_UNITS))
        counts.update((max(1, math.floor(real)), math.ceil(real)))
    return sorted(counts)


def _fit_one(observations: Sequence[Observation], unit_choice: UnitChoice) -> FlashFit:
    """The fit with ``unit_choice`` units (module docstring)."""
    reads = [o for o in observations if not o.write]
    writes = [o for o in observations if o.write]
    bandwidth0, latency0 = _starts(reads)
    candidates = []
    for depth in sorted({o.queue_depth for o in reads}):
        for units in _unit_counts(reads, depth, unit_choice, bandwidth0, latency0):
            bw, lat, _, cost = _fit_continuous(reads, units, depth, bandwidth0, latency0,
                                               unit_choice)
            candidates.append((cost, depth, units, bw, lat))
    best_cost = min(c[0] for c in candidates)
    tied = [c for c in candidates if c[0] <= best_cost * (1 + TIE_TOLERANCE) + 1e-12]
    _, depth, units, read_bw, read_lat = max(tied, key=lambda c: (c[1], -c[2]))
    write_bw0, write_lat0 = _starts(writes)
    write_bw, write_lat, _, _ = _fit_continuous(writes, units, depth, write_bw0, write_lat0,
                                                unit_choice)
    if unit_choice == "earliest_free":
        residuals = tuple(
            Residual(
                o,
                model_mb_s(
                    o.io_bytes, o.queue_depth,
                    write_bw if o.write else read_bw, write_lat if o.write else read_lat,
                    units, depth,
                ),
            )
            for o in observations
        )
        return FlashFit(
            read_bandwidth_mb_s=read_bw, read_command_latency_us=read_lat,
            write_bandwidth_mb_s=write_bw, write_command_latency_us=write_lat,
            parallel_units=units, queue_depth=depth, residuals=residuals,
        )
    # random units: the approximation found the depth and a start; the SimPy model decides
    depth, units, read_bw, read_lat = _refine_search(
        reads, sorted({o.queue_depth for o in reads}), depth, units, bandwidth0, latency0
    )
    write_bw, write_lat, _, _ = _fit_continuous(writes, units, depth, write_bw0, write_lat0,
                                                "random")
    write_bw, write_lat, _ = _refine(writes, units, depth, write_bw, write_lat,
                                     (read_bw, read_lat))
    device = _simulated_device(observations, units, depth, read_bw, read_lat, write_bw,
                               write_lat)
    return FlashFit(
        read_bandwidth_mb_s=read_bw, read_command_latency_us=read_lat,
        write_bandwidth_mb_s=write_bw, write_command_latency_us=write_lat,
        parallel_units=units, queue_depth=depth, unit_choice="random",
        residuals=tuple(
            Residual(o, steady_mb_s(device, o.io_bytes, o.queue_depth, o.write))
            for o in observations
        ),
    )


def _simulated_device(
    observations: Sequence[Observation], units: int, depth: int, read_bw: float,
    read_lat: float, write_bw: float, write_lat: float,
) -> FlashParams:
    """A random-unit device with these parameters, for :func:`steady_mb_s` (1-byte pages:
    every command moves exactly its bytes, as the measurements count them)."""
    return FlashParams(
        read_bandwidth_mb_s=read_bw, write_bandwidth_mb_s=write_bw, queue_depth=depth,
        parallel_units=units, read_command_latency_us=read_lat,
        write_command_latency_us=write_lat, page_size_bytes=1,
        max_io_bytes=max(o.io_bytes for o in observations), unit_choice="random",
    )


def _refine(
    obs: Sequence[Observation], units: int, depth: int, bandwidth0: float, latency0: float,
    other: tuple[float, float],
) -> tuple[float, float, float]:
    """Least squares over (log bandwidth, log latency) of ``obs`` (all reads or all writes)
    on the SimPy model with random units, from (``bandwidth0``, ``latency0``); ``other``: the
    other kind's (bandwidth, latency). Every evaluation draws the same units (common random
    numbers), so the cost is a deterministic function of the parameters. (bandwidth,
    latency, cost)."""
    write = obs[0].write
    measured = np.log([o.mb_s for o in obs])

    def residuals(x: np.ndarray) -> np.ndarray:
        mine = (math.exp(x[0]), math.exp(x[1]))
        (rb, rl), (wb, wl) = (other, mine) if write else (mine, other)
        device = _simulated_device(obs, units, depth, rb, rl, wb, wl)
        return np.log([steady_mb_s(device, o.io_bytes, o.queue_depth, o.write)
                       for o in obs]) - measured

    result = least_squares(residuals, np.log([bandwidth0, latency0]), method="trf",
                           max_nfev=REFINE_EVALUATIONS)
    return math.exp(result.x[0]), math.exp(result.x[1]), float(result.cost)


def _refine_search(
    reads: Sequence[Observation], depths: Sequence[int], depth: int, units: int,
    bandwidth0: float, latency0: float,
) -> tuple[int, int, float, float]:
    """The random-unit read fit on the SimPy model: from the approximation's (``depth``,
    ``units``), move to the best of the neighbours (one unit more or less, the next measured
    depth either side) while the refined cost falls; of the pairs tried within
    :data:`TIE_TOLERANCE` of the best, the deepest queue, then the fewest units. (depth,
    units, bandwidth, latency)."""
    tried: dict[tuple[int, int], tuple[float, float, float]] = {}

    def cost(pair: tuple[int, int]) -> float:
        if pair not in tried:
            d, u = pair
            bw, lat, _, _ = _fit_continuous(reads, u, d, bandwidth0, latency0, "random")
            tried[pair] = _refine(reads, u, d, bw, lat, (bw, lat))
        return tried[pair][2]

    current = (depth, units)
    while True:
        d, u = current
        i = depths.index(d)
        near = [(d, u + step) for step in (-1, 1) if 1 <= u + step <= MAX_RANDOM_UNITS]
        near += [(depths[j], u) for j in (i - 1, i + 1) if 0 <= j < len(depths)]
        best = min(near, key=cost)
        if cost(best) >= cost(current):
            break
        current = best
    low = tried[current][2] * (1 + TIE_TOLERANCE) + 1e-12
    chosen = max((pair for pair, fit in tried.items() if fit[2] <= low),
                 key=lambda pair: (pair[0], -pair[1]))
    return (*chosen, tried[chosen][0], tried[chosen][1])


def fit_flash(
    observations: Sequence[Observation], unit_choices: Sequence[UnitChoice] = UNIT_CHOICES
) -> FlashFit:
    """Fit the flash model to read and write measurements (at least two of each kind: the read
    ones at two queue depths or sizes at least) with each of ``unit_choices``: the fit with
    the lowest rms log error (the earlier choice on a tie within :data:`TIE_TOLERANCE`), the
    others in its ``others``. See the module docstring."""
    reads = [o for o in observations if not o.write]
    writes = [o for o in observations if o.write]
    if len(reads) < 2 or len(writes) < 2:
        raise ValueError("the fit needs at least two read and two write measurements")
    if not unit_choices:
        raise ValueError("the fit needs at least one unit choice")
    fits = [_fit_one(observations, choice) for choice in unit_choices]
    best = fits[0]
    for fit in fits[1:]:
        if fit.rms_log_error < best.rms_log_error * (1 - TIE_TOLERANCE):
            best = fit
    return replace(best, others=tuple(f for f in fits if f is not best))
