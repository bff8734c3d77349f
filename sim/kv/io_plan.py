"""Coalescing KV-entry slots into page-granular I/O commands.

Flash reads and writes whole pages. Reading a set of entries means reading every page any of
them touches (an entry straddles two or more pages when ``entry_bytes`` does not divide
``page_size`` or exceeds it); touched pages are de-duplicated, runs of consecutive pages become
one command, and a run longer than ``max_io_bytes`` is split. Every page is accounted once per
plan. Offsets are relative to the region's start, which the layout guarantees is page-aligned.

Each (layer, KV head) owns a region. A plan may cover several regions at once (``regions``:
the region of each slot): runs never cross a region boundary, so the engine makes one call per
(decode step, layer) for all KV heads. Fully vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ReadPlan", "plan_reads", "plan_write_commands", "plan_writes"]


@dataclass(frozen=True)
class ReadPlan:
    """The flash commands that read a set of entries of one region.

    ``command_bytes``: int64, one per command in address order, each a positive multiple of
    ``page_size`` and ``<= max_io_bytes``;
    ``useful_bytes``: distinct entries requested * ``entry_bytes`` (what attention uses; the rest
    of ``command_bytes.sum()`` is read amplification);
    ``run_entries``: int64 length, in entries, of each maximal run of consecutive requested
    slots (the contiguous-access-length distribution of DynaKV Fig. 12);
    ``command_offset_bytes``: int64 byte offset of each command within its region (page
    aligned; lets a device model stripe by address and tests check coverage);
    ``command_regions``: int64 region of each command (all 0 when no regions were given).
    """

    command_bytes: np.ndarray
    useful_bytes: int
    run_entries: np.ndarray
    command_offset_bytes: np.ndarray
    command_regions: np.ndarray

    @property
    def read_bytes(self) -> int:
        return int(self.command_bytes.sum())

    @property
    def n_commands(self) -> int:
        return int(self.command_bytes.size)


def plan_reads(
    slots: np.ndarray,
    entry_bytes: int,
    page_size: int,
    max_io_bytes: int,
    regions: np.ndarray | None = None,
) -> ReadPlan:
    """Commands reading the entries at ``slots`` (any order; duplicates count once), in the
    regions ``regions`` (same length as ``slots``; default: all in region 0)."""
    slots, regions = _checked(slots, regions)
    _check_sizes(entry_bytes, page_size, max_io_bytes)
    if slots.size <= _SMALL:
        keys = _small_keys(slots, regions)
        if keys is not None:
            offset_list, size_list, region_list, run_list = _small_commands(
                keys, entry_bytes, page_size, max_io_bytes, runs=True
            )
            return ReadPlan(
                command_bytes=np.array(size_list, dtype=np.int64),
                useful_bytes=len(keys) * int(entry_bytes),
                run_entries=np.array(run_list, dtype=np.int64),
                command_offset_bytes=np.array(offset_list, dtype=np.int64),
                command_regions=np.array(region_list, dtype=np.int64),
            )
    slots, regions, steps = _sorted_unique(slots, regions)
    changes = None if regions is None else regions[1:] != regions[:-1]
    offsets, sizes, command_regions = _page_commands(
        slots, regions, entry_bytes, page_size, max_io_bytes, changes
    )
    if slots.size:
        # A new run starts wherever the next requested slot is not the adjacent one (the
        # sort keys of adjacent slots of one region differ by exactly 1).
        breaks = steps != 1
        if changes is not None:
            breaks |= changes
        bounds = np.concatenate(([0], np.flatnonzero(breaks) + 1, [slots.size]))
        run_entries = np.diff(bounds)
    else:
        run_entries = np.zeros(0, dtype=np.int64)
    return ReadPlan(
        command_bytes=sizes,
        useful_bytes=int(slots.size) * int(entry_bytes),
        run_entries=run_entries,
        command_offset_bytes=offsets,
        command_regions=command_regions,
    )


def plan_writes(
    slots: np.ndarray,
    entry_bytes: int,
    page_size: int,
    max_io_bytes: int,
    regions: np.ndarray | None = None,
) -> np.ndarray:
    """Command sizes (int64, address order) that write the entries at ``slots`` (in
    ``regions``, as for :func:`plan_reads`).

    Every touched page is written whole (a sub-page append rewrites its page: real write
    amplification), adjacent pages are coalesced, commands split at ``max_io_bytes``.
    """
    slots, regions = _checked(slots, regions)
    _check_sizes(entry_bytes, page_size, max_io_bytes)
    if slots.size <= _SMALL:
        keys = _small_keys(slots, regions)
        if keys is not None:
            sizes = _small_commands(keys, entry_bytes, page_size, max_io_bytes, runs=False)[1]
            return np.array(sizes, dtype=np.int64)
    slots, regions, _ = _sorted_unique(slots, regions)
    changes = None if regions is None else regions[1:] != regions[:-1]
    return _page_commands(slots, regions, entry_bytes, page_size, max_io_bytes, changes)[1]


def plan_write_commands(
    slots: np.ndarray, entry_bytes: int, page_size: int, max_io_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The commands of :func:`plan_writes` for ``slots`` of one region with their byte offsets
    in the region: (offsets, sizes), int64, in address order (what a recorded flash schedule
    needs; :func:`plan_writes` gives the sizes alone, which is all the SimPy device takes)."""
    slots, _ = _checked(slots, None)
    _check_sizes(entry_bytes, page_size, max_io_bytes)
    slots, _, _ = _sorted_unique(slots, None)
    offsets, sizes, _ = _page_commands(slots, None, entry_bytes, page_size, max_io_bytes)
    return offsets, sizes


