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
* **attention**: one KV head's GQA attention over ``N`` entries (``N`` keys against the query
  heads that share it, softmax, against ``N`` values; head_dim of the model), over copies that
  together exceed :data:`COLD_BYTES`, so they come from DRAM: FLOPs ``4 N head_dim g``, bytes
  ``2 N head_dim x 4`` as :func:`~sim.hardware.compute.attention_us` counts them.
* **scoring**: ``n`` key-sized vectors (centroids, page bounds) against the query heads that
  share a KV head, at the index sizes of the retrieval policies (:data:`SCORING_VECTORS`), over
  copies beyond the caches: FLOPs ``2 n head_dim g``, bytes ``n head_dim x 4`` as
  :func:`~sim.hardware.compute.scoring_us` counts them.
* **copy**: ``numpy.copyto`` of a :data:`COPY_BYTES` array; bandwidth counts the bytes read and
  the bytes written (STREAM's convention).

The roofline ``max(flops / cpu_gflops, bytes / bandwidth) + overhead`` takes each of its numbers
from one kind of kernel (:func:`fit_roofline`), attention its own rate ``attention_gflops``
from the attention kernels, and is checked against all of them (scoring is a check only).
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
#: scoring sizes measured (index vectors): the cluster policies' clusters for contexts of 2.5K,
#: 5K and 10K tokens at their default 80 tokens per cluster (sim/policies/static_clusters.py),
#: and Quest's min and max vectors of 16-token pages at 4K tokens (sim/policies/quest.py)
SCORING_VECTORS = (32, 64, 128, 512)


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


@dataclass(frozen=True)
class Kernel:
    """A kernel to time: its counts and ``run(i)``, the ``i``-th repetition (which takes the
    kernel's copies of its operands in turn); ``least``: repetitions that visit every copy."""

    name: str
    flops: float
    dram_bytes: float
    run: Callable[[int], object]
    least: int = 3


def time_kernel(kernel: Kernel, deadline: float) -> KernelTiming:
    """The best time of ``kernel`` over repetitions until ``deadline`` (at least
    ``kernel.least``)."""
    t = _best_time_us(kernel.run, deadline, least=kernel.least)
    return KernelTiming(kernel.name, kernel.flops, kernel.dram_bytes, t)


def _copies(nbytes: int, span: int = COLD_BYTES) -> int:
    """How many copies of an operand of ``nbytes`` together span ``span`` (at least one)."""
    return max(1, -(-span // nbytes))


def block_kernel(model: ModelGeometry) -> Kernel:
    """One decode step's matrix-vector products through a block of ``model``, over copies of
    the block that together span twice :data:`COLD_BYTES` (every matrix from DRAM)."""
    shapes = block_shapes(model)
    weights = sum(r * c for _, r, c in shapes)
    copies = _copies(4 * weights, 2 * COLD_BYTES)
    # Values do not change a float32 kernel's time (none is zero or subnormal); filling is
    # far cheaper than drawing random numbers for hundreds of MB.
    blocks = [[np.full((r, c), 0.5, dtype=np.float32) for _, r, c in shapes]
              for _ in range(copies)]
    vecs = [np.full(c, 0.25, dtype=np.float32) for _, _, c in shapes]

    def block(i: int) -> None:
        for m, v in zip(blocks[i % copies], vecs, strict=True):
            m @ v

    return Kernel("matvec block (cold)", 2.0 * weights, 4.0 * weights, block, copies + 1)


def lm_head_kernel(vocab_size: int, hidden_size: int) -> Kernel:
    """The final RMSNorm and the ``vocab_size x hidden_size`` LM head matvec, float32, as
    :func:`~sim.hardware.compute.lm_head_us` counts them (one matrix: beyond the caches when
    it exceeds :data:`COLD_BYTES`)."""
    head = np.full((vocab_size, hidden_size), 0.5, dtype=np.float32)
    norm = np.full(hidden_size, 1.0, dtype=np.float32)
    x = np.full(hidden_size, 0.25, dtype=np.float32)

    def run(_i: int) -> np.ndarray:
        normed = x * (1.0 / np.sqrt(np.mean(x * x) + 1e-6)) * norm
        return head @ normed

    weights = float(vocab_size) * hidden_size
    return Kernel(f"LM head {vocab_size}x{hidden_size}", 2.0 * weights + 4.0 * hidden_size,
                  4.0 * weights + 4.0 * hidden_size, run)


def attention_kernel(n_entries: int, head_dim: int, queries_per_kv_head: int) -> Kernel:
    """One KV head's GQA attention over ``n_entries`` entries: the query heads that share it
    against the keys, softmax, against the values, over copies of the keys and values that
    together span :data:`COLD_BYTES` (from DRAM); counts as
    :func:`~sim.hardware.compute.attention_us`."""
    n, d, g = n_entries, head_dim, queries_per_kv_head
    copies = _copies(2 * n * d * 4)
    keys = np.full((copies, n, d), 0.125, dtype=np.float32)
    values = np.full((copies, n, d), 0.5, dtype=np.float32)
    queries = np.full((d, g), 0.25, dtype=np.float32)  # the query heads as columns

    def attend(i: int) -> np.ndarray:
        # keys @ queries: each key (a row, as the KV cache stores it) against the query heads,
        # as llama.cpp's K*Q; numpy's queries.T @ keys.T asks OpenBLAS for a transposed
        # product that it packs, 1.3-2x slower here. Transposed to (g, N) for the softmax.
        scores = np.ascontiguousarray((keys[i % copies] @ queries).T)
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=1, keepdims=True)
        return scores @ values[i % copies]

    return Kernel(f"attention N={n}", 4.0 * n * d * g, 2.0 * n * d * 4, attend)


def scoring_kernel(n_vectors: int, head_dim: int, queries_per_kv_head: int) -> Kernel:
    """Scoring ``n_vectors`` key-sized vectors (centroids) against the query heads that share a
    KV head, over copies that together span :data:`COLD_BYTES` (from DRAM); counts as
    :func:`~sim.hardware.compute.scoring_us`."""
    n, d, g = n_vectors, head_dim, queries_per_kv_head
    copies = _copies(n * d * 4)
    vectors = np.full((copies, n, d), 0.125, dtype=np.float32)
    queries = np.full((d, g), 0.25, dtype=np.float32)

    def score(i: int) -> np.ndarray:
        return vectors[i % copies] @ queries  # as attention's scores (attention_kernel)

    return Kernel(f"scoring n={n}", 2.0 * n * d * g, n * d * 4.0, score)


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
    # cold, hot, call, copy, each attention and scoring size
    n_kernels = 4 + len(ATTENTION_ENTRIES) + len(SCORING_VECTORS)

    def until(done: int) -> float:
        """The deadline of the next kernel: an even share of the time left."""
        now = time.perf_counter()
        return now + max(0.0, deadline - now) / (n_kernels - done)

    block = block_kernel(model)
    kernels = [time_kernel(block, until(0))]
    del block  # the blocks' weights are no longer needed

    hidden = block_shapes(model)[0][2]
    rows = max(1, HOT_BYTES // (4 * hidden))
    hot = np.full((rows, hidden), 0.5, dtype=np.float32)
    x = np.full(hidden, 0.25, dtype=np.float32)
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
    done = 3
    for n in ATTENTION_ENTRIES:
        kernels.append(time_kernel(attention_kernel(n, d, g), until(done)))
        done += 1
    for n in SCORING_VECTORS:
        kernels.append(time_kernel(scoring_kernel(n, d, g), until(done)))
        done += 1

    source = np.ones(COPY_BYTES // 8)
    target = np.empty_like(source)
    t = _best_time_us(lambda _i: np.copyto(target, source), until(done))
    return CpuMeasurements(tuple(kernels), 2.0 * COPY_BYTES / t, threads)


@dataclass(frozen=True)
class RooflineFit:
    """The roofline's numbers from the kernels, and its time for every kernel."""

    cpu_gflops: float
    bandwidth_mb_s: float
    kernel_overhead_us: float
    #: the attention kernels' rate (None: no attention kernel is compute-bound)
    attention_gflops: float | None
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


def is_attention(kernel: KernelTiming) -> bool:
    return kernel.name.startswith("attention")


def fit_compute_rate(
    kernels: list[KernelTiming], mb_s: float, overhead_us: float
) -> float | None:
    """The GFLOP/s ``G`` whose roofline ``max(flops / G, bytes / mb_s) + overhead`` best fits
    the ``kernels``' times in relative terms: least squares of ``flops / G / (t - overhead)
    - 1`` over the kernels that took longer than their DRAM bytes explain (closed form in
    ``1 / G``). None when there are none (every kernel memory-bound)."""
    rates = [k.flops / (k.time_us - overhead_us) for k in kernels
             if k.time_us - overhead_us > k.dram_bytes / mb_s * (1 + 1e-9)]
    if not rates:
        return None
    # minimise sum((r x - 1)^2) over x = 1 / G (G in FLOP/us): x = sum(r) / sum(r^2)
    flop_per_us = sum(r * r for r in rates) / sum(rates)
    return flop_per_us / 1e3


def fit_roofline(kernels: tuple[KernelTiming, ...]) -> RooflineFit:
    """The roofline's numbers, each from one kind of kernel: ``kernel_overhead_us`` from the
    smallest matvec (a call doing next to no work), ``cpu_gflops`` from the cache-resident
    matvec (no DRAM bytes: its time less the call's is the compute side), the sustained
    bandwidth from the cold block of matvecs (the weight stream that dominates decode), and
    ``attention_gflops`` from the attention kernels (:func:`fit_compute_rate` with that
    bandwidth and overhead). The scoring kernels are the check of ``cpu_gflops`` (their
    residuals), as :func:`~sim.hardware.compute.scoring_us` charges them."""
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
    attention = fit_compute_rate([k for k in kernels if is_attention(k)], mb_s, overhead)
    return RooflineFit(gflops, mb_s, overhead, attention, tuple(
        (k, roofline_time_us(k.flops, k.dram_bytes,
                             attention if attention and is_attention(k) else gflops,
                             mb_s, overhead))
        for k in kernels
    ))
