"""The replacement-policy interface of :class:`~sim.kv.cache.LayerCache` and its registry.

The cache owns capacity and accounting; a :class:`ReplacementPolicy` only chooses victims (the
split of cachetools' ``Cache`` / ``LRUCache.popitem`` and libCacheSim's ``to_evict``). Members are
registered in :data:`REPLACEMENTS` by the modules of this package (one policy or family each),
found on the registry's first lookup; a cache spec ``replacement: {type: lru}`` builds
``REPLACEMENTS.create(spec)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from sim.registry import Registry

__all__ = ["REPLACEMENTS", "ReplacementPolicy"]


class ReplacementPolicy(ABC):
    """Chooses which resident entries to evict; the cache does everything else.

    One instance serves exactly one :class:`LayerCache` (``bind`` allocates its state). Entries
    are addressed per head by position, or globally by *flat index* ``head * n_positions +
    position``. Call order within one :meth:`LayerCache.access`:

    1. ``on_access(h, selected, now)`` for every head, with **all** positions the head selects now
       (hits and misses alike, including misses that end up streamed), before any eviction
       (through :meth:`on_access_flat`, all heads at once, which built-in policies implement
       directly);
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

    def bind(self, n_heads: int, n_positions: int) -> None:
        """Allocate per-entry state for a layer of ``n_heads`` x ``n_positions`` entries."""
        self.n_heads = n_heads
        self.n_positions = n_positions

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:  # noqa: B027
        """``positions`` (sorted, unique) of ``head`` are used at time ``now``."""

    def on_insert(self, head: int, positions: np.ndarray, now: int) -> None:  # noqa: B027
        """``positions`` (sorted, unique) of ``head`` became resident at time ``now``."""

    def on_access_flat(self, flat_idx: np.ndarray, now: int) -> None:
        """:meth:`on_access` of every head at once, by flat index (int64, ascending), as the
        cache calls it; the default calls ``on_access`` for every head (with the head's
        positions, possibly none). Override for speed only."""
        m = self.n_positions
        bounds = np.searchsorted(flat_idx, np.arange(1, self.n_heads) * m)
        for h, part in enumerate(np.split(flat_idx, bounds)):
            self.on_access(h, part - h * m, now)

    def on_insert_flat(self, flat_idx: np.ndarray, now: int) -> None:
        """:meth:`on_insert` for entries of any heads by flat index (int64, ascending), as the
        cache calls it; the default splits them per head. Override for speed only."""
        m = self.n_positions
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

    def assign_group_heads(self, position: int, groups: Sequence[int], now: int) -> None:
        """:meth:`assign_group` of ``position`` in every head ``h`` to ``groups[h]``, heads
        in order (the engine's append); override for speed."""
        for head, group in enumerate(groups):
            self.assign_group(head, position, group, now)

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



REPLACEMENTS: Registry[ReplacementPolicy] = Registry(
    "cache replacement policy", package="sim.kv.replacement"
)
