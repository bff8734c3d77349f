"""The intra-cluster layout: each prefill cluster one contiguous extent."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.kv.layouts.base import LAYOUTS, FlashLayout

__all__ = ["ClusterLayout"]


@LAYOUTS.register("cluster")
@dataclass(eq=False)
class ClusterLayout(FlashLayout):
    """Intra-cluster contiguity (DynaKV, arXiv 2511.07427, §4.2 "intra-cluster").

    Prefill positions are grouped by label; the groups are laid out one after another in the
    order of their smallest position, positions ascending within a group. Decode tokens go to a
    log after the prefill area in sequence order: a plain cluster-contiguous layout has no room
    to grow a cluster in place (DynaKV's dual-head layout fixes that; not this class). With
    ``groups=None`` it is :class:`~sim.kv.layouts.sequence.SequenceLayout`.
    """

    def _prefill_slots(self, prompt_len: int, groups: np.ndarray | None) -> np.ndarray:
        if groups is None or prompt_len == 0:
            return np.arange(prompt_len, dtype=np.int64)
        _, first_pos, inverse = np.unique(groups, return_index=True, return_inverse=True)
        # np.unique's return_index is the first occurrence = the group's smallest position.
        group_start = first_pos[inverse.reshape(-1)]
        order = np.lexsort((np.arange(prompt_len), group_start))  # positions in slot order
        slot_of = np.empty(prompt_len, dtype=np.int64)
        slot_of[order] = np.arange(prompt_len, dtype=np.int64)
        return slot_of

    def _append_slot(self, position: int, group: int | None) -> int:
        # The log starts right after the prefill area and grows one slot per decode token.
        return position
