"""DynaKV's dual-head layout (arXiv 2511.07427, Technique 2, §4.2): pairs of co-retrieved
clusters share a pool of twice the largest cluster; the two grow toward each other from the
pool's ends, so appends land next to their cluster and move no data; a split's moved half goes
to another pool; optionally, appends of the hottest clusters collect in DRAM until a full flash
page of the cluster can be written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, SupportsInt

import numpy as np

from sim.kv.layouts.base import _UNPLACED, LAYOUTS, FlashLayout
from sim.kv.layouts.coretrieval import _usable_coretrieval, coretrieval_chain

__all__ = ["DualHeadLayout"]


@dataclass(eq=False)
class _Pool:
    """``cap`` slots from ``start``: the ``lo`` group grows up from ``start`` (next free slot
    ``lo_next``), the ``hi`` group down from ``start + cap - 1`` (next free slot ``hi_next``)."""

    start: int
    cap: int
    lo: int | None = None
    hi: int | None = None
    lo_next: int = 0
    hi_next: int = 0

    def __post_init__(self) -> None:
        self.lo_next, self.hi_next = self.start, self.start + self.cap - 1

    @property
    def free(self) -> int:
        return self.hi_next - self.lo_next + 1

    def vacate(self, side: str) -> None:
        """The group at ``side`` left: its extent is free again (old copies are garbage)."""
        if side == "lo":
            self.lo, self.lo_next = None, self.start
        else:
            self.hi, self.hi_next = None, self.start + self.cap - 1


@LAYOUTS.register("dual_head")
@dataclass(eq=False)
class DualHeadLayout(FlashLayout):
    """DynaKV's dual-head layout (arXiv 2511.07427, §4.2 "dual-head", Fig. 8 and 13) with its
    optional page-aligned write buffer.

    Prefill: groups are paired greedily by co-retrieval count (the pair with the largest
    count first, ties in :func:`coretrieval_chain` order; pairs with count 0 are not formed;
    unpaired groups stay alone). Without a usable co-retrieval matrix, consecutive groups of
    the ``cluster`` order are paired (1st with 2nd, 3rd with 4th, ...). Each pair (or lone
    group) gets a pool of ``max(2 * pool_entries, sizes of its pair)`` slots, ``pool_entries
    = ceil(largest prefill group * pool_slack)``; pools follow one another in the chain order
    of their first member. The group earlier in the chain is the pool's low head (positions
    ascending upward from the pool start), the other its high head (positions ascending
    downward from the pool end), so each group is contiguous in slot order, ascending or
    descending, and the two grow toward each other.

    Decode: an appended entry lands at its group's head (next to it; nothing moves). A group
    not seen before gets a home as below. When the pool is full (the heads meet), the
    appending group is *relocated*: all its entries are rewritten, in position order, to a
    new home, followed by the new entry; :meth:`due_writes` then returns the relocated slots
    plus the new one (the engine learns rewrites only there and from :meth:`relabel`).

    Split, ``relabel(positions, group)``: the moved positions leave their groups (the staying
    half keeps its head and its slots: no data moves, the moved entries leave free holes in
    its extent until it relocates, so the staying half stays contiguous in slot order among
    placed entries but its runs may break at the holes) and are rewritten, in position order,
    to a new home; the rewritten slots are returned. A group emptied by a relabel frees its
    head. Relabelling into a group that already has entries (never done by DynaKV, whose
    split halves get fresh ids) rewrites that group together with the newcomers.

    Home of a group of ``m`` entries: the first pool in slot order (excluding the one it
    leaves) with a vacant head and ``2 * m <= free slots`` (the newcomer takes at most half
    the free space: a lone group gets a partner, or an emptied pool is reused); else a new
    pool of ``max(2 * pool_entries, 2 * m)`` slots after the last one (it starts alone at the
    low head). The slot space is therefore unbounded (``bounded_slots = False``); every
    region's slots are distinct and ``slots`` stays a bijection onto the placed positions.
    Rewrites are modelled as writes only: a split's cluster is in DRAM (DynaKV splits loaded
    clusters), but a full-pool relocation would also need to read entries not in DRAM, which
    the engine does not charge (optimistic).

    ``groups=None`` at prefill: the sequence layout (slot = position), nothing buffered.

    Page-aligned write buffer (DynaKV's "page-aligned buffer"; off by default): the
    ``write_buffer_groups`` hottest prefill groups (largest co-retrieval row sum, ties by
    label; without a matrix the largest groups) keep their appends in DRAM until
    ``entries_per_page = max(1, page_bytes // entry_bytes)`` of them accumulated; then
    :meth:`due_writes` returns those slots (one page's worth: contiguous slots at the group's
    head, one page when the run is page-aligned, else straddling two) and
    :attr:`buffered_entries` counts the entries held. Other groups write each append at once.
    A relocation or relabel writes the buffered entries it moves with the other rewrites.
    ``entry_bytes`` and ``page_bytes`` are filled in by the engine (the simulated model's
    entry size and the device's page size); the buffer needs both.

    Parameters:
        n_positions (int): positions of the region (the trace's final context length).
        pool_slack (float, default 1.0): ``pool_entries`` = largest prefill group x this; 1.0
            is the paper's pool of twice the maximum cluster size.
        write_buffer_groups (int, default 0): hot groups whose appends are page-buffered in
            DRAM; 0 = no buffer.
        entry_bytes (int | None, default None): bytes per KV entry (set by the engine).
        page_bytes (int | None, default None): flash page size (set by the engine).
    """

    relocates: ClassVar[bool] = True
    bounded_slots: ClassVar[bool] = False

    pool_slack: float = 1.0
    write_buffer_groups: int = 0
    entry_bytes: int | None = None
    page_bytes: int | None = None
    _pools: list[_Pool] = field(init=False, repr=False, default_factory=list)
    _gid_of: np.ndarray = field(init=False, repr=False)
    _gid: dict = field(init=False, repr=False, default_factory=dict)  # label -> group id
    _home: list[tuple[int, str] | None] = field(init=False, repr=False, default_factory=list)
    _size: list[int] = field(init=False, repr=False, default_factory=list)
    _pool_entries: int = field(init=False, repr=False, default=1)
    _next_start: int = field(init=False, repr=False, default=0)
    _sequence: bool = field(init=False, repr=False, default=False)
    _hot: set = field(init=False, repr=False, default_factory=set)
    _buffers: dict = field(init=False, repr=False, default_factory=dict)  # gid -> positions
    _last: tuple | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        slack = self.pool_slack
        if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not slack > 0:
            raise ValueError(f"pool_slack must be a number > 0, got {slack!r}")
        for name in ("write_buffer_groups", "entry_bytes", "page_bytes"):
            value = getattr(self, name)
            if value is None and name != "write_buffer_groups":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.entry_bytes == 0 or self.page_bytes == 0:
            raise ValueError("entry_bytes and page_bytes must be > 0")
        self._gid_of = np.full(self.n_positions, _UNPLACED, dtype=np.int64)

    # ------------------------------------------------------------------ public API

    @property
    def entries_per_page(self) -> int:
        if self.entry_bytes is None or self.page_bytes is None:
            raise ValueError("the write buffer needs entry_bytes and page_bytes")
        return max(1, self.page_bytes // self.entry_bytes)

    @property
    def buffered_entries(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def buffered_positions(self) -> np.ndarray:
        if not self._buffers:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.fromiter((p for b in self._buffers.values() for p in b), np.int64))

    def max_buffered_entries(self, groups: np.ndarray | None) -> int:
        """A hot group holds at most ``entries_per_page - 1`` appends (the page-th is written
        with them), and there are at most ``write_buffer_groups`` hot groups, chosen among the
        prefill groups (none without groups: the sequence layout buffers nothing)."""
        if not self.write_buffer_groups or groups is None or not len(groups):
            return 0
        hot = min(self.write_buffer_groups, len(np.unique(groups)))
        return hot * (self.entries_per_page - 1)

    def group_slots(self, label: object) -> np.ndarray:
        """Slots of ``label``'s entries in position order (empty if it has none)."""
        g = self._gid.get(label)
        if g is None:
            return np.zeros(0, dtype=np.int64)
        return self._slot_of[np.flatnonzero(self._gid_of[: self._n_placed] == g)]

    def due_writes(self, slot: int) -> np.ndarray:
        """Slots to write after the last :meth:`place_append` (call once per append): the
        relocated group's slots plus the new one after a full-pool relocation; nothing (entry
        buffered) or a page's worth of slots for a hot group; else the new slot."""
        last, self._last = self._last, None
        if last is None:
            return np.array([slot], dtype=np.int64)
        gid, position, rewritten = last
        if rewritten is not None:
            return np.concatenate([rewritten, [slot]]).astype(np.int64)
        if gid in self._hot:
            buffer = self._buffers.setdefault(gid, [])
            buffer.append(position)
            if len(buffer) < self.entries_per_page:
                return np.zeros(0, dtype=np.int64)
            self._buffers[gid] = []
            return self._slot_of[np.array(buffer, dtype=np.int64)]
        return np.array([slot], dtype=np.int64)

    def relabel(self, positions: np.ndarray, group: int) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        self.slots(positions)  # validates that they are placed
        if self._sequence or positions.size == 0:
            return np.zeros(0, dtype=np.int64)
        target = self._group_id(group)
        moved = np.unique(positions[self._gid_of[positions] != target])
        if moved.size == 0:
            return np.zeros(0, dtype=np.int64)
        self._unbuffer(moved)
        for source in np.unique(self._gid_of[moved]).tolist():
            self._size[source] -= int((self._gid_of[moved] == source).sum())
            if self._size[source] == 0:
                self._leave(source)
        self._gid_of[moved] = target
        if target < len(self._home) and self._home[target] is not None:
            # joining a group with entries: rewrite it together with the newcomers
            members = np.flatnonzero(self._gid_of[: self._n_placed] == target)
            self._buffers.pop(target, None)
            left = self._leave(target)
        else:
            members, left = moved, None
        self._size[target] = len(members)
        self._settle(target, members, extra=0, exclude=left)
        return self._slot_of[members]

    # ------------------------------------------------------------------ placement

    def _prefill_slots(self, prompt_len: int, groups: np.ndarray | None) -> np.ndarray:
        if self.write_buffer_groups:
            self.entries_per_page  # noqa: B018 -- fail early without the sizes
        if groups is None:
            self._sequence = True
            return np.arange(prompt_len, dtype=np.int64)
        slot_of = np.empty(prompt_len, dtype=np.int64)
        if prompt_len == 0:
            return slot_of
        labels, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        self._pool_entries = max(1, math.ceil(int(sizes.max()) * float(self.pool_slack)))
        for label in labels.tolist():
            self._group_id(label)
        gids = np.array([self._gid[label] for label in labels.tolist()], dtype=np.int64)
        self._gid_of[:prompt_len] = gids[inverse]
        for g, size in zip(gids.tolist(), sizes.tolist(), strict=True):
            self._size[g] = size
        chain = coretrieval_chain(groups, self.coretrieval)
        rank = {label: i for i, label in enumerate(chain.tolist())}
        counts = _usable_coretrieval(groups, self.coretrieval)
        pairs = self._pairs(labels, rank, counts)
        members_of = np.split(np.argsort(inverse, kind="stable"), np.cumsum(sizes)[:-1])
        size_of = dict(zip(labels.tolist(), sizes.tolist(), strict=True))
        index_of = {label: i for i, label in enumerate(labels.tolist())}
        for pair in sorted(pairs, key=lambda p: rank[p[0]]):
            cap = max(2 * self._pool_entries, sum(size_of[label] for label in pair))
            self._new_pool(cap)
            for side, label in zip(("lo", "hi"), pair, strict=False):
                g = self._gid[label]
                members = members_of[index_of[label]]
                slot_of[members] = self._occupy(len(self._pools) - 1, side, g, len(members))
        if self.write_buffer_groups:
            self._hot = self._hot_groups(labels, sizes, counts)
        return slot_of

    def _append_slot(self, position: int, group: int | None) -> int:
        if self._sequence:
            self._last = None
            return position
        g = self._group_id(group)
        self._gid_of[position] = g
        self._size[g] += 1
        rewritten = None
        home = self._home[g]
        if home is None:
            self._settle(g, np.zeros(0, dtype=np.int64), extra=1)
        elif self._pools[home[0]].free == 0:
            members = np.flatnonzero(self._gid_of[:position] == g)
            self._buffers.pop(g, None)
            left = self._leave(g)
            self._settle(g, members, extra=1, exclude=left)
            rewritten = self._slot_of[members]
        home = self._home[g]
        assert home is not None  # g had a home or one of the branches above settled it
        pool_index, side = home
        # _occupy(pool_index, side, g, 1) with Python ints (once per decode token and head)
        pool = self._pools[pool_index]
        if pool.free < 1:
            raise AssertionError("pool overflow")  # never: the branches above make room
        if side == "lo":
            pool.lo = g
            slot = pool.lo_next
            pool.lo_next += 1
        else:
            pool.hi = g
            slot = pool.hi_next
            pool.hi_next -= 1
        self._last = (g, position, rewritten)
        return int(slot)

    # ------------------------------------------------------------------ helpers

    def _group_id(self, label: SupportsInt | None) -> int:
        label = None if label is None else int(label)
        g = self._gid.get(label)
        if g is None:
            g = self._gid[label] = len(self._home)
            self._home.append(None)
            self._size.append(0)
        return g

    def _pairs(
        self, labels: np.ndarray, rank: dict, counts: np.ndarray | None
    ) -> list[tuple[int, ...]]:
        """Pools of the prefill groups: tuples (low head, high head) or (lone,)."""
        order = sorted(labels.tolist(), key=rank.__getitem__)
        if counts is None:
            return [tuple(order[i : i + 2]) for i in range(0, len(order), 2)]
        n = len(labels)
        i, j = np.triu_indices(n, 1)
        c = counts[i, j]
        keep = c > 0
        i, j, c = i[keep], j[keep], c[keep]
        rank_of = np.array([rank[label] for label in labels.tolist()], dtype=np.int64)
        ri, rj = rank_of[i], rank_of[j]
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        paired: set = set()
        pools: list[tuple[int, ...]] = []
        by_count = np.lexsort((hi, lo, -c))
        for lo_k, hi_k in zip(lo[by_count].tolist(), hi[by_count].tolist(), strict=True):
            a, b = order[lo_k], order[hi_k]
            if a not in paired and b not in paired:
                paired.update((a, b))
                pools.append((a, b))
                if len(paired) + 1 >= n:
                    break  # at most one label left: no pair can form
        pools.extend((label,) for label in order if label not in paired)
        return pools

    def _hot_groups(self, labels: np.ndarray, sizes: np.ndarray, counts: np.ndarray | None):
        heat = sizes.astype(np.float64) if counts is None else counts.sum(axis=1)
        order = np.lexsort((labels, -heat))[: self.write_buffer_groups]
        return {self._gid[label] for label in labels[order].tolist()}

    def _new_pool(self, cap: int) -> _Pool:
        pool = _Pool(self._next_start, int(cap))
        self._pools.append(pool)
        self._next_start += pool.cap
        return pool

    def _occupy(self, pool_index: int, side: str, g: int, count: int) -> np.ndarray:
        """Take ``count`` slots at ``side`` of a pool for group ``g`` (in growth order)."""
        pool = self._pools[pool_index]
        if count > pool.free:
            raise AssertionError("pool overflow")  # never: callers check the room
        if side == "lo":
            pool.lo = g
            slots = pool.lo_next + np.arange(count, dtype=np.int64)
            pool.lo_next += count
        else:
            pool.hi = g
            slots = pool.hi_next - np.arange(count, dtype=np.int64)
            pool.hi_next -= count
        self._home[g] = (pool_index, side)
        return slots

    def _leave(self, g: int) -> int | None:
        """Group ``g`` leaves its pool's head; returns that pool's index (``None``: no home)."""
        home = self._home[g]
        if home is None:
            return None
        pool_index, side = home
        self._pools[pool_index].vacate(side)
        self._home[g] = None
        return pool_index

    def _settle(self, g: int, members: np.ndarray, extra: int, exclude: int | None = None) -> None:
        """Give group ``g`` (without a home) a home with room for ``len(members) + extra``
        entries, not in pool ``exclude``, and place ``members`` (positions ascending) there."""
        need = len(members) + extra
        for index, pool in enumerate(self._pools):
            vacant = pool.lo is None or pool.hi is None
            if vacant and index != exclude and 2 * need <= pool.free:
                break
        else:
            self._new_pool(max(2 * self._pool_entries, 2 * need))
            index = len(self._pools) - 1
        pool = self._pools[index]
        side = "lo" if pool.lo is None else "hi"
        self._home[g] = (index, side)
        if len(members):
            self._slot_of[members] = self._occupy(index, side, g, len(members))
        elif side == "lo":
            pool.lo = g
        else:
            pool.hi = g

    def _unbuffer(self, positions: np.ndarray) -> None:
        """Positions about to be rewritten leave the write buffers (written with the move)."""
        if not self.buffered_entries:
            return
        leaving = set(positions.tolist())
        for g, buffer in self._buffers.items():
            self._buffers[g] = [p for p in buffer if p not in leaving]
