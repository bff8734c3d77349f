"""numpy's attention taken apart: the scores product, the softmax and the weighted sum, timed
separately and whole, for several head sizes and query heads per KV head, to see which part
costs what (the evidence behind ``device.compute.attention_gflops``: a per-FLOP rate, not a
per-entry softmax cost; README "Compute model").

Run: ``python benchmarks/attention_parts.py [--seconds 0.2]`` (plain markdown table on
stdout). float32, one BLAS thread, each part the best of repetitions over copies of the keys
and values spanning 64 MiB (from DRAM), as ``kvsim calibrate``'s attention kernel
(:func:`sim.calibrate.cpu.attention_kernel`) computes them: ``scores = (K @ Q).T`` (each key,
a row, against the ``g`` query heads), the softmax of each row, ``scores @ V``. Columns: the
parts' times; the products' GFLOP/s (``2 N d g`` FLOP each); the softmax's ns per score
(``g N`` scores); the whole kernel's GFLOP/s (``4 N d g``). A per-FLOP cost shows as times in
proportion to ``d g``; a per-entry one as times in proportion to ``g`` alone; a stream of the
keys and values as times in proportion to ``d`` alone. Timings taken under load are not
conclusive (the header prints the load average).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim.calibrate.cpu import ATTENTION_ENTRIES, COLD_BYTES, attention_kernel  # noqa: E402

#: (head_dim, query heads per KV head): Llama-3.2-1B's (64, 4) and 3B's (128, 3), Qwen2.5-1.5B's
#: (128, 6), and 64 with 1 and 8 to vary the query heads alone
GEOMETRIES = ((64, 4), (64, 1), (64, 8), (128, 3), (128, 6))


def best_us(run: Callable[[int], object], seconds: float) -> float:
    """Best time (us) of ``run(i)`` over repetitions for about ``seconds`` (at least 3)."""
    deadline, best, i = time.perf_counter() + seconds, math.inf, 0
    while i < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        run(i)
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best * 1e6


def parts(n: int, d: int, g: int, seconds: float) -> dict[str, float]:
    """The times (us) of the parts and the whole at ``n`` entries."""
    out = _parts(n, d, g, seconds)  # its operands freed before the whole's are made
    out["whole"] = best_us(attention_kernel(n, d, g).run, seconds)
    return out


def _parts(n: int, d: int, g: int, seconds: float) -> dict[str, float]:
    copies = max(1, -(-COLD_BYTES // (2 * n * d * 4)))
    keys = np.full((copies, n, d), 0.125, dtype=np.float32)
    values = np.full((copies, n, d), 0.5, dtype=np.float32)
    queries = np.full((d, g), 0.25, dtype=np.float32)
    weights = np.full((g, n), 1.0 / n, dtype=np.float32)

    def scores(i: int) -> np.ndarray:
        return np.ascontiguousarray((keys[i % copies] @ queries).T)

    def softmax(_i: int) -> np.ndarray:
        s = weights.copy()
        s -= s.max(axis=1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        return s

    def weighted(i: int) -> np.ndarray:
        return weights @ values[i % copies]

    out = {name: best_us(run, seconds) for name, run in
           (("scores", scores), ("softmax", softmax), ("weighted", weighted),
            ("copy", lambda _i: weights.copy()))}
    out["softmax"] = max(0.0, out["softmax"] - out.pop("copy"))  # its input's copy aside
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.2,
                        help="time spent repeating each part (default 0.2)")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        print("error: --seconds must be > 0", file=sys.stderr)
        return 2
    from threadpoolctl import threadpool_limits

    print(f"float32 numpy, 1 BLAS thread, best of {args.seconds:g} s per part; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print()
    print("| d | g | N | scores us | softmax us | weighted us | whole us | scores GFLOP/s "
          "| weighted GFLOP/s | softmax ns/score | whole GFLOP/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with threadpool_limits(1):
        for d, g in GEOMETRIES:
            for n in ATTENTION_ENTRIES:
                t = parts(n, d, g, args.seconds)
                product = 2.0 * n * d * g / 1e3  # GFLOP/s = kFLOP / us
                print(f"| {d} | {g} | {n} | {t['scores']:,.1f} | {t['softmax']:,.1f} | "
                      f"{t['weighted']:,.1f} | {t['whole']:,.1f} | {product / t['scores']:.1f} "
                      f"| {product / t['weighted']:.1f} | {1e3 * t['softmax'] / (g * n):.2f} "
                      f"| {2 * product / t['whole']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
