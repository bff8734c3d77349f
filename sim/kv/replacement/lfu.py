"""Least-frequently-used replacement."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.kv.replacement.base import REPLACEMENTS, ReplacementPolicy

__all__ = ["LFUReplacement"]


@REPLACEMENTS.register("lfu")
@dataclass(eq=False)
class LFUReplacement(ReplacementPolicy):
    """Least frequently used: evicts the entries used the fewest times since they were (last)
    inserted, the inserting use counting as one; ties go to the least recently used, then to the
    lowest flat index, so that runs are deterministic."""

    def bind(self, n_heads: int, n_positions: int) -> None:
        super().bind(n_heads, n_positions)
        self._count = np.zeros((n_heads, n_positions), dtype=np.int64)
        self._stamp = np.zeros((n_heads, n_positions), dtype=np.int64)
        self._count_flat = self._count.reshape(-1)
        self._stamp_flat = self._stamp.reshape(-1)
        self._count_rows = list(self._count)
        self._stamp_rows = list(self._stamp)

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:
        # Misses are counted here too, but on_insert restarts their count right after.
        self._count_rows[head][positions] += 1  # positions are unique: no lost increments
        self._stamp_rows[head][positions] = now

    def on_access_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._count_flat[flat_idx] += 1  # flat indices are unique too
        self._stamp_flat[flat_idx] = now

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._count_rows[head][positions] = 1
        self._stamp_rows[head][positions] = now

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._count_flat[flat_idx] = 1
        self._stamp_flat[flat_idx] = now

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        if n >= candidates.size:
            return candidates
        counts = self._count_flat[candidates]
        # Two O(C) partitions instead of one composite key: count * stamp * flat could overflow.
        threshold = np.partition(counts, n - 1)[n - 1]
        below = candidates[counts < threshold]
        tied = candidates[counts == threshold]
        need = n - below.size
        if need < tied.size:
            keys = self._stamp_flat[tied] * self._stamp_flat.size + tied
            tied = tied[np.argpartition(keys, need - 1)[:need]]
        return np.concatenate((below, tied))
