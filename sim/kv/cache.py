"""DRAM cache of one layer's KV entries (all its KV heads).

The cache owns capacity and accounting; a replacement policy
(:class:`~sim.kv.replacement.base.ReplacementPolicy`, members in :mod:`sim.kv.replacement`) only
chooses victims (the split of cachetools' ``Cache`` / ``LRUCache.popitem`` and libCacheSim's
``to_evict``). Capacity is counted in *entries* (one token position of one KV head; all entries
of a layer have the same byte size, so bytes are ``entries * entry_bytes`` outside this module).

State is kept in ``(n_heads, n_positions)`` numpy arrays and every call is vectorised: the
engine calls :meth:`LayerCache.access` once per (decode step, layer), about 250K times per run.
The heads' selections are handled together as *flat indices* ``head * n_positions + position``
(a handful of numpy calls per access whatever the number of heads); the eviction path looks at
the resident entries only (``O(resident)``).

``now`` is an integer logical clock supplied by the caller (the engine passes
``step * n_layers + layer``); it only orders events, it is not simulated time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sim.kv.replacement.base import ReplacementPolicy

__all__ = ["LayerCache"]


class LayerCache:
    """DRAM cache of one layer's KV entries, shared by its ``n_heads`` KV heads.

    Parameters
    ----------
    n_heads, n_positions:
        Layer shape; positions are ``0 <= p < n_positions``.
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
        n_positions: int,
        capacity_entries: int,
        replacement: ReplacementPolicy,
        *,
        check_inputs: bool = False,
    ) -> None:
        if n_heads <= 0:
            raise ValueError(f"n_heads must be > 0, got {n_heads}")
        if n_positions <= 0:
            raise ValueError(f"n_positions must be > 0, got {n_positions}")
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
        replacement.bind(n_heads, n_positions)
        replacement._kvsim_bound = True  # type: ignore[attr-defined]
        self.n_heads = n_heads
        self.n_positions = n_positions
        self.capacity_entries = int(capacity_entries)
        self.replacement = replacement
        self.check_inputs = check_inputs
        self._resident = np.zeros((n_heads, n_positions), dtype=bool)
        self._resident_flat = self._resident.reshape(-1)
        # The resident entries' flat indices, ascending: the eviction candidates come from
        # here (O(resident)) rather than from a scan of the whole layer (O(heads x positions)).
        self._resident_idx = np.zeros(0, dtype=np.int64)
        # Scratch marks of the protected entries (all False between calls).
        self._mark_flat = np.zeros(n_heads * n_positions, dtype=bool)
        self._offsets = [h * n_positions for h in range(n_heads)]
        self._head_offsets = np.arange(n_heads, dtype=np.int64) * n_positions
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
        positions that were not resident (the engine reads all of them from flash), in the
        dtype of the head's selection.
        """
        missed = self.access_flat(selections, now)
        bounds = np.searchsorted(missed, self._head_offsets[1:])
        return [
            (part - offset).astype(sel.dtype, copy=False)
            for part, offset, sel in zip(
                np.split(missed, bounds), self._offsets, selections, strict=True
            )
        ]

    def access_flat(self, selections: list[np.ndarray], now: int) -> np.ndarray:
        """:meth:`access`, with the misses of all heads returned at once as flat indices
        (``head * n_positions + position``, int64, ascending): what the engine uses, without
        one array per head."""
        flat = self._flat(selections, "selections")
        missed = flat[~self._resident_flat[flat]]
        self.replacement.on_access_flat(flat, now)
        n_miss = missed.size
        n_hit = flat.size - n_miss
        self.hits += n_hit
        self.misses += n_miss
        if n_miss:
            # Hits are the protected entries: they are in use now and must not be evicted.
            self._admit(missed, protected=flat, n_protected=n_hit, now=now)
        return missed

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
            and 0 <= first[0] < self.n_positions
        ):
            # The engine's append: the same new position in every head (the flat indices
            # computed at once).
            flat = self._head_offsets + int(first[0])
        else:
            flat = self._flat(head_positions, "head_positions")
        if not flat.size:
            return
        is_res = self._resident_flat[flat]
        if not is_res.any():
            self._admit(flat, protected=flat, n_protected=0, now=now, count=False)
            return
        old = flat[is_res]
        heads = old // self.n_positions
        for h in np.unique(heads).tolist():  # touched per head, as on_access is called
            self.replacement.on_access(h, old[heads == h] - self._offsets[h], now)
        fresh = flat[~is_res]
        if fresh.size:
            self._admit(fresh, protected=flat, n_protected=old.size, now=now, count=False)

    def resident_flat(self) -> np.ndarray:
        """Flat indices (``head * n_positions + position``, int64, ascending) of every resident
        entry: a copy."""
        return self._resident_idx.copy()

    def resident(self, head: int) -> np.ndarray:
        """Sorted positions of ``head`` currently resident (for tests and invariants)."""
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head must be in [0, {self.n_heads}), got {head}")
        start = head * self.n_positions
        lo, hi = np.searchsorted(self._resident_idx, (start, start + self.n_positions))
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
        ):  # one position, one label
            self.replacement.assign_group(head, int(positions.flat[0]), int(groups), now)
            return
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        groups = np.asarray(groups, dtype=np.int64)
        if groups.shape != positions.shape:
            groups = np.full(positions.shape, groups, dtype=np.int64)  # one label for all
        self.replacement.assign_groups(head, positions, groups, now)

    def assign_group(self, head: int, position: int, group: int, now: int) -> None:
        """:meth:`assign_groups` of one position (the engine's append), with Python ints."""
        self.replacement.assign_group(head, position, group, now)

    def assign_group_heads(self, position: int, groups: Sequence[int], now: int) -> None:
        """:meth:`assign_group` of ``position`` in every head ``h`` to ``groups[h]``, heads in
        order (the engine's append: one call per layer instead of one per head)."""
        self.replacement.assign_group_heads(position, groups, now)

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

    def _flat(self, per_head: list[np.ndarray], what: str) -> np.ndarray:
        """Flat indices (int64, ascending) of the (checked) per-head positions."""
        self._check_selections(per_head, what)
        sizes = [p.size for p in per_head]
        if not sum(sizes):
            return np.zeros(0, dtype=np.int64)
        flat = np.concatenate(per_head).astype(np.int64, copy=False)  # a new array either way
        flat += np.repeat(self._head_offsets, sizes)
        return flat

    def _admit(
        self, new: np.ndarray, protected: np.ndarray, n_protected: int, now: int,
        count: bool = True,
    ) -> None:
        """Insert the non-resident entries at flat indices ``new`` (ascending), evicting
        non-protected ones as needed.

        ``protected`` (flat indices) may contain non-resident entries too (they are simply not
        candidates); ``n_protected`` counts its resident entries.
        """
        n_new = new.size
        free = self.capacity_entries - self.resident_entries
        resident_idx = self._resident_idx
        if n_new > free:
            evictable = self.resident_entries - n_protected
            n_evict = min(n_new - free, evictable)
            if n_evict > 0:
                if n_protected:
                    # The candidates: resident entries not protected (marked, then unmarked).
                    marks = self._mark_flat
                    marks[protected] = True
                    candidates = resident_idx[~marks[resident_idx]]
                    marks[protected] = False
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
                if count:
                    self.streamed += n_new - room
        if new.size:
            self._resident_flat[new] = True
            self.replacement.on_insert_flat(new, now)
            self.resident_entries += new.size
            resident_idx = np.concatenate((resident_idx, new))
            # Two sorted runs: the stable sort (timsort for int64) merges them in linear time.
            resident_idx.sort(kind="stable")
        self._resident_idx = resident_idx
        if self.resident_entries > self.peak_resident_entries:
            self.peak_resident_entries = self.resident_entries

    def _keep_lowest(self, flat: np.ndarray, keep: int) -> np.ndarray:
        """The ``keep`` lowest positions among the entries at ``flat`` (ties: lowest head),
        in ``flat``'s order."""
        if keep <= 0:
            return flat[:0]
        heads, positions = np.divmod(flat, self.n_positions)
        chosen = np.lexsort((heads, positions))[:keep]
        kept = np.zeros(flat.size, dtype=bool)
        kept[chosen] = True
        return flat[kept]

    def _check_selections(self, per_head: list[np.ndarray], what: str) -> None:
        if len(per_head) != self.n_heads:
            raise ValueError(f"{what}: expected {self.n_heads} heads, got {len(per_head)}")
        for h, sel in enumerate(per_head):
            if sel.size and (sel[0] < 0 or sel[-1] >= self.n_positions):
                raise ValueError(
                    f"{what}[{h}]: positions must be in [0, {self.n_positions}),"
                    f" got {sel[0]}..{sel[-1]}"
                )
            if self.check_inputs and sel.size > 1 and not (np.diff(sel) > 0).all():
                raise ValueError(f"{what}[{h}]: positions must be sorted and unique, got {sel}")
