"""DynaKV's intra- plus inter-cluster layout (arXiv 2511.07427, Technique 2, §4.2): each
cluster contiguous, and clusters often retrieved together placed side by side."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.kv.layouts.base import LAYOUTS
from sim.kv.layouts.cluster import ClusterLayout
from sim.kv.layouts.coretrieval import coretrieval_chain

__all__ = ["IntraInterLayout"]


def _slots_in_order(groups: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Slot of each position when the groups are laid out one after another in ``order``,
    positions ascending inside a group."""
    prompt_len = len(groups)
    rank = np.argsort(order, kind="stable")  # rank[k]: place in ``order`` of the k-th label
    labels = order[rank]
    group_rank = rank[np.searchsorted(labels, groups)]
    by_slot = np.lexsort((np.arange(prompt_len), group_rank))
    slot_of = np.empty(prompt_len, dtype=np.int64)
    slot_of[by_slot] = np.arange(prompt_len, dtype=np.int64)
    return slot_of


@LAYOUTS.register("intra_inter")
@dataclass(eq=False)
class IntraInterLayout(ClusterLayout):
    """Intra- plus inter-cluster contiguity (DynaKV, arXiv 2511.07427, §4.2, Fig. 7 and 12).

    As ``cluster`` (each prefill group one contiguous extent, positions ascending), but the
    groups follow :func:`coretrieval_chain` of the co-retrieval matrix the policy measured
    before decoding (``place_prefill(..., coretrieval=...)``): clusters retrieved together sit
    next to each other, so one sequential read can cover several. Without a usable matrix the
    order is ``cluster``'s (smallest position first). Decode tokens go to an append log after
    the prefill area in sequence order (as ``cluster``); no knobs besides ``n_positions``.
    """

    def _prefill_slots(self, prompt_len: int, groups: np.ndarray | None) -> np.ndarray:
        if groups is None or prompt_len == 0:
            return np.arange(prompt_len, dtype=np.int64)
        return _slots_in_order(groups, coretrieval_chain(groups, self.coretrieval))