_REGION_SHIFT = 40  # slots below 2**40 entries; regions packed above them in one sort key
#: Plans of at most this many slots (the engine's appends, most cache misses) are computed
#: with Python ints: for a handful of entries numpy's per-call overhead dominates.
_SMALL = 16


def _checked(
    slots: np.ndarray, regions: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``slots`` as int64 (validated: integers >= 0) and ``regions`` as int64 of its shape."""
    slots = np.asarray(slots)
    if slots.size and slots.dtype.kind not in "iu":  # np.issubdtype(dtype, np.integer)
        raise ValueError(f"slots must be integers, got dtype {slots.dtype}")
    slots = slots.astype(np.int64, copy=False).reshape(-1)
    if slots.size:
        # a Python min is cheaper than numpy's reduction on a handful of slots
        lowest = min(slots.tolist()) if slots.size <= _SMALL else slots.min()
        if lowest < 0:
            raise ValueError(f"slots must be >= 0, got {lowest}")
    if regions is not None:
        regions = np.asarray(regions, dtype=np.int64).reshape(-1)
        if regions.shape != slots.shape:
            raise ValueError(f"regions must match slots, got {regions.shape} vs {slots.shape}")
    return slots, regions


def _sorted_unique(
    slots: np.ndarray, regions: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(slots, regions) (checked by :func:`_checked`; ``regions`` may be ``None``: all 0)
    sorted by (region, slot) and de-duplicated, plus the differences of consecutive sort
    keys ``region << 40 | slot``."""
    key = slots if regions is None else (regions << _REGION_SHIFT) | slots
    steps = np.diff(key)
    # Callers usually pass sorted unique keys; only pay for a sort when they do not.
    if (steps <= 0).any():
        key = np.sort(key)
        steps = np.diff(key)
        repeated = steps == 0
        if repeated.any():
            keep = np.empty(key.size, dtype=bool)
            keep[0] = True
            np.logical_not(repeated, out=keep[1:])
            key = key[keep]
            steps = np.diff(key)
        if regions is None:
            slots = key
        else:
            slots = key & ((1 << _REGION_SHIFT) - 1)
            regions = key >> _REGION_SHIFT
    return slots, regions, steps


def _check_sizes(entry_bytes: int, page_size: int, max_io_bytes: int) -> None:
    """Raises ValueError unless the sizes make pages and commands of whole pages."""
    if entry_bytes <= 0:
        raise ValueError(f"entry_bytes must be > 0, got {entry_bytes}")
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    if max_io_bytes < page_size:
        raise ValueError(f"max_io_bytes must be >= page_size ({page_size}), got {max_io_bytes}")


def _small_keys(slots: np.ndarray, regions: np.ndarray | None) -> list[tuple[int, int]] | None:
    """Sorted distinct (region, slot) pairs, or ``None`` outside the packed key's range (the
    numpy path then reproduces its exact behaviour)."""
    slot_list = slots.tolist()
    if regions is None:
        region_list = [0] * len(slot_list)
    else:
        region_list = regions.tolist()
        if region_list and min(region_list) < 0:
            return None
    if slot_list and max(slot_list) >> _REGION_SHIFT:
        return None
    return sorted(set(zip(region_list, slot_list, strict=True)))


def _small_commands(
    keys: list[tuple[int, int]], entry_bytes: int, page_size: int, max_io_bytes: int, runs: bool
) -> tuple[list[int], list[int], list[int], list[int]]:
    """:func:`_page_commands` (offsets, sizes, regions) and the runs of consecutive slots,
    with Python ints, for sorted distinct (region, slot) ``keys``."""
    entry_bytes, page_size = int(entry_bytes), int(page_size)
    max_pages = int(max_io_bytes) // page_size
    offsets: list[int] = []
    sizes: list[int] = []
    regions: list[int] = []
    run_entries: list[int] = []

    def flush(region: int, first: int, last: int) -> None:
        pages = last - first + 1
        while pages > max_pages:
            offsets.append(first * page_size)
            sizes.append(max_pages * page_size)
            regions.append(region)
            first += max_pages
            pages -= max_pages
        offsets.append(first * page_size)
        sizes.append(pages * page_size)
        regions.append(region)

    region = prev_slot = first = last = -1
    for r, slot in keys:
        first_byte = slot * entry_bytes
        first_page = first_byte // page_size
        last_page = (first_byte + entry_bytes - 1) // page_size
        if r != region or first_page > last + 1:
            if region >= 0:
                flush(region, first, last)
            first = first_page
        last = last_page
        if runs:
            if r == region and slot == prev_slot + 1:
                run_entries[-1] += 1
            else:
                run_entries.append(1)
        region, prev_slot = r, slot
    if region >= 0:
        flush(region, first, last)
    return offsets, sizes, regions, run_entries


def _page_commands(
    slots: np.ndarray,
    regions: np.ndarray | None,
    entry_bytes: int,
    page_size: int,
    max_io_bytes: int,
    changes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, sizes, regions) of the commands covering the pages touched by ``slots``
    (sorted by (region, slot), unique; ``regions`` ``None``: all 0; ``changes``: where the
    region changes between consecutive slots, if the caller has it). The sizes are checked by
    the caller (:func:`_check_sizes`)."""
    if slots.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    max_pages = max_io_bytes // page_size
    first_byte = slots * entry_bytes
    first_page = first_byte // page_size
    if page_size % entry_bytes:
        last_page = (first_byte + entry_bytes - 1) // page_size
    else:  # entries tile the pages: none straddles two
        last_page = first_page
    # Slots are sorted, so both page bounds are non-decreasing: entry i starts a new page run
    # exactly when its first page is beyond the previous entry's last page + 1.
    new_run = np.empty(slots.size, dtype=bool)
    new_run[0] = True
    np.greater(first_page[1:], last_page[:-1] + 1, out=new_run[1:])
    if regions is not None:
        new_run[1:] |= regions[1:] != regions[:-1] if changes is None else changes
    run_start_idx = np.flatnonzero(new_run)
    run_first_page = first_page[run_start_idx]
    run_last_page = last_page[np.append(run_start_idx[1:] - 1, slots.size - 1)]
    run_pages = run_last_page - run_first_page + 1
    if regions is None:
        regions = np.zeros(slots.size, dtype=np.int64)
    if run_pages.max() <= max_pages:  # the usual case: one command per run
        return run_first_page * page_size, run_pages * page_size, regions[run_start_idx]
    # Split each run into ceil(pages / max_pages) commands: all full-size but the last.
    n_cmds = -(-run_pages // max_pages)
    total = int(n_cmds.sum())
    sizes = np.full(total, max_pages, dtype=np.int64)
    last_cmd = np.cumsum(n_cmds) - 1
    sizes[last_cmd] = run_pages - (n_cmds - 1) * max_pages
    # Offset of command k = its run's first page + (k - index of the run's first command) * max.
    run_of_cmd = np.repeat(np.arange(run_pages.size), n_cmds)
    first_cmd = last_cmd - n_cmds + 1
    within = np.arange(total, dtype=np.int64) - first_cmd[run_of_cmd]
    offsets = (run_first_page[run_of_cmd] + within * max_pages) * page_size
    return offsets, sizes * page_size, regions[run_start_idx][run_of_cmd]
