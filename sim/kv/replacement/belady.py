"""Belady's optimal offline replacement (MIN), the lower bound on misses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from sim.kv.replacement.base import REPLACEMENTS, ReplacementPolicy

__all__ = ["BeladyReplacement"]


@REPLACEMENTS.register("belady")
@dataclass(eq=False)
class BeladyReplacement(ReplacementPolicy):
    """Belady's optimal offline replacement (MIN; Belady 1966, "A study of replacement
    algorithms for a virtual-storage computer"): evicts the entries whose next use lies farthest
    in the future, entries never used again first; ties go to the lowest flat index.

    Offline: :meth:`observe_future` must receive the run's own accesses (the engine does this)
    before anything has to be evicted; ``victims`` raises ``RuntimeError`` otherwise rather than
    silently degrade, since a wrong "optimum" would pass for a lower bound. If the actual
    accesses differ from the observed ones the choices stay valid but are no longer optimal.

    With every miss admitted (no bypass), MIN gives the fewest misses of any replacement policy
    as long as each selection fits in the cache (no streaming) and every inserted position is
    new, as in decoding (the new token's K/V). ``observe_future`` does not tell accesses from
    inserts, so an insert of a once-evicted entry (which costs no miss) counts as a use and the
    choice may then be suboptimal.

    State: the observed uses of all entries as one CSR over flat indices (``_uses`` holds, per
    entry in time order, the rank of the ``now`` of each use, then a sentinel; int32), a pointer
    per entry to its first use after its latest touch, advanced by ``on_access``/``on_insert``,
    and the rank that pointer reads (``_next``), so ``victims`` is one gather and one
    ``argpartition``. Memory: 4 bytes per observed use plus 20 bytes per entry of the layer.
    """

    needs_future: ClassVar[bool] = True

    def bind(self, n_heads: int, n_positions: int) -> None:
        super().bind(n_heads, n_positions)
        self._times: np.ndarray | None = None  # distinct observed `now` values, ascending
        self._past = 0  # observed uses of a smaller rank lie in the past

    def observe_future(self, accesses: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        m = self.n_positions
        n_flat = self.n_heads * m
        times = np.fromiter((now for now, _ in accesses), dtype=np.int64, count=len(accesses))
        distinct = np.unique(times)
        never = distinct.size  # the next-use rank of an entry not used again
        if never >= np.iinfo(np.int32).max:
            raise ValueError(f"belady: too many distinct times ({never}) for int32 ranks")
        ranks = np.searchsorted(distinct, times)
        flat_parts, rank_parts = [], []
        for rank, (_, per_head) in zip(ranks.tolist(), accesses, strict=True):
            for h, positions in enumerate(per_head):
                if len(positions):
                    flat_parts.append(np.asarray(positions, dtype=np.int64) + h * m)
                    rank_parts.append(np.full(len(positions), rank, dtype=np.int32))
        # One sentinel use of rank `never` closes every entry's list, so a pointer never runs
        # off its entry's uses and needs no bound check.
        flat_parts.append(np.arange(n_flat, dtype=np.int64))
        rank_parts.append(np.full(n_flat, never, dtype=np.int32))
        flat = np.concatenate(flat_parts)
        del flat_parts
        # Stable: each entry's uses stay in time order, its sentinel (appended last) at the end.
        self._uses = np.concatenate(rank_parts)[np.argsort(flat, kind="stable")]
        del rank_parts
        self._ptr = np.zeros(n_flat, dtype=np.int64)
        np.cumsum(np.bincount(flat, minlength=n_flat)[:-1], out=self._ptr[1:])
        del flat
        self._next = self._uses[self._ptr].astype(np.int64)  # next-use rank of every entry
        self._never = np.int64(never)
        self._times = distinct
        self._now: int | None = None  # the latest `now` seen (None: none yet)
        self._rank = -1

    def _advance(self, flat: np.ndarray, last_rank: int) -> None:
        """Move the pointers of ``flat`` (distinct) past every use of rank <= ``last_rank`` and
        refresh their next-use rank."""
        # _next[f] == _uses[_ptr[f]] always, so the first check needs no gather from _uses.
        due = self._next[flat] <= last_rank
        if not due.all():  # e.g. on_insert of entries on_access already moved on at this `now`
            flat = flat[due]
            if not flat.size:
                return
        uses = self._uses
        p = self._ptr[flat] + 1  # the usual case: exactly one use consumed
        nxt = uses[p]
        more = nxt <= last_rank
        while more.any():  # several uses at one `now`, or uses that did not happen
            p[more] += 1
            nxt = uses[p]
            more = nxt <= last_rank
        self._ptr[flat] = p
        self._next[flat] = nxt

    def _touch(self, head: int, positions: np.ndarray, now: int) -> None:
        if self._times is None:
            return
        if now != self._now:
            # Rank of the latest observed `now` <= now: an unobserved `now` consumes nothing new.
            rank = int(np.searchsorted(self._times, now, side="right")) - 1
            self._now, self._rank = now, rank
            # Uses of rank < _past are over; those at `now` itself may still be to come.
            self._past = rank if rank >= 0 and self._times[rank] == now else rank + 1
        if positions.size:
            self._advance(positions + head * self.n_positions, self._rank)

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:
        self._touch(head, positions, now)

    def on_access_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._touch(0, flat_idx, now)  # head 0: flat indices are head 0's positions

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._touch(head, positions, now)

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._touch(0, flat_idx, now)  # head 0: flat indices are head 0's positions

    def next_use_rank(self, flat_idx: np.ndarray) -> np.ndarray:
        """Rank (index among the observed distinct ``now`` values) of each entry's first
        observed use not before the current time; ``len(distinct nows)`` if none."""
        if self._times is None:
            raise RuntimeError(
                "belady replacement needs the run's future accesses: call"
                " LayerCache.observe_future (the engine does) before the first access"
            )
        out = self._next[flat_idx]
        stale = out < self._past
        if stale.any():
            # Observed uses that did not happen (the run diverged from its future): skip them.
            self._advance(flat_idx[stale], self._past - 1)
            out[stale] = self._next[flat_idx[stale]]
        return out

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        next_use = self.next_use_rank(candidates)
        if n >= candidates.size:
            return candidates
        # Farthest next use first, then lowest flat index: one composite key, all distinct.
        # (never + 1) * n_flat stays far below 2**63 (ranks <= accesses, n_flat = entries).
        keys = (self._never - next_use) * self._next.size + candidates
        return candidates[np.argpartition(keys, n - 1)[:n]]
