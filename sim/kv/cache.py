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
    "ClusterAlignedReplacement",
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
    3. ``on_insert(h, admitted, now)`` for the misses that become resident (through
       :meth:`on_insert_flat`, all heads at once, which built-in policies implement directly).

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
    #: Capacity (entries) of the :class:`LayerCache` this policy serves; set by the cache
    #: before :meth:`bind` (``None`` when the policy is used on its own).
    capacity_entries: int | None = None

    def bind(self, n_heads: int, max_positions: int) -> None:
        """Allocate per-entry state for a layer of ``n_heads`` x ``max_positions`` entries."""
        self.n_heads = n_heads
        self.max_positions = max_positions

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:  # noqa: B027
        """``positions`` (sorted, unique) of ``head`` are used at time ``now``."""

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:  # noqa: B027
        """``positions`` (sorted, unique) of ``head`` became resident at time ``now``."""

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        """:meth:`on_insert` for entries of any heads by flat index (int64, ascending), as the
        cache calls it; the default splits them per head. Override for speed only."""
        m = self.max_positions
        bounds = np.searchsorted(flat_idx, np.arange(1, self.n_heads) * m)
        for h, part in enumerate(np.split(flat_idx, bounds)):
            if part.size:
                self.on_insert(h, part - h * m, now)

    def on_evict(self, flat_idx: np.ndarray) -> None:  # noqa: B027
        """The entries at ``flat_idx`` were evicted (no longer resident)."""

    def assign_groups(  # noqa: B027
        self, head: int, positions: np.ndarray, groups: np.ndarray, now: int
    ) -> None:
        """From ``now`` on, ``positions`` of ``head`` belong to ``groups`` (one label each):
        the prompt's clusters, a decode token joining one, a split moving members."""

    def assign_group(self, head: int, position: int, group: int, now: int) -> None:
        """:meth:`assign_groups` for one position (the engine's append); override for speed."""
        self.assign_groups(
            head, np.array([position], dtype=np.int64), np.array([group], dtype=np.int64), now
        )

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

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._stamp_flat[flat_idx] = now


@REPLACEMENTS.register("fifo")
@dataclass(eq=False)
class FIFOReplacement(_OldestStampReplacement):
    """First in, first out: evicts the entries inserted earliest (accesses do not refresh them);
    ties broken by lowest flat index."""

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self._stamp_rows[head][positions] = now

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        self._stamp_flat[flat_idx] = now


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


