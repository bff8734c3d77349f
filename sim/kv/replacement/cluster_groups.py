"""Group bookkeeping of group-aware replacement (:mod:`sim.kv.replacement.cluster_aligned`).

Kept apart from the victim choice: what the hooks maintain (which group every entry is in, and
per group its size, resident members, latest use and latest update) is one data structure; how
victims are ranked from it is the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from sim.kv.replacement.base import ReplacementPolicy

__all__ = ["GroupBookkeeping"]


class GroupBookkeeping(ReplacementPolicy):
    """Per-entry and per-group state of a group-aware replacement policy, kept up to date by
    the :class:`ReplacementPolicy` hooks; subclasses choose the victims from it.

    Per entry (``(n_heads, n_positions)`` arrays, with flat views and row views for the hot
    paths): ``_stamp``, the ``now`` of its latest use (access or insertion); ``_gid``, its
    internal group id (0: no group); ``_res``, whether it is resident.

    Per internal group id (arrays grown by doubling; slot 0 is the dummy "no group", so hot
    paths can scatter through it without masking): ``_gsize``, members in the head (resident
    or not); ``_gres``, resident members (maintained once any group exists); ``_glast``, latest
    use of any member; ``_gupd``, the tick of the latest update (a member joined or left at
    ``now >= 0``). Group ids are per (head, label), assigned on first sight.

    Clock: ``_tick`` advances once per distinct (increasing) ``now`` seen by any hook.
    """

    uses_groups: ClassVar[bool] = True

    _NEVER: ClassVar[int] = -(1 << 62)

    def bind(self, n_heads: int, n_positions: int) -> None:
        super().bind(n_heads, n_positions)
        self._stamp = np.zeros((n_heads, n_positions), dtype=np.int64)
        self._stamp_flat = self._stamp.reshape(-1)
        self._stamp_rows = list(self._stamp)
        # Internal group id per entry; 0 = no group (slot 0 of the group arrays is a dummy,
        # so hot paths can scatter through it without masking).
        self._gid = np.zeros((n_heads, n_positions), dtype=np.int64)
        self._gid_flat = self._gid.reshape(-1)
        self._gid_rows = list(self._gid)
        self._gid_of: dict[tuple[int, int], int] = {}  # (head, label) -> internal id
        self._n_groups = 1
        self._gsize = np.zeros(64, dtype=np.int64)  # members per group
        self._glast = np.zeros(64, dtype=np.int64)  # latest use of any member
        self._gupd = np.full(64, self._NEVER, dtype=np.int64)  # tick of the latest update
        self._gres = np.zeros(64, dtype=np.int64)  # resident members (kept once groups exist)
        self._res = np.zeros((n_heads, n_positions), dtype=bool)
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

    def assign_group_heads(self, position: int, groups: Sequence[int], now: int) -> None:
        # assign_group of every head at once: the heads' group ids are distinct (one per
        # (head, label)), so only the dummy slot 0 (no group) may be updated by several heads
        self._clock(now)
        new = np.array(
            [self._gid_for(head, group) for head, group in enumerate(groups)], dtype=np.int64
        )
        flat = np.arange(len(groups), dtype=np.int64) * self.n_positions + position
        old = self._gid_flat[flat]
        changed = old != new
        if not changed.all():
            if not changed.any():
                return
            flat, old, new = flat[changed], old[changed], new[changed]
        if not self._has_groups:
            self._start_groups()
        grouped = old > 0
        left = old[grouped]  # distinct
        self._gsize[0] -= len(old) - len(left)
        self._gsize[left] -= 1
        self._gsize[new] += 1
        resident = self._res_flat[flat]
        if resident.any():
            was = old[resident]
            self._gres[0] -= int(np.count_nonzero(was == 0))
            self._gres[was[was > 0]] -= 1
            self._gres[new[resident]] += 1
        self._gid_flat[flat] = new
        self._glast[new] = np.maximum(self._glast[new], self._stamp_flat[flat])
        if now >= 0:
            self._gupd[new] = self._tick
            self._gupd[left] = self._tick

    # -- hooks ---------------------------------------------------------------------------------

    def on_access(self, head: int, positions: np.ndarray, now: int) -> None:
        if now != self._now:
            self._clock(now)
        self._stamp_rows[head][positions] = now
        if self._has_groups:
            self._glast[self._gid_rows[head][positions]] = now

    def on_access_flat(self, flat_idx: np.ndarray, now: int) -> None:
        if now != self._now:
            self._clock(now)
        self._stamp_flat[flat_idx] = now
        if self._has_groups:
            self._glast[self._gid_flat[flat_idx]] = now

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
