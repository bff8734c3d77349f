"""Recency-ordered replacement: LRU and FIFO, which differ only in when an entry's stamp is
written (every use, or its insertion only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.kv.replacement.base import REPLACEMENTS, ReplacementPolicy

__all__ = ["FIFOReplacement", "LRUReplacement"]


@dataclass(eq=False)
class _OldestStampReplacement(ReplacementPolicy):
    """Evicts the entries with the smallest per-entry stamp; ties go to the lowest flat index
    so that runs are deterministic. Subclasses decide when the stamp is written."""

    def bind(self, n_heads: int, n_positions: int) -> None:
        super().bind(n_heads, n_positions)
        self._stamp = np.zeros((n_heads, n_positions), dtype=np.int64)
        self._stamp_flat = self._stamp.reshape(-1)
        # Row views made once: indexing a 1-D row is ~2x cheaper than stamp[head, positions].
        self._stamp_rows = list(self._stamp)

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        if n >= candidates.size:
            return candidates
        # One composite key (stamp, flat index) makes every key distinct, so an O(C)
        # argpartition gives the same set as a stable sort by stamp (10x slower at C ~ 16K).
        n_flat = self._stamp_flat.size
        keys = self._stamp_flat[candidates] * n_flat + candidates
        return candidates[np.argpartition(keys, n - 1)[:n]]


@REPLACEMENTS.register("lru")
@dataclass(eq=False)
class LRUReplacement(_OldestStampReplacement):
    """Least recently used: evicts the entries whose last use (``now`` of the latest access or
    insertion) is oldest; ties broken by lowest flat index. The paper's baseline (DynaKV §4.3)."""

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:
        self._stamp_rows[head][positions] = now

    def on_access_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._stamp_flat[flat_idx] = now

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._stamp_rows[head][positions] = now

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._stamp_flat[flat_idx] = now


@REPLACEMENTS.register("fifo")
@dataclass(eq=False)
class FIFOReplacement(_OldestStampReplacement):
    """First in, first out: evicts the entries inserted earliest (accesses do not refresh them);
    ties broken by lowest flat index."""

    def on_access_flat(self, flat_idx: np.ndarray, now: int) -> None:
        pass  # accesses do not refresh an entry

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._stamp_rows[head][positions] = now

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._stamp_flat[flat_idx] = now
