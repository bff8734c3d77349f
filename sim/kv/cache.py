"""DRAM cache of one layer's KV entries (all its KV heads) and the replacement policies.

The cache owns capacity and accounting; a :class:`ReplacementPolicy` only chooses victims (the
split of cachetools' ``Cache`` / ``LRUCache.popitem`` and libCacheSim's ``to_evict``). Capacity is
counted in *entries* (one token position of one KV head; all entries of a layer have the same
byte size, so bytes are ``entries * entry_bytes`` outside this module).

State is kept in ``(n_heads, max_positions)`` numpy arrays and every call is vectorised: the
engine calls :meth:`LayerCache.access` once per (decode step, layer), about 250K times per run.
The common path (the misses fit in the free space) does per-head fancy indexing only; the
eviction path scans the layer once (``O(n_heads * max_positions)``).

``now`` is an integer logical clock supplied by the caller (the engine passes
``step * n_layers + layer``); it only orders events, it is not simulated time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from sim.registry import Registry

__all__ = [
    "REPLACEMENTS",
    "BeladyReplacement",
    "FIFOReplacement",
    "LFUReplacement",
    "LRUReplacement",
    "LayerCache",
    "ReplacementPolicy",
]


class ReplacementPolicy(ABC):
    """Chooses which resident entries to evict; the cache does everything else.

    One instance serves exactly one :class:`LayerCache` (``bind`` allocates its state). Entries
    are addressed per head by position, or globally by *flat index* ``head * max_positions +
    position``. Call order within one :meth:`LayerCache.access`:

    1. ``on_access(h, selected, now)`` for every head, with **all** positions the head selects now
       (hits and misses alike, including misses that end up streamed), before any eviction;
    2. ``victims(candidates, n)`` then ``on_evict(victims)`` if the misses do not fit;
    3. ``on_insert(h, admitted, now)`` for the misses that become resident.

    :meth:`LayerCache.insert` calls ``on_access`` for positions already resident and
    ``on_insert`` for new ones. Hooks have no-op defaults; only ``victims`` is abstract.
    LFU counts in ``on_access`` and restarts the count in ``on_insert``; group-aware policies
    (cluster-aligned replacement) set ``uses_groups`` and are told every entry's group through
    ``assign_groups`` (prompt at ``now = -1``, each appended token, each relabel); offline
    policies (Belady) set
    ``needs_future`` and receive the run's whole access sequence through ``observe_future``
    once, after ``bind`` and before the first access.
    """

    #: True for offline policies: whoever drives the cache must call :meth:`observe_future`
    #: (via :meth:`LayerCache.observe_future`) before the first access.
    needs_future: ClassVar[bool] = False
    #: True for group-aware policies: whoever drives the cache reports group changes through
    #: :meth:`LayerCache.assign_groups` (the engine skips that work for the others).
    uses_groups: ClassVar[bool] = False

    def bind(self, n_heads: int, max_positions: int) -> None:
        """Allocate per-entry state for a layer of ``n_heads`` x ``max_positions`` entries."""
        self.n_heads = n_heads
        self.max_positions = max_positions

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:  # noqa: B027
        """``positions`` (sorted, unique) of ``head`` are used at time ``now``."""

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:  # noqa: B027
        """``positions`` (sorted, unique) of ``head`` became resident at time ``now``."""

    def on_evict(self, flat_idx: np.ndarray) -> None:  # noqa: B027
        """The entries at ``flat_idx`` were evicted (no longer resident)."""

    def assign_groups(  # noqa: B027
        self, head: int, positions: np.ndarray, groups: np.ndarray, now: int
    ) -> None:
        """From ``now`` on, ``positions`` of ``head`` belong to ``groups`` (one label each):
        the prompt's clusters, a decode token joining one, a split moving members."""

    def observe_future(  # noqa: B027
        self, accesses: Sequence[tuple[int, Sequence[np.ndarray]]]
    ) -> None:
        """The whole run, in time order: ``(now, per_head_positions)`` for every
        :meth:`LayerCache.access` *and* every :meth:`LayerCache.insert` the cache will see
        (``now`` non-decreasing; an access and an insert may share one ``now``). Called once;
        only policies with ``needs_future`` use it."""

    @abstractmethod
    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """Return exactly ``n`` distinct elements of ``candidates`` to evict.

        ``candidates``: int64 flat indices, sorted ascending, of the resident entries that may be
        evicted now (entries selected by the current access are excluded);
        ``1 <= n <= len(candidates)``. The choice must be deterministic.
        """


