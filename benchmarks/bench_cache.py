"""Microseconds per ``LayerCache.access`` call (the engine makes ~250K of them per run).

Workload per KV head and step: ~800 selected positions out of 8448 (16 sinks, 64 recent, and
~720 others of which 70% repeat the previous step's, like a slowly drifting top-k), followed by
the insert of the new token, as the engine does. Capacity is 1/4 of heads * positions, so the
steady state evicts on almost every call; a second line shows the no-eviction fast path.

    python benchmarks/bench_cache.py [--steps 2000] [--replacement lru]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sim.kv.cache import LayerCache  # noqa: E402
from sim.kv.replacement import REPLACEMENTS  # noqa: E402

MAX_POSITIONS = 8448
SELECTED = 800


def workload(n_heads: int, steps: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    prompt = MAX_POSITIONS - steps
    prev = [rng.choice(prompt, SELECTED, replace=False) for _ in range(n_heads)]
    out = []
    for s in range(steps):
        context = prompt + s
        per_head = []
        for h in range(n_heads):
            keep = rng.choice(prev[h], int(0.7 * (SELECTED - 80)), replace=False)
            fresh = rng.integers(16, context - 64, SELECTED - 80 - keep.size)
            sel = np.unique(
                np.concatenate((np.arange(16), np.arange(context - 64, context), keep, fresh))
            )
            prev[h] = sel
            per_head.append(sel.astype(np.int64))
        out.append(per_head)
    return out


def bench(
    n_heads: int, capacity: int, replacement: str, steps: int, seed: int
) -> tuple[float, float]:
    sels = workload(n_heads, steps, np.random.default_rng(seed))
    prompt = MAX_POSITIONS - steps
    cache = LayerCache(n_heads, MAX_POSITIONS, capacity, REPLACEMENTS.create(replacement))
    elapsed = np.empty(steps)
    for s, per_head in enumerate(sels):
        t0 = time.perf_counter()
        cache.access(per_head, now=s)
        elapsed[s] = time.perf_counter() - t0
        cache.insert([np.array([prompt + s])] * n_heads, now=s)
    # Median, not mean: the machine is shared and a few preempted calls would dominate a mean.
    return float(np.median(elapsed[steps // 10 :])) * 1e6, cache.hit_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--replacement", default="lru", choices=REPLACEMENTS.names())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"LayerCache.access, n_positions={MAX_POSITIONS}, ~{SELECTED} selected/head,"
        f" {args.replacement}, {args.steps} steps"
    )
    for n_heads in (3, 8):
        for label, capacity in (
            ("capacity 1/4 (evicting)", n_heads * MAX_POSITIONS // 4),
            ("capacity all (no eviction)", n_heads * MAX_POSITIONS),
        ):
            us, hit = bench(n_heads, capacity, args.replacement, args.steps, args.seed)
            print(
                f"  n_heads={n_heads}  {label:27s} {us:8.1f} us/call (median)  hit ratio {hit:.2f}"
            )


if __name__ == "__main__":
    main()
