"""Where each KV entry of one (layer, KV head) lives in its flash region.

Every (layer, KV head) owns a page-aligned flash region of ``n_positions`` entry slots; slot
``s`` is the byte range ``[s * entry_bytes, (s + 1) * entry_bytes)`` of the region. A layout maps
token positions to slots. It is a bijection between the positions placed so far and their slots:
no entry is lost or stored twice.

Usage (one instance per (layer, KV head)): ``place_prefill`` once, then ``place_append`` for each
decode token in sequence order (position ``P``, ``P + 1``, ...), and ``slots`` at any time for
placed positions. Members are dataclasses registered in :data:`LAYOUTS`; the engine builds them
with ``LAYOUTS.get(name)(n_positions=..., **params)`` where ``params`` are the YAML
hyperparameters, so ``n_positions`` is always the first field.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from sim.registry import Registry

__all__ = ["LAYOUTS", "FlashLayout", "engine_layout_spec", "shared_slot_table"]

_UNPLACED = -1


@dataclass(eq=False)
class FlashLayout(ABC):
    """Base of every flash layout of one (layer, KV head) region.

    ``n_positions``: slots in the region (the trace's final context length).

    The base validates arguments and keeps the position -> slot table; subclasses implement
    :meth:`_prefill_slots` and :meth:`_append_slot`. ``place_prefill``/``place_append`` may be
    overridden by layouts that need more (e.g. the dual-head layout's pools).

    Class flags (contract tests and callers read them): ``relocates`` -- placed entries may
    move later (their rewrites are reported by :meth:`due_writes` and :meth:`relabel`);
    ``bounded_slots`` -- every slot is below ``n_positions`` (a layout with pools uses a
    larger, unbounded slot space; the engine keys commands by region, so that is fine).
    """

    relocates: ClassVar[bool] = False
    bounded_slots: ClassVar[bool] = True

    n_positions: int
    _slot_of: np.ndarray = field(init=False, repr=False)
    _n_placed: int = field(init=False, repr=False, default=0)
    _prompt_len: int | None = field(init=False, repr=False, default=None)
    coretrieval: np.ndarray | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.n_positions, bool) or not isinstance(
            self.n_positions, (int, np.integer)
        ):
            raise ValueError(f"n_positions must be an int, got {self.n_positions!r}")
        if self.n_positions <= 0:
            raise ValueError(f"n_positions must be > 0, got {self.n_positions}")
        self.n_positions = int(self.n_positions)
        self._slot_of = np.full(self.n_positions, _UNPLACED, dtype=np.int64)

    # ------------------------------------------------------------------ public API

    @property
    def n_placed(self) -> int:
        """Positions placed so far; they are exactly ``[0, n_placed)``."""
        return self._n_placed

    @property
    def prompt_len(self) -> int | None:
        """The prefill length, or ``None`` before :meth:`place_prefill`."""
        return self._prompt_len

    def place_prefill(
        self,
        prompt_len: int,
        groups: np.ndarray | None,
        coretrieval: np.ndarray | None = None,
    ) -> None:
        """Place the prompt's positions ``[0, prompt_len)``; call once, before any append.

        ``groups``: int label of each prefill position (length ``prompt_len``), e.g. the cluster
        of a cluster-based policy; any int is a label (-1 is just another group). ``None``: no
        grouping. ``coretrieval``: optional (n_groups, n_groups) counts of how often two groups
        were retrieved together, measured by the policy before decoding (kept in
        ``self.coretrieval`` for layouts that place co-retrieved groups side by side).
        """
        self.coretrieval = coretrieval
        if self._prompt_len is not None:
            raise ValueError(f"place_prefill already called (prompt_len={self._prompt_len})")
        if not 0 <= prompt_len <= self.n_positions:
            raise ValueError(f"prompt_len must be in [0, {self.n_positions}], got {prompt_len}")
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (prompt_len,):
                raise ValueError(f"groups must have shape ({prompt_len},), got {groups.shape}")
            if groups.size and not np.issubdtype(groups.dtype, np.integer):
                raise ValueError(f"groups must be integer labels, got dtype {groups.dtype}")
        slots = np.asarray(self._prefill_slots(prompt_len, groups), dtype=np.int64)
        self._slot_of[:prompt_len] = slots
        self._prompt_len = prompt_len
        self._n_placed = prompt_len

    def place_append(self, position: int, group: int | None) -> int:
        """Place one decode token's entry (``position == n_placed``); return its slot."""
        if self._prompt_len is None:
            raise ValueError("place_append before place_prefill (use place_prefill(0, None))")
        if position != self._n_placed:
            raise ValueError(
                f"decode tokens are appended in sequence order: expected position"
                f" {self._n_placed}, got {position}"
            )
        if position >= self.n_positions:
            raise ValueError(f"region full: position {position} >= n_positions")
        slot = int(self._append_slot(position, group))
        self._slot_of[position] = slot
        self._n_placed += 1
        return slot

    def due_writes(self, slot: int) -> np.ndarray:
        """Slots to write to flash now that the entry at ``slot`` was placed.

        Default: write it at once (a sub-page write rewrites its page). A layout with a DRAM
        write buffer returns nothing until a page is full, then that page's slots, and
        reports the entries it holds in :attr:`buffered_entries` (they count as DRAM use).
        """
        return np.array([slot], dtype=np.int64)

    @property
    def buffered_entries(self) -> int:
        """Entries held in a DRAM write buffer, not yet on flash (0: no buffer)."""
        return 0

    def buffered_positions(self) -> np.ndarray:
        """The positions of :attr:`buffered_entries` (int64, sorted; empty: no buffer). They
        are in DRAM only: the engine attends them from there, never from flash."""
        return np.zeros(0, dtype=np.int64)

    def max_buffered_entries(self, groups: np.ndarray | None) -> int:
        """An upper bound on :attr:`buffered_entries` over a run whose prefill groups are
        ``groups`` (as :meth:`place_prefill` would get them); 0: no write buffer."""
        return 0

    def relabel(self, positions: np.ndarray, group: int) -> np.ndarray:
        """``positions`` (placed) now belong to ``group`` (a cluster split); returns the slots
        the layout rewrote to keep its promise (relocated entries, written from DRAM).

        The layouts here keep entries where they are (DynaKV's "migration-free" adaptation:
        a split moves no data), so nothing is written; a layout that keeps each group
        contiguous (the dual-head layout) overrides this and relocates.
        """
        self.slots(positions)  # validates that they are placed
        return np.zeros(0, dtype=np.int64)

    def slots(self, positions: np.ndarray) -> np.ndarray:
        """Slots (int64) of placed ``positions`` (vectorised, same shape)."""
        positions = np.asarray(positions)
        if positions.size == 0:
            return np.zeros(positions.shape, dtype=np.int64)
        # Placed positions are exactly [0, n_placed), so a min/max check is the whole validation.
        lo, hi = positions.min(), positions.max()
        if lo < 0 or hi >= self._n_placed:
            raise ValueError(f"positions must be placed, in [0, {self._n_placed}); got {lo}..{hi}")
        if positions.dtype != np.intp and positions.dtype.kind in "iu":
            positions = positions.astype(np.intp)  # numpy gathers ~3x faster with intp
        return self._slot_of[positions]

    # ------------------------------------------------------------------ subclass surface

    @abstractmethod
    def _prefill_slots(self, prompt_len: int, groups: np.ndarray | None) -> np.ndarray:
        """Slot of each prefill position ``0..prompt_len-1``: a permutation of distinct slots."""

    @abstractmethod
    def _append_slot(self, position: int, group: int | None) -> int:
        """Slot of the decode token at ``position`` (not used by any placed position)."""


LAYOUTS: Registry[FlashLayout] = Registry("flash layout", package="sim.kv.layouts")


def shared_slot_table(layouts: Sequence[FlashLayout]) -> np.ndarray:
    """One ``(len(layouts), n_positions)`` table whose rows *are* the position -> slot tables
    of ``layouts`` (regions of equal ``n_positions``; -1: not placed), so the slots of entries
    of several regions are one gather (``table.reshape(-1)[region * n_positions + position]``,
    the engine's reads of all KV heads of a layer). The layouts go on placing into their rows
    (a layout only ever writes into its table, never replaces it)."""
    table = np.stack([layout._slot_of for layout in layouts])
    for layout, row in zip(layouts, table, strict=True):
        layout._slot_of = row
    return table


def engine_layout_spec(
    spec: dict, n_positions: int, entry_bytes: int, page_bytes: int
) -> dict:
    """A layout's registry spec with the sizes the engine knows filled in: ``n_positions``,
    and ``entry_bytes`` / ``page_bytes`` if the layout declares them (a page-aligned write
    buffer needs both)."""
    import dataclasses

    filled = {**spec, "n_positions": n_positions}
    declared = {f.name for f in dataclasses.fields(LAYOUTS.get(filled["type"]))}
    for name, value in (("entry_bytes", entry_bytes), ("page_bytes", page_bytes)):
        if name in declared:
            filled[name] = value
    return filled
