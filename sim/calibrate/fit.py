"""Fitting the flash model's parameters to storage measurements.

The model (:mod:`sim.hardware.flash`) is a closed tandem queue with deterministic service: a
command of ``b`` bytes holds one of ``queue_depth`` slots, one of ``parallel_units`` units for
the command latency ``L`` and then the single link for ``b / bw`` microseconds. A measurement
that keeps ``q`` commands in flight (``q`` threads, or fio's ``iodepth``) sees at most
``min(q, queue_depth)`` of them inside the device, so in steady state it delivers

    commands/us = min(min(q, queue_depth) / (L + b / bw), parallel_units / L, bw / b)

(:func:`model_mb_s`; a test checks it against the SimPy model, :func:`simulated_mb_s`). The fit
chooses the read link bandwidth and command latency (continuous, by least squares on the log
of the throughput: every measurement weighs by its relative error) for every integer pair
``parallel_units <= queue_depth`` (more units than slots are never busy at once, so the pair
``P > Q`` is the same model as ``P = Q``), with ``queue_depth`` among the queue depths the
measurements used (a device whose throughput still grows at the deepest measured queue is
fitted with that depth: nothing measured says more). Writes share the units and slots; their
bandwidth and latency are fitted to the write measurements once the read fit has fixed them.
Pairs whose cost is within :data:`TIE_TOLERANCE` of the best explain the data equally well;
of those, the deepest queue, then the fewest units, is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import simpy
from scipy.optimize import least_squares

from sim.hardware.flash import Flash, FlashParams

#: relative difference in fit cost under which two (units, queue depth) pairs count as equal
TIE_TOLERANCE = 0.01


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


def model_mb_s(
    io_bytes: float,
    host_queue_depth: int,
    bandwidth_mb_s: float,
    latency_us: float,
    parallel_units: int,
    queue_depth: int,
) -> float:
    """Steady-state throughput (MB/s) of the flash model for one command size kept
    ``host_queue_depth`` deep (see the module docstring)."""
    in_flight = min(host_queue_depth, queue_depth)
    per_us = min(
        in_flight / (latency_us + io_bytes / bandwidth_mb_s),
        parallel_units / latency_us,
        bandwidth_mb_s / io_bytes,
    )
    return per_us * io_bytes


def simulated_mb_s(
    params: FlashParams, io_bytes: int, host_queue_depth: int, write: bool = False,
    n_commands: int = 2000,
) -> float:
    """The same figure from the SimPy model itself: ``n_commands`` commands submitted at once to
    a device whose queue is ``min(host_queue_depth, queue_depth)`` deep (what a host keeping
    that many in flight lets in), MB/s of requested bytes until the last completes."""
    device = params.model_copy(
        update={"queue_depth": min(host_queue_depth, params.queue_depth)}
    )
    env = simpy.Environment()
    flash = Flash(env, device)
    sizes = np.full(n_commands, io_bytes, dtype=np.int64)
    (flash.write if write else flash.read)(sizes)
    env.run()
    return n_commands * io_bytes / env.now


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
    """The fitted parameters and every measurement's residual."""

    read_bandwidth_mb_s: float
    read_command_latency_us: float
    write_bandwidth_mb_s: float
    write_command_latency_us: float
    parallel_units: int
    queue_depth: int
    residuals: tuple[Residual, ...]

    @property
    def rms_log_error(self) -> float:
        """Root mean square of ``log(model / measured)`` over the measurements."""
        logs = [math.log1p(r.error) for r in self.residuals]
        return math.sqrt(sum(x * x for x in logs) / len(logs))

    def residual_lines(self) -> list[str]:
        """One line per measurement: measured, model, relative error."""
        width = max(len(r.observation.label) for r in self.residuals)
        return [
            f"{r.observation.label:<{width}}  measured {r.observation.mb_s:9.1f} MB/s"
            f"  model {r.model_mb_s:9.1f} MB/s  {100 * r.error:+6.1f}%"
            for r in self.residuals
        ]


def _fit_continuous(
    obs: Sequence[Observation], units: int, depth: int, bandwidth0: float, latency0: float
) -> tuple[float, float, float]:
    """Least squares over (log bandwidth, log latency) for fixed units and depth: (bandwidth,
    latency, cost)."""
    sizes = np.array([o.io_bytes for o in obs], dtype=np.float64)
    hosts = np.array([o.queue_depth for o in obs], dtype=np.float64)
    measured = np.log([o.mb_s for o in obs])

    def residuals(x: np.ndarray) -> np.ndarray:
        bw, lat = math.exp(x[0]), math.exp(x[1])
        per_us = np.minimum(
            np.minimum(np.minimum(hosts, depth) / (lat + sizes / bw), units / lat), bw / sizes
        )
        return np.log(per_us * sizes) - measured

    best: tuple[float, float, float] | None = None
    for scale in (1.0, 0.3, 3.0):  # a few starts: the min() makes the surface piecewise
        start = np.log([bandwidth0, latency0 * scale])
        result = least_squares(residuals, start, method="trf", x_scale=1.0)
        cost = float(result.cost)
        if best is None or cost < best[2]:
            best = (math.exp(result.x[0]), math.exp(result.x[1]), cost)
    assert best is not None
    return best


def _starts(obs: Sequence[Observation]) -> tuple[float, float]:
    """Starting bandwidth (the best measured) and latency (the shallowest, smallest command's
    time less its transfer at that bandwidth)."""
    bandwidth = max(o.mb_s for o in obs) * 1.05
    first = min(obs, key=lambda o: (o.queue_depth, o.io_bytes))
    time_us = first.io_bytes / first.mb_s * first.queue_depth
    return bandwidth, max(time_us - first.io_bytes / bandwidth, 1e-3)


def fit_flash(observations: Sequence[Observation]) -> FlashFit:
    """Fit the flash model to read and write measurements (at least two of each kind: the read
    ones at two queue depths or sizes at least); see the module docstring."""
    reads = [o for o in observations if not o.write]
    writes = [o for o in observations if o.write]
    if len(reads) < 2 or len(writes) < 2:
        raise ValueError("the fit needs at least two read and two write measurements")
    depths = sorted({o.queue_depth for o in reads})
    bandwidth0, latency0 = _starts(reads)
    candidates = []
    for depth in depths:
        for units in range(1, depth + 1):
            bw, lat, cost = _fit_continuous(reads, units, depth, bandwidth0, latency0)
            candidates.append((cost, depth, units, bw, lat))
    best_cost = min(c[0] for c in candidates)
    tied = [c for c in candidates if c[0] <= best_cost * (1 + TIE_TOLERANCE) + 1e-12]
    _, depth, units, read_bw, read_lat = max(tied, key=lambda c: (c[1], -c[2]))
    write_bw0, write_lat0 = _starts(writes)
    write_bw, write_lat, _ = _fit_continuous(writes, units, depth, write_bw0, write_lat0)
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
