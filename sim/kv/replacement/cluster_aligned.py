"""Cluster-aligned replacement, DynaKV's cache policy (arXiv 2511.07427, §4.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from sim.kv.replacement.base import REPLACEMENTS
from sim.kv.replacement.cluster_groups import GroupBookkeeping

__all__ = ["ClusterAlignedReplacement"]


@REPLACEMENTS.register("cluster_aligned")
@dataclass(eq=False)
class ClusterAlignedReplacement(GroupBookkeeping):
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

    The per-group state behind this order (sizes, resident members, latest use and update) is
    kept by :class:`~sim.kv.replacement.cluster_groups.GroupBookkeeping`; this class ranks.

    Cost: ``on_access`` adds one gather and one scatter per head to LRU's; ``victims`` is
    O(C) partitions over the C candidates plus a sort of the entries tied at the boundary and
    of the recently updated groups' entries.
    """

    recent_steps: int = 16
    reserved_fraction: float = 0.25
    size_classes: str = "exact"

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

    #: Key layout of a group: (protected, n_positions - size class, latest use), packed in
    #: one int64 as protected << 62 | (n_positions - size) << 40 | latest use.
    _USE_BITS: ClassVar[int] = 40
    _PROTECTED: ClassVar[int] = 1 << 62

    def bind(self, n_heads: int, n_positions: int) -> None:
        if n_positions >= 1 << (62 - self._USE_BITS):
            raise ValueError(f"cluster_aligned: n_positions {n_positions} too large")
        super().bind(n_heads, n_positions)

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
        m = self.n_positions
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