REPLACEMENTS: Registry[ReplacementPolicy] = Registry("cache replacement policy")


@dataclass(eq=False)
class _OldestStampReplacement(ReplacementPolicy):
    """Evicts the entries with the smallest per-entry stamp; ties go to the lowest flat index
    so that runs are deterministic. Subclasses decide when the stamp is written."""

    def bind(self, n_heads: int, max_positions: int) -> None:
        super().bind(n_heads, max_positions)
        self._stamp = np.zeros((n_heads, max_positions), dtype=np.int64)
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

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._stamp_rows[head][positions] = now


@REPLACEMENTS.register("fifo")
@dataclass(eq=False)
class FIFOReplacement(_OldestStampReplacement):
    """First in, first out: evicts the entries inserted earliest (accesses do not refresh them);
    ties broken by lowest flat index."""

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._stamp_rows[head][positions] = now


@REPLACEMENTS.register("lfu")
@dataclass(eq=False)
class LFUReplacement(ReplacementPolicy):
    """Least frequently used: evicts the entries used the fewest times since they were (last)
    inserted, the inserting use counting as one; ties go to the least recently used, then to the
    lowest flat index, so that runs are deterministic."""

    def bind(self, n_heads: int, max_positions: int) -> None:
        super().bind(n_heads, max_positions)
        self._count = np.zeros((n_heads, max_positions), dtype=np.int64)
        self._stamp = np.zeros((n_heads, max_positions), dtype=np.int64)
        self._count_flat = self._count.reshape(-1)
        self._stamp_flat = self._stamp.reshape(-1)
        self._count_rows = list(self._count)
        self._stamp_rows = list(self._stamp)

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:
        # Misses are counted here too, but on_insert restarts their count right after.
        self._count_rows[head][positions] += 1  # positions are unique: no lost increments
        self._stamp_rows[head][positions] = now

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._count_rows[head][positions] = 1
        self._stamp_rows[head][positions] = now

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

    def bind(self, n_heads: int, max_positions: int) -> None:
        super().bind(n_heads, max_positions)
        self._times: np.ndarray | None = None  # distinct observed `now` values, ascending
        self._past = 0  # observed uses of a smaller rank lie in the past

    def observe_future(self, accesses: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        m = self.max_positions
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
        self._now, self._rank = None, -1

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
            self._advance(positions + head * self.max_positions, self._rank)

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:
        self._touch(head, positions, now)

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._touch(head, positions, now)

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

class LayerCache:
    """DRAM cache of one layer's KV entries, shared by its ``n_heads`` KV heads.

    Parameters
    ----------
    n_heads, max_positions:
        Layer shape; positions are ``0 <= p < max_positions``.
    capacity_entries:
        Most entries resident at once (all heads together); 0 disables caching.
    replacement:
        A fresh :class:`ReplacementPolicy` instance, bound to this cache (one per cache).
    check_inputs:
        Also verify that every selection is sorted and unique (O(n) per head; for tests and
        debugging; the engine's selections satisfy it by contract).

    Counters (entries, cumulative): ``hits``, ``misses`` (selected and not resident, read from
    flash) and ``streamed`` (misses read and attended but not retained because the selection
    alone exceeds the capacity; ``streamed <= misses``). ``resident_entries`` and
    ``peak_resident_entries`` never exceed ``capacity_entries``.
    """

    def __init__(
        self,
        n_heads: int,
        max_positions: int,
        capacity_entries: int,
        replacement: ReplacementPolicy,
        *,
        check_inputs: bool = False,
    ) -> None:
        if n_heads <= 0:
            raise ValueError(f"n_heads must be > 0, got {n_heads}")
        if max_positions <= 0:
            raise ValueError(f"max_positions must be > 0, got {max_positions}")
        if capacity_entries < 0:
            raise ValueError(f"capacity_entries must be >= 0, got {capacity_entries}")
        if not isinstance(replacement, ReplacementPolicy):
            raise ValueError(f"replacement must be a ReplacementPolicy, got {replacement!r}")
        if getattr(replacement, "_kvsim_bound", False):
            # Shared state between two layers would silently corrupt both caches.
            raise ValueError(
                f"replacement policy {replacement!r} is already bound to a cache; "
                "create one instance per LayerCache"
            )
        replacement.bind(n_heads, max_positions)
        replacement._kvsim_bound = True  # type: ignore[attr-defined]
        self.n_heads = n_heads
        self.max_positions = max_positions
        self.capacity_entries = int(capacity_entries)
        self.replacement = replacement
        self.check_inputs = check_inputs
        self._resident = np.zeros((n_heads, max_positions), dtype=bool)
        self._resident_flat = self._resident.reshape(-1)
        # Row views made once: 1-D take/put is ~2x cheaper than resident[h, positions].
        self._rows = list(self._resident)
        self.resident_entries = 0
        self.peak_resident_entries = 0
        self.hits = 0
        self.misses = 0
        self.streamed = 0

    # ------------------------------------------------------------------ public API

    def access(self, selections: list[np.ndarray], now: int) -> list[np.ndarray]:
        """Look up the positions each head attends now; return the misses per head.

        ``selections[h]``: sorted unique int positions KV head ``h`` attends. Hits and misses are
        all touched (``on_access``); misses are inserted; when over capacity, victims are chosen
        by the replacement policy among resident entries *not* selected now. If the selection
        alone exceeds the capacity, the misses that do not fit are streamed (read, attended,
        not retained): those kept are the lowest positions across heads (ties: lowest head),
        which favours attention sinks and older, denser context. Returns, per head, the sorted
        positions that were not resident (the engine reads all of them from flash).
        """
        self._check_selections(selections, "selections")
        rows = self._rows
        rep = self.replacement
        misses: list[np.ndarray] = []
        n_selected = 0
        for h, sel in enumerate(selections):
            misses.append(sel[~rows[h].take(sel)])
            n_selected += sel.size
            rep.on_access(h, sel, now)
        n_miss = sum(m.size for m in misses)
        n_hit = n_selected - n_miss
        self.hits += n_hit
        self.misses += n_miss
        if n_miss:
            # Hits are the protected entries: they are in use now and must not be evicted.
            self._admit(misses, protected=selections, n_protected=n_hit, now=now)
        return misses

    def insert(self, head_positions: list[np.ndarray], now: int) -> None:
        """Make just-computed entries (the new decode token's) resident.

        ``head_positions[h]``: sorted unique positions for head ``h`` (usually one). Positions
        already resident are only touched. Evicts by the replacement policy if needed; resident
        afterwards unless the capacity is 0 (or smaller than the number inserted, in which case
        the lowest positions are kept). Does not change ``hits``/``misses``/``streamed``.
        """
        self._check_selections(head_positions, "head_positions")
        rows = self._rows
        rep = self.replacement
        new: list[np.ndarray] = []
        n_old = 0
        for h, pos in enumerate(head_positions):
            is_res = rows[h].take(pos)
            fresh = pos[~is_res]
            new.append(fresh)
            if fresh.size != pos.size:
                rep.on_access(h, pos[is_res], now)
                n_old += pos.size - fresh.size
        if any(f.size for f in new):
            self._admit(new, protected=head_positions, n_protected=n_old, now=now, count=False)

    def resident(self, head: int) -> np.ndarray:
        """Sorted positions of ``head`` currently resident (for tests and invariants)."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head must be in [0, {self.n_heads}), got {head}")
        return np.flatnonzero(self._resident[head])

    def assign_groups(
        self, head: int, positions: np.ndarray, groups: np.ndarray | int, now: int
    ) -> None:
        """Forward a group change of ``head``'s ``positions`` to the replacement policy."""
        positions = np.asarray(positions, dtype=np.int64)
        groups = np.broadcast_to(np.asarray(groups, dtype=np.int64), positions.shape)
        self.replacement.assign_groups(head, positions, groups, now)

    def observe_future(self, accesses: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        """Give an offline replacement policy (``replacement.needs_future``) the whole run.

        ``accesses``: in time order, ``(now, per_head_positions)`` of every later
        :meth:`access` and :meth:`insert` call, with the same arguments. Checked here (shape,
        range, non-decreasing ``now``), then forwarded; a no-op for online policies.
        """
        previous = None
        for i, (now, per_head) in enumerate(accesses):
            if previous is not None and now < previous:
                raise ValueError(
                    f"observe_future: accesses must be in time order, got now={now} after"
                    f" now={previous} (entry {i})"
                )
            previous = now
            self._check_selections(list(per_head), f"observe_future entry {i}")
        self.replacement.observe_future(accesses)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    # ------------------------------------------------------------------ internals

    def _admit(
        self,
        new: list[np.ndarray],
        protected: list[np.ndarray],
        n_protected: int,
        now: int,
        count: bool = True,
    ) -> None:
        """Insert the non-resident ``new[h]`` entries, evicting non-protected ones as needed.

        ``protected[h]`` may contain non-resident positions too (they are simply not
        candidates); ``n_protected`` counts its resident entries.
        """
        n_new = sum(m.size for m in new)
        free = self.capacity_entries - self.resident_entries
        if n_new > free:
            evictable = self.resident_entries - n_protected
            n_evict = min(n_new - free, evictable)
            if n_evict > 0:
                # Only here do we pay a full scan of the layer; the fast path above skips it.
                mask = self._resident.copy()
                for h, sel in enumerate(protected):
                    mask[h, sel] = False
                candidates = np.flatnonzero(mask)
                victims = np.asarray(self.replacement.victims(candidates, n_evict), dtype=np.int64)
                if victims.size != n_evict:
                    raise RuntimeError(
                        f"{type(self.replacement).__name__}.victims returned {victims.size}"
                        f" entries, expected {n_evict}"
                    )
                if self.check_inputs and (
                    not mask.reshape(-1)[victims].all() or np.unique(victims).size != n_evict
                ):
                    raise RuntimeError(
                        f"{type(self.replacement).__name__}.victims returned non-candidates"
                        " or duplicates"
                    )
                self._resident_flat[victims] = False
                self.replacement.on_evict(victims)
                self.resident_entries -= n_evict
            room = self.capacity_entries - self.resident_entries
            if room < n_new:
                new = self._keep_lowest(new, room)
                if count:
                    self.streamed += n_new - room
        rows = self._rows
        rep = self.replacement
        admitted = 0
        for h, pos in enumerate(new):
            if pos.size:
                rows[h][pos] = True
                rep.on_insert(h, pos, now)
                admitted += pos.size
        self.resident_entries += admitted
        if self.resident_entries > self.peak_resident_entries:
            self.peak_resident_entries = self.resident_entries

    def _keep_lowest(self, per_head: list[np.ndarray], keep: int) -> list[np.ndarray]:
        """The ``keep`` lowest positions across heads (ties: lowest head), split per head."""
        if keep <= 0:
            return [p[:0] for p in per_head]
        sizes = np.array([p.size for p in per_head])
        positions = np.concatenate(per_head)
        heads = np.repeat(np.arange(len(per_head)), sizes)
        chosen = np.lexsort((heads, positions))[:keep]
        kept = np.zeros(positions.size, dtype=bool)
        kept[chosen] = True
        bounds = np.cumsum(sizes)[:-1]
        return [p[k] for p, k in zip(per_head, np.split(kept, bounds), strict=True)]

    def _check_selections(self, per_head: list[np.ndarray], what: str) -> None:
        if len(per_head) != self.n_heads:
            raise ValueError(f"{what}: expected {self.n_heads} heads, got {len(per_head)}")
        for h, sel in enumerate(per_head):
            if sel.size and (sel[0] < 0 or sel[-1] >= self.max_positions):
                raise ValueError(
                    f"{what}[{h}]: positions must be in [0, {self.max_positions}),"
                    f" got {sel[0]}..{sel[-1]}"
                )
            if self.check_inputs and sel.size > 1 and not (np.diff(sel) > 0).all():
                raise ValueError(f"{what}[{h}]: positions must be sorted and unique, got {sel}")
