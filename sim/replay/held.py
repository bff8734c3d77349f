"""What DRAM holds of a layer outside its cache, position by position.

A policy's sinks and recent window (``LayerSelection.dram_sinks`` and ``dram_tail``) and
DynaKV's split buffers (``split_buffers``) are attended from DRAM, as are the positions a
layout's write buffer holds (:meth:`sim.kv.layouts.FlashLayout.buffered_positions`): the replay
leaves them out of a layer's cache lookup (neither hits nor misses: ``held_entries``) and never
inserts a new token the policy or a layout holds into the cache. What these parts add to the
DRAM footprint is defined in :mod:`sim.footprint`.
"""

from __future__ import annotations

import numpy as np

from sim.policies.base import LayerSelection


def in_sorted(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """``np.isin(values, among)`` for a sorted, non-empty ``among`` (one binary search per
    value: cheaper than ``isin``'s general path on the replay's small arrays)."""
    found = among.searchsorted(values)
    np.minimum(found, len(among) - 1, out=found)
    return among[found] == values


def holds_outside_cache(selection: LayerSelection) -> bool:
    """Whether a layer's ``selection`` holds positions in DRAM outside its cache."""
    return not selection.is_resident and (
        selection.dram_sinks > 0 or selection.dram_tail is not None
        or selection.split_buffers is not None
    )


class HeldPositions:
    """The positions a policy holds in DRAM outside the cache, by selection and trace KV head
    (the split buffers of the latest step asked for are kept: the next step asks again)."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        # (selection, trace head) -> (step, split buffers at its end), see split_buffered
        self._split: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def split_buffered(self, selection: LayerSelection, trace_head: int, step: int
                       ) -> np.ndarray:
        """Positions in the split buffers of ``trace_head`` at the end of ``step`` (none before
        the first step)."""
        if selection.split_buffers is None or step < 0:
            return np.zeros(0, dtype=np.int32)
        key = (id(selection), trace_head)
        known = self._split.get(key)
        if known is not None and known[0] == step:
            return known[1]
        positions = selection.split_buffers[trace_head].at(step)
        self._split[key] = (step, positions)
        return positions

    def without(
        self,
        selection: LayerSelection,
        step: int,
        positions: np.ndarray,
        trace_head: int,
        write_buffered: np.ndarray | None = None,
    ) -> np.ndarray:
        """``positions`` (stored, sorted) at ``step`` without those held in DRAM outside the
        cache: the policy's sinks and window, the split buffers (as the step starts) and the
        layout's ``write_buffered`` positions."""
        out = positions
        if selection.dram_sinks or selection.dram_tail is not None:
            # sorted: the positions in [sinks, tail) are one slice
            lo = out.searchsorted(selection.dram_sinks) if selection.dram_sinks else 0
            hi = len(out) if selection.dram_tail is None else out.searchsorted(
                selection.dram_tail[step])
            out = out[lo:hi]
        for held in (self.split_buffered(selection, trace_head, step - 1), write_buffered):
            if held is not None and len(held) and len(out):
                out = out[~in_sorted(out, held)]
        return out

    def holds_new(self, selection: LayerSelection, step: int, trace_head: int) -> bool:
        """Whether the policy holds the token appended at ``step`` in DRAM outside the cache
        (its window or sinks, or a split buffer at the step's end)."""
        position = self.prompt_len + step
        if selection.dram_tail is not None or position < selection.dram_sinks:
            return True
        return bool((self.split_buffered(selection, trace_head, step) == position).any())

    def only_write_buffered(
        self, selection: LayerSelection, trace_head: int, step: int, positions: np.ndarray
    ) -> int:
        """How many of a layout's write-buffered ``positions`` at the end of ``step`` no other
        part holds (neither the policy's sinks or window nor a split buffer)."""
        outside = positions >= selection.dram_sinks
        if selection.dram_tail is not None:
            outside &= positions < selection.dram_tail[step]
        positions = positions[outside]
        split = self.split_buffered(selection, trace_head, step)
        return int((~np.isin(positions, split)).sum()) if len(split) else len(positions)