@REPLACEMENTS.register("cluster_aligned")
@dataclass(eq=False)
class ClusterAlignedReplacement(ReplacementPolicy):
    """Cluster-aligned replacement, DynaKV's cache policy (arXiv 2511.07427, §4.3 "memory-
    efficient cache", Fig. 14b): victims are whole clusters, large clusters before small ones
    (a large cluster reads efficiently from flash anyway and is likely to split; small ones are
    costly to fetch), and recently updated clusters are kept in a reserved region. The paper
    leaves the details open; they are the knobs below.

    Order of eviction among the candidates (resident, not selected now):

    1. unprotected entries before protected ones (the reserved region, below);
    2. larger groups first: a group's size is its number of members in the head (resident or
       not; an entry without a group is a group of one); with ``size_classes="log2"`` sizes
       are compared by ``floor(log2(size))`` so that recency decides among similar sizes;
    3. then the group whose latest use (access or insertion of any member) is oldest;
    4. then the group holding the lowest flat index, whole groups at a time; only the last
       group may be split, its least recently used entries (then lowest flat index) first.

    Without any :meth:`assign_groups` call every entry is its own group and the order is
    exactly LRU's (least recent use, then lowest flat index).

    Reserved region: a group is *recently updated* if an entry joined or left it (appended
    decode token, split) within the last ``recent_steps`` ticks of this policy's clock, which
    advances once per distinct ``now`` it sees; the engine gives every layer's cache one
    ``now`` per decode step, so this is decode steps whatever the layer count. Group
    assignments at ``now < 0`` (the prompt's clusters) are not updates. Recently updated
    groups, newest update first (ties: first-labelled group first), are protected whole as
    long as their candidate entries total at most ``reserved_fraction`` of the cache capacity;
    the first that does not fit and all older ones are ordinary groups. Protected entries are
    evicted only when nothing else is left.

    Parameters (defaults): ``recent_steps`` = 16 (DynaKV Table 2 measures re-retrieval of
    just-updated clusters within 1..16 steps); ``reserved_fraction`` = 0.25 of the capacity
    (0 disables the region); ``size_classes`` = ``"exact"`` (or ``"log2"``).

    Cost: ``on_access`` adds one gather and one scatter per head to LRU's; ``victims`` is
    O(C) partitions over the C candidates plus a sort of the entries tied at the boundary and
    of the recently updated groups' entries.
    """

    recent_steps: int = 16
    reserved_fraction: float = 0.25
    size_classes: str = "exact"

    uses_groups: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.recent_steps, bool) or not isinstance(self.recent_steps, int) \
                or self.recent_steps < 0:
            raise ValueError(f"recent_steps must be an int >= 0, got {self.recent_steps!r}")
        if not 0.0 <= float(self.reserved_fraction) <= 1.0:
            raise ValueError(
                f"reserved_fraction must be in [0, 1], got {self.reserved_fraction!r}"
            )
        if self.size_classes not in ("exact", "log2"):
            raise ValueError(f"size_classes must be 'exact' or 'log2', got {self.size_classes!r}")

    _NEVER: ClassVar[int] = -(1 << 62)
    #: Key layout of a group: (protected, max_positions - size class, latest use), packed in
    #: one int64 as protected << 62 | (max_positions - size) << 40 | latest use.
    _USE_BITS: ClassVar[int] = 40
    _PROTECTED: ClassVar[int] = 1 << 62

    def bind(self, n_heads: int, max_positions: int) -> None:
        super().bind(n_heads, max_positions)
        if max_positions >= 1 << (62 - self._USE_BITS):
            raise ValueError(f"cluster_aligned: max_positions {max_positions} too large")
        self._stamp = np.zeros((n_heads, max_positions), dtype=np.int64)
        self._stamp_flat = self._stamp.reshape(-1)
        self._stamp_rows = list(self._stamp)
        # Internal group id per entry; 0 = no group (slot 0 of the group arrays is a dummy,
        # so hot paths can scatter through it without masking).
        self._gid = np.zeros((n_heads, max_positions), dtype=np.int64)
        self._gid_flat = self._gid.reshape(-1)
        self._gid_rows = list(self._gid)
        self._gid_of: dict[tuple[int, int], int] = {}  # (head, label) -> internal id
        self._n_groups = 1
        self._gsize = np.zeros(64, dtype=np.int64)  # members per group
        self._glast = np.zeros(64, dtype=np.int64)  # latest use of any member
        self._gupd = np.full(64, self._NEVER, dtype=np.int64)  # tick of the latest update
        self._gres = np.zeros(64, dtype=np.int64)  # resident members (kept once groups exist)
        self._res = np.zeros((n_heads, max_positions), dtype=bool)
        self._res_flat = self._res.reshape(-1)
        self._res_rows = list(self._res)
        self._has_groups = False
        self._now = self._NEVER
        self._tick = 0

    # -- clock and groups ----------------------------------------------------------------------

    def _clock(self, now: int) -> None:
        if now > self._now:
            self._now = now
            self._tick += 1

    def _gid_for(self, head: int, label: int) -> int:
        key = (head, label)
        gid = self._gid_of.get(key)
        if gid is not None:
            return gid
        gid = self._n_groups
        if gid == self._gsize.size:
            grow = gid
            self._gsize = np.concatenate((self._gsize, np.zeros(grow, dtype=np.int64)))
            self._glast = np.concatenate((self._glast, np.zeros(grow, dtype=np.int64)))
            self._gupd = np.concatenate((self._gupd, np.full(grow, self._NEVER, np.int64)))
            self._gres = np.concatenate((self._gres, np.zeros(grow, dtype=np.int64)))
        self._n_groups += 1
        self._gid_of[key] = gid
        return gid

    def _start_groups(self) -> None:
        self._has_groups = True
        self._gres[:] = np.bincount(self._gid_flat[self._res_flat], minlength=self._gres.size)

    def assign_groups(
        self, head: int, positions: np.ndarray, groups: np.ndarray, now: int
    ) -> None:
        if positions.size == 1:  # the engine's append: one token, scalar bookkeeping
            self.assign_group(head, int(positions[0]), int(groups[0]), now)
            return
        self._clock(now)
        if not positions.size:
            return
        labels, inverse = np.unique(groups, return_inverse=True)
        ids = np.array([self._gid_for(head, label) for label in labels.tolist()], np.int64)
        new = ids[inverse.reshape(-1)]
        row = self._gid_rows[head]
        old = row[positions]
        changed = old != new
        if not changed.all():
            positions, old, new = positions[changed], old[changed], new[changed]
            if not positions.size:
                return
        if not self._has_groups:
            self._start_groups()
        n = self._gsize.size
        self._gsize -= np.bincount(old, minlength=n)
        self._gsize += np.bincount(new, minlength=n)
        resident = self._res_rows[head][positions]
        if resident.any():
            self._gres -= np.bincount(old[resident], minlength=n)
            self._gres += np.bincount(new[resident], minlength=n)
        row[positions] = new
        # A group's latest use covers the uses of the members it gains.
        np.maximum.at(self._glast, new, self._stamp_rows[head][positions])
        if now >= 0:
            self._gupd[new] = self._tick
            self._gupd[old[old > 0]] = self._tick

    def assign_group(self, head: int, position: int, group: int, now: int) -> None:
        self._clock(now)
        p = position
        new = self._gid_for(head, group)
        row = self._gid_rows[head]
        old = int(row[p])
        if old == new:
            return
        if not self._has_groups:
            self._start_groups()
        self._gsize[old] -= 1  # slot 0 (no group) absorbs the ungrouped
        self._gsize[new] += 1
        if self._res_rows[head][p]:
            self._gres[old] -= 1
            self._gres[new] += 1
        row[p] = new
        stamp = self._stamp_rows[head][p]
        if stamp > self._glast[new]:
            self._glast[new] = stamp
        if now >= 0:
            self._gupd[new] = self._tick
            if old:
                self._gupd[old] = self._tick

    # -- hooks ---------------------------------------------------------------------------------

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:
        if now != self._now:
            self._clock(now)
        self._stamp_rows[head][positions] = now
        if self._has_groups:
            self._glast[self._gid_rows[head][positions]] = now

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:
        self.on_access(head, positions, now)
        self._res_rows[head][positions] = True
        if self._has_groups:
            gid = self._gid_rows[head][positions]
            if gid.size == 1:
                self._gres[gid[0]] += 1
            else:
                np.add.at(self._gres, gid, 1)

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        if now != self._now:
            self._clock(now)
        self._stamp_flat[flat_idx] = now
        self._res_flat[flat_idx] = True
        if self._has_groups:
            gid = self._gid_flat[flat_idx]
            self._glast[gid] = now
            if gid.size == 1:
                self._gres[gid[0]] += 1
            else:
                np.add.at(self._gres, gid, 1)

    def on_evict(self, flat_idx: np.ndarray) -> None:
        self._res_flat[flat_idx] = False
        if self._has_groups:
            np.subtract.at(self._gres, self._gid_flat[flat_idx], 1)

    # -- victims -------------------------------------------------------------------------------

    def _protected_groups(self, n_groups: int) -> list[int] | None:
        """Ids of the groups in the reserved region now; ``None`` if the region is empty.
        The region is measured in resident entries (selected now or not)."""
        capacity = self.capacity_entries
        if capacity is None or self.recent_steps == 0:
            return None
        budget = int(self.reserved_fraction * capacity)
        if budget <= 0:
            return None
        updated = self._gupd[:n_groups]
        # slot 0 (no group) is never updated
        ids = (updated > self._tick - self.recent_steps).nonzero()[0]
        if not ids.size:
            return None
        # A handful of groups: Python ints. Newest update first, then first labelled; the
        # first ones whose resident entries total at most the budget (groups with none
        # change neither the total nor the victims, having no candidates).
        protected = []
        total = 0
        order = zip((-updated[ids]).tolist(), ids.tolist(), self._gres[ids].tolist(), strict=True)
        for _, group, resident in sorted(order):
            total += resident
            if total > budget:
                break
            protected.append(group)
        return protected or None

    def _size_class(self, size: np.ndarray | int) -> np.ndarray:
        if self.size_classes == "log2":
            return np.frexp(np.asarray(size, dtype=np.float64))[1].astype(np.int64)
        return np.asarray(size, dtype=np.int64)

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        if n >= candidates.size:
            return candidates
        if not self._has_groups:
            # Every entry its own group: exactly LRU (one composite key, all distinct).
            keys = self._stamp_flat[candidates] * self._stamp_flat.size + candidates
            return candidates[np.argpartition(keys, n - 1)[:n]]
        gid = self._gid_flat[candidates]
        n_groups = self._n_groups
        # Stage 1: one packed key per group, gathered per candidate (members share it).
        use_mask = (1 << self._USE_BITS) - 1
        m = self.max_positions
        sizes = self._gsize[:n_groups]
        if self.size_classes != "exact":
            sizes = self._size_class(sizes)
        group_key = ((m - sizes) << self._USE_BITS) + (self._glast[:n_groups] & use_mask)
        protected = self._protected_groups(n_groups)
        if protected is not None:
            for group in protected:  # a handful: scalar updates beat an index array
                group_key[group] += self._PROTECTED
        key = group_key[gid]
        # An entry without a group (gid 0, counted resident in _gres[0]) is a group of one:
        # its own latest use.
        if self._gres[0] and not gid.all():
            ungrouped = np.flatnonzero(gid == 0)
            single = int(m - self._size_class(1)) << self._USE_BITS
            key[ungrouped] = single + (self._stamp_flat[candidates[ungrouped]] & use_mask)
        tied = (key == key.min()).nonzero()[0]
        if tied.size >= n:  # the usual case: the n-th smallest key is the smallest
            below = tied[:0]
        else:
            threshold = np.partition(key, n - 1)[n - 1]
            below = (key < threshold).nonzero()[0]
            tied = (key == threshold).nonzero()[0]
        need = n - below.size
        if need == tied.size:
            return candidates[np.concatenate((below, tied))]
        # Stage 2, among the tied entries: whole groups by lowest flat index, then the
        # boundary group's least recently used entries (then lowest flat index).
        tied_gid = gid[tied]
        first_gid = tied_gid[0]
        if first_gid and (tied_gid == first_gid).all():  # one group: the usual case
            whole, boundary = tied[:0], tied
        else:
            code = np.where(tied_gid > 0, tied_gid, n_groups + candidates[tied])
            _, first, inverse, counts = np.unique(
                code, return_index=True, return_inverse=True, return_counts=True
            )
            order = np.argsort(first)  # tied is ascending: first = the group's lowest index
            cum = np.cumsum(counts[order])
            k = int(np.searchsorted(cum, need, side="left"))  # the boundary group's rank
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            entry_rank = rank[inverse.reshape(-1)]
            whole = tied[entry_rank < k]
            boundary = tied[entry_rank == k]
        rest = need - whole.size
        if rest < boundary.size:
            b_stamp = self._stamp_flat[candidates[boundary]]
            # boundary is ascending, so a stable sort breaks ties by lowest flat index
            boundary = boundary[b_stamp.argsort(kind="stable")[:rest]]
        if not below.size and not whole.size:
            return candidates[boundary]
        return candidates[np.concatenate((below, whole, boundary))]



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
        replacement.capacity_entries = int(capacity_entries)
        replacement.bind(n_heads, max_positions)
        replacement._kvsim_bound = True  # type: ignore[attr-defined]
        self.n_heads = n_heads
        self.max_positions = max_positions
        self.capacity_entries = int(capacity_entries)
        self.replacement = replacement
        self.check_inputs = check_inputs
        self._resident = np.zeros((n_heads, max_positions), dtype=bool)
        self._resident_flat = self._resident.reshape(-1)
        # Row views made once: 1-D indexing is ~2x cheaper than resident[h, positions].
        self._rows = list(self._resident)
        # The resident entries' flat indices, ascending: the eviction candidates come from
        # here (O(resident)) rather than from a scan of the whole layer (O(heads x positions)).
        self._resident_idx = np.zeros(0, dtype=np.int64)
        # Scratch marks of the protected entries (all False between calls).
        self._mark = np.zeros((n_heads, max_positions), dtype=bool)
        self._mark_flat = self._mark.reshape(-1)
        self._mark_rows = list(self._mark)
        self._offsets = [h * max_positions for h in range(n_heads)]
        self._head_offsets = np.arange(n_heads, dtype=np.int64) * max_positions
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
        index: list[np.ndarray] = []
        n_selected = 0
        for h, sel in enumerate(selections):
            # numpy indexes with intp ~3x faster than with int32 (the engine's selections):
            # convert once, index with the copy (the misses keep the caller's dtype).
            idx = sel if sel.dtype == np.intp else sel.astype(np.intp)
            index.append(idx)
            misses.append(sel[~rows[h][idx]])
            n_selected += sel.size
            rep.on_access(h, idx, now)
        n_miss = sum(m.size for m in misses)
        n_hit = n_selected - n_miss
        self.hits += n_hit
        self.misses += n_miss
        if n_miss:
            # Hits are the protected entries: they are in use now and must not be evicted.
            self._admit(misses, protected=index, n_protected=n_hit, now=now)
        return misses

    def insert(self, head_positions: list[np.ndarray], now: int) -> None:
        """Make just-computed entries (the new decode token's) resident.

        ``head_positions[h]``: sorted unique positions for head ``h`` (usually one). Positions
        already resident are only touched. Evicts by the replacement policy if needed; resident
        afterwards unless the capacity is 0 (or smaller than the number inserted, in which case
        the lowest positions are kept). Does not change ``hits``/``misses``/``streamed``.
        """
        first = head_positions[0] if head_positions else None
        if (
            len(head_positions) == self.n_heads
            and isinstance(first, np.ndarray)
            and first.shape == (1,)
            and all(pos is first for pos in head_positions)
            and 0 <= first[0] < self.max_positions
        ):
            # The engine's append: the same new position in every head (one gather, and the
            # flat indices computed once).
            flat = self._head_offsets + int(first[0])
            if not self._resident_flat[flat].any():
                self._admit(head_positions, head_positions, 0, now, count=False, flat=flat)
                return
        self._check_selections(head_positions, "head_positions")
        rows = self._rows
        rep = self.replacement
        new: list[np.ndarray] = []
        n_old = 0
        for h, pos in enumerate(head_positions):
            is_res = rows[h][pos]
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
        start = head * self.max_positions
        lo, hi = np.searchsorted(self._resident_idx, (start, start + self.max_positions))
        return self._resident_idx[lo:hi] - start

    def assign_groups(
        self, head: int, positions: np.ndarray, groups: np.ndarray | int, now: int
    ) -> None:
        """Forward a group change of ``head``'s ``positions`` to the replacement policy."""
        if (
            type(positions) is np.ndarray
            and positions.size == 1
            and positions.dtype.kind in "iu"
            and isinstance(groups, (int, np.integer))
        ):  # the engine's append: one position, one label
            self.replacement.assign_group(head, int(positions.flat[0]), int(groups), now)
            return
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        groups = np.asarray(groups, dtype=np.int64)
        if groups.shape != positions.shape:
            groups = np.full(positions.shape, groups, dtype=np.int64)  # one label for all
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
        flat: np.ndarray | None = None,
    ) -> None:
        """Insert the non-resident ``new[h]`` entries, evicting non-protected ones as needed.

        ``protected[h]`` may contain non-resident positions too (they are simply not
        candidates); ``n_protected`` counts its resident entries. ``flat``: the flat indices
        of ``new`` (ascending), if the caller has them.
        """
        n_new = sum(m.size for m in new)
        free = self.capacity_entries - self.resident_entries
        resident_idx = self._resident_idx
        if n_new > free:
            evictable = self.resident_entries - n_protected
            n_evict = min(n_new - free, evictable)
            if n_evict > 0:
                if n_protected:
                    # The candidates: resident entries not protected (marked, then unmarked).
                    marks = self._mark_rows
                    for h, sel in enumerate(protected):
                        marks[h][sel] = True
                    candidates = resident_idx[~self._mark_flat[resident_idx]]
                    for h, sel in enumerate(protected):
                        marks[h][sel] = False
                else:
                    candidates = resident_idx.copy()  # the policy may keep what it is given
                victims = np.asarray(self.replacement.victims(candidates, n_evict), dtype=np.int64)
                if victims.size != n_evict:
                    raise RuntimeError(
                        f"{type(self.replacement).__name__}.victims returned {victims.size}"
                        f" entries, expected {n_evict}"
                    )
                if self.check_inputs and (
                    not np.isin(victims, candidates).all() or np.unique(victims).size != n_evict
                ):
                    raise RuntimeError(
                        f"{type(self.replacement).__name__}.victims returned non-candidates"
                        " or duplicates"
                    )
                self._resident_flat[victims] = False
                self.replacement.on_evict(victims)
                self.resident_entries -= n_evict
                resident_idx = resident_idx[self._resident_flat[resident_idx]]
            room = self.capacity_entries - self.resident_entries
            if room < n_new:
                new = self._keep_lowest(new, room)
                flat = None
                if count:
                    self.streamed += n_new - room
        if flat is None:
            offsets = self._offsets
            added = [pos.astype(np.int64) + offsets[h] for h, pos in enumerate(new) if pos.size]
            # Heads ascending, positions ascending within one: flat indices ascending.
            flat = np.concatenate(added) if added else None
        if flat is not None and flat.size:
            self._resident_flat[flat] = True
            self.replacement.on_insert_flat(flat, now)
            self.resident_entries += flat.size
            resident_idx = np.concatenate((resident_idx, flat))
            # Two sorted runs: the stable sort (timsort for int64) merges them in linear time.
            resident_idx.sort(kind="stable")
        self._resident_idx = resident_idx
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
