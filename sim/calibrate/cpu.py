"""Measuring the CPU and DRAM with numpy, and fitting the roofline of
:mod:`sim.hardware.compute` to the timings.

Kernels, all float32 numpy on the BLAS numpy was built with (limited to ``threads`` threads),
each timed as the best of several repetitions (the least disturbed by other work on the machine):

* **matvec (cold)**: the matrix-vector products of one decode step through a transformer
  block of the simulated model: q, k, v, o, gate, up and down projections at its sizes
  (``configs/models``), taken in turn, over copies of the block that together span twice
  :data:`COLD_BYTES`, so every matrix comes from DRAM; bytes = 4 per weight, FLOPs = 2 per
  weight, as :func:`~sim.hardware.compute.dense_layer_us` counts them.
* **matvec (hot)**: one of them cut to :data:`HOT_BYTES` rows' worth, repeated on the same
  matrix: it stays in the CPU's caches, so DRAM bytes are 0 and the time is the compute side.
* **matvec (call)**: a 1 x :data:`TINY_COLUMNS` product: next to no work, its time is the cost
  of a call.
* **attention**: one KV head's GQA attention over ``N`` entries (the query heads that share it
  against ``N`` keys, softmax, against ``N`` values; head_dim of the model), over copies that
  together exceed :data:`COLD_BYTES`, so they come from DRAM: FLOPs ``4 N head_dim g``, bytes
  ``2 N head_dim x 4`` as :func:`~sim.hardware.compute.attention_us` counts them.
* **copy**: ``numpy.copyto`` of a :data:`COPY_BYTES` array; bandwidth counts the bytes read and
  the bytes written (STREAM's convention).

The roofline ``max(flops / cpu_gflops, bytes / bandwidth) + overhead`` takes each of its numbers
from one kind of kernel (:func:`fit_roofline`) and is checked against all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sim.model import ModelGeometry

#: bytes of the cache-resident ("hot") matrix: within a core's L2 on phones and desktops
HOT_BYTES = 256 * 1024
#: total bytes the attention copies span: beyond the last-level caches of phones (a few MiB)
#: and of most desktops
COLD_BYTES = 64 * 2**20
#: bytes of each array of the copy measurement
COPY_BYTES = 256 * 2**20
#: columns of the smallest matvec, whose time is the cost of a call
TINY_COLUMNS = 16
#: attention sizes measured (entries)
ATTENTION_ENTRIES = (256, 1024, 4096, 16384)


@dataclass(frozen=True)
class KernelTiming:
    """One kernel: its FLOPs, the bytes it streams from DRAM and its best time (us)."""

    name: str
    flops: float
    dram_bytes: float
    time_us: float

    @property
    def gflops(self) -> float:
        """Effective GFLOP/s (1 GFLOP/s = 1e3 FLOP/us)."""
        return self.flops / self.time_us / 1e3

    @property
    def mb_s(self) -> float:
        """Effective DRAM MB/s (1 MB/s = 1 byte/us)."""
        return self.dram_bytes / self.time_us


@dataclass(frozen=True)
class CpuMeasurements:
    kernels: tuple[KernelTiming, ...]
    copy_mb_s: float
    threads: int


def _best_time_us(run: Callable[[int], object], deadline: float, least: int = 3) -> float:
    """Best time (us) of one call of ``run(i)`` over repetitions: at least ``least``, more
    until ``deadline`` (``time.perf_counter``)."""
    best = math.inf
    i = 0
    while i < least or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        run(i)
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best * 1e6


def block_shapes(model: ModelGeometry) -> list[tuple[str, int, int]]:
    """(name, rows, columns) of a block's matrices: y = W x with W rows x columns."""
    hidden = model.hidden_size or model.n_q_heads * model.head_dim
    q = model.n_q_heads * model.head_dim
    kv = model.n_kv_heads * model.head_dim
    shapes = [("q", q, hidden), ("k", kv, hidden), ("v", kv, hidden), ("o", hidden, q)]
    if model.intermediate_size:
        inter = model.intermediate_size
        shapes += [("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]
    return shapes


def measure_cpu(model: ModelGeometry, seconds: float, threads: int = 1) -> CpuMeasurements:
    """Time the kernels of the module docstring within about ``seconds``, with the BLAS
    limited to ``threads`` threads (1 by default: a multi-threaded BLAS whose threads spin
    waiting for each other is slowed a hundredfold when other work holds the cores, and one
    thread's figure is reproducible)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(threads):
        return _measure_cpu(model, seconds, threads)


def _measure_cpu(model: ModelGeometry, seconds: float, threads: int) -> CpuMeasurements:
    deadline = time.perf_counter() + seconds
    n_kernels = 4 + len(ATTENTION_ENTRIES)  # cold, hot, call, copy, each attention size

    def until(done: int) -> float:
        """The deadline of the next kernel: an even share of the time left."""
        now = time.perf_counter()
        return now + max(0.0, deadline - now) / (n_kernels - done)

    # Values do not change a float32 kernel's time (none is zero or subnormal); filling is
    # far cheaper than drawing random numbers for hundreds of MB.
    shapes = block_shapes(model)
    weights = sum(r * c for _, r, c in shapes)
    # copies of the block taken in turn, together beyond the caches (a small model's block
    # alone may fit in a last-level cache)
    copies = max(1, -(-2 * COLD_BYTES // (4 * weights)))
    blocks = [[np.full((r, c), 0.5, dtype=np.float32) for _, r, c in shapes]
              for _ in range(copies)]
    vecs = [np.full(c, 0.25, dtype=np.float32) for _, _, c in shapes]

    def block(i: int) -> None:
        for m, v in zip(blocks[i % copies], vecs, strict=True):
            m @ v

    t = _best_time_us(block, until(0), least=copies + 1)
    kernels = [KernelTiming("matvec block (cold)", 2.0 * weights, 4.0 * weights, t)]
    mats = blocks[0]

    hidden = shapes[0][2]
    rows = max(1, HOT_BYTES // (4 * hidden))
    hot = mats[0][:rows].copy()
    x = vecs[0]
    blocks.clear()  # the blocks' weights are no longer needed
    repeat = 64
    t = _best_time_us(lambda _i: [hot @ x for _ in range(repeat)], until(1))
    kernels.append(KernelTiming(f"matvec {rows}x{hidden} (hot)", 2.0 * rows * hidden, 0.0,
                                t / repeat))
    tiny, y = hot[:1, :TINY_COLUMNS].copy(), x[:TINY_COLUMNS].copy()
    t = _best_time_us(lambda _i: [tiny @ y for _ in range(repeat)], until(2))
    kernels.append(KernelTiming(f"matvec 1x{TINY_COLUMNS} (call)", 2.0 * TINY_COLUMNS, 0.0,
                                t / repeat))

    g = model.n_q_heads // model.n_kv_heads
    d = model.head_dim
    for done, n in enumerate(ATTENTION_ENTRIES, start=3):
        copies = max(1, COLD_BYTES // (2 * n * d * 4))
        keys = np.full((copies, n, d), 0.125, dtype=np.float32)
        values = np.full((copies, n, d), 0.5, dtype=np.float32)
        query = np.full((g, d), 0.25, dtype=np.float32)

        def attend(i: int, keys: np.ndarray = keys, values: np.ndarray = values,
                   query: np.ndarray = query, copies: int = copies) -> np.ndarray:
            scores = query @ keys[i % copies].T
            scores -= scores.max(axis=1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=1, keepdims=True)
            return scores @ values[i % copies]

        t = _best_time_us(attend, until(done))
        kernels.append(KernelTiming(f"attention N={n}", 4.0 * n * d * g, 2.0 * n * d * 4, t))
        del keys, values

    source = np.ones(COPY_BYTES // 8)
    target = np.empty_like(source)
    t = _best_time_us(lambda _i: np.copyto(target, source), until(n_kernels - 1))
    return CpuMeasurements(tuple(kernels), 2.0 * COPY_BYTES / t, threads)


@dataclass(frozen=True)
class RooflineFit:
    """The roofline's numbers from the kernels, and its time for every kernel."""

    cpu_gflops: float
    bandwidth_mb_s: float
    kernel_overhead_us: float
    #: (kernel, modelled time us) per kernel
    predictions: tuple[tuple[KernelTiming, float], ...]

    def residual_lines(self) -> list[str]:
        width = max(len(k.name) for k, _ in self.predictions)
        return [
            f"{k.name:<{width}}  measured {k.time_us:10.1f} us  model {p:10.1f} us"
            f"  {100 * (p / k.time_us - 1):+6.1f}%  ({k.gflops:.2f} GFLOP/s"
            + (f", {k.mb_s:.0f} MB/s)" if k.dram_bytes else ")")
            for k, p in self.predictions
        ]


def roofline_time_us(
    flops: float, dram_bytes: float, gflops: float, mb_s: float, overhead_us: float
) -> float:
    """``max(flops / (gflops * 1e3), bytes / mb_s) + overhead`` (sim.hardware.compute)."""
    return max(flops / (gflops * 1e3), dram_bytes / mb_s) + overhead_us


def fit_roofline(kernels: tuple[KernelTiming, ...]) -> RooflineFit:
    """The roofline's three numbers, each from one kind of kernel: ``kernel_overhead_us`` from
    the smallest matvec (a call doing next to no work), ``cpu_gflops`` from the cache-resident
    matvec (no DRAM bytes: its time less the call's is the compute side), the sustained
    bandwidth from the cold block of matvecs (the weight stream that dominates decode). The
    attention kernels are the check (their residuals)."""
    calls = [k for k in kernels if k.name.endswith("(call)")]
    hot = [k for k in kernels if not k.dram_bytes and k not in calls]
    cold = [k for k in kernels if k.name.startswith("matvec") and k.dram_bytes]
    if not calls or not hot or not cold:
        raise ValueError("the roofline needs a call, a hot matvec and a cold matvec")
    overhead = min(k.time_us for k in calls)
    best = max(hot, key=lambda k: k.gflops)
    if best.time_us <= overhead:
        raise ValueError(f"{best.name} took no longer than an empty call ({overhead:.2f} us)")
    gflops = best.flops / (best.time_us - overhead) / 1e3
    mb_s = max(k.dram_bytes / max(k.time_us - overhead, 1e-9) for k in cold)
    return RooflineFit(gflops, mb_s, overhead, tuple(
        (k, roofline_time_us(k.flops, k.dram_bytes, gflops, mb_s, overhead)) for k in kernels
    ))
