"""Flash layouts (sim.kv.layouts) and command coalescing (sim.kv.io_plan).

Hand cases have their numbers derived in comments; hypothesis checks the invariants: layouts are
bijections, plans cover every requested byte and read each page once.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.errors import ConfigError
from sim.kv.io_plan import plan_reads, plan_writes
from sim.kv.layouts import LAYOUTS, FlashLayout
from sim.kv.layouts.cluster import ClusterLayout
from sim.kv.layouts.sequence import SequenceLayout

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------- io_plan, by hand


def test_small_entries_share_pages():
    # 512 B entries, 8 per 4096 B page: slots 0,1,2 -> page 0; slot 9 -> bytes 4608.. -> page 1.
    plan = plan_reads(np.array([0, 1, 2, 9]), 512, 4096, 512 * 1024)
    assert plan.command_bytes.tolist() == [8192]
    assert plan.command_offset_bytes.tolist() == [0]
    assert plan.useful_bytes == 4 * 512
    assert plan.run_entries.tolist() == [3, 1]


def test_gap_of_a_page_splits_commands():
    # Slot 0 -> page 0; slot 16 -> byte 8192 -> page 2; page 1 untouched -> two commands.
    plan = plan_reads(np.array([0, 16]), 512, 4096, 1 << 20)
    assert plan.command_bytes.tolist() == [4096, 4096]
    assert plan.command_offset_bytes.tolist() == [0, 8192]
    assert plan.run_entries.tolist() == [1, 1]


def test_split_at_max_io():
    # 40 slots of 1024 B = 40960 B = pages 0..9; max_io 16 KiB = 4 pages -> 4 + 4 + 2 pages.
    plan = plan_reads(np.arange(40), 1024, 4096, 16384)
    assert plan.command_bytes.tolist() == [16384, 16384, 8192]
    assert plan.command_offset_bytes.tolist() == [0, 16384, 32768]
    assert plan.run_entries.tolist() == [40]
    assert plan.useful_bytes == 40960


def test_max_io_not_a_page_multiple_rounds_down():
    # max_io 10000 B holds 2 whole pages; 3 pages -> 8192 + 4096.
    plan = plan_reads(np.arange(12), 1024, 4096, 10000)
    assert plan.command_bytes.tolist() == [8192, 4096]


def test_entry_straddling_pages():
    # 3000 B entries: slot 1 = bytes 3000..5999 -> pages 0 and 1; slot 3 = 9000..11999 -> page 2.
    plan = plan_reads(np.array([1, 3]), 3000, 4096, 1 << 20)
    assert plan.command_bytes.tolist() == [12288]  # pages 0,1,2 adjacent -> one command
    assert plan.run_entries.tolist() == [1, 1]
    # slot 5 = 15000..17999 -> pages 3,4; with slot 1 (pages 0,1) -> two runs.
    plan = plan_reads(np.array([1, 5]), 3000, 4096, 1 << 20)
    assert plan.command_bytes.tolist() == [8192, 8192]
    assert plan.command_offset_bytes.tolist() == [0, 12288]


def test_entry_larger_than_page():
    # 10000 B entry at slot 1 = bytes 10000..19999 -> pages 2,3,4.
    plan = plan_reads(np.array([1]), 10000, 4096, 1 << 20)
    assert plan.command_bytes.tolist() == [12288]
    assert plan.command_offset_bytes.tolist() == [8192]


def test_unsorted_and_duplicate_slots_count_once():
    plan = plan_reads(np.array([9, 0, 2, 1, 2]), 512, 4096, 1 << 20)
    assert plan.command_bytes.tolist() == [8192]
    assert plan.useful_bytes == 4 * 512
    assert plan.run_entries.tolist() == [3, 1]


def test_empty_plan():
    plan = plan_reads(np.zeros(0, np.int64), 512, 4096, 1 << 20)
    assert plan.command_bytes.size == 0 and plan.useful_bytes == 0 and plan.run_entries.size == 0
    assert plan_writes(np.zeros(0, np.int64), 512, 4096, 1 << 20).size == 0


def test_write_of_one_small_entry_writes_its_page():
    # One 256 B decode entry at slot 100 = byte 25600 -> page 6: a whole 4 KiB page written.
    assert plan_writes(np.array([100]), 256, 4096, 1 << 20).tolist() == [4096]
    # Slots 15,16 of 256 B straddle the page 0/1 boundary? 15*256=3840..4095 (page 0),
    # 16*256=4096 (page 1): two adjacent pages, one command.
    assert plan_writes(np.array([15, 16]), 256, 4096, 1 << 20).tolist() == [8192]


@pytest.mark.parametrize(
    ("entry", "page", "max_io"), [(0, 4096, 8192), (512, 0, 8192), (512, 4096, 2048)]
)
def test_bad_sizes_raise(entry, page, max_io):
    with pytest.raises(ValueError, match="must be"):
        plan_reads(np.array([0]), entry, page, max_io)


def test_negative_slot_raises():
    with pytest.raises(ValueError, match="-3"):
        plan_reads(np.array([-3, 0]), 512, 4096, 8192)


# ---------------------------------------------------------------------------- io_plan, invariants


@FAST
@given(
    slots=st.lists(st.integers(0, 600), max_size=120),
    entry_bytes=st.sampled_from([64, 256, 512, 1000, 3000, 4096, 5000, 9000]),
    page_size=st.sampled_from([512, 4096, 16384]),
    max_pages=st.integers(1, 9),
    extra=st.integers(0, 511),
)
def test_plan_reads_invariants(slots, entry_bytes, page_size, max_pages, extra):
    max_io = max_pages * page_size + extra
    arr = np.array(slots, dtype=np.int64)
    plan = plan_reads(arr, entry_bytes, page_size, max_io)
    wanted = np.unique(arr)
    cb, co = plan.command_bytes, plan.command_offset_bytes
    assert cb.dtype == np.int64 and co.dtype == np.int64
    assert (cb > 0).all() and (cb % page_size == 0).all() and (cb <= max_io).all()
    assert (co % page_size == 0).all()
    # Commands in address order and disjoint: no page read twice.
    assert (co[1:] >= co[:-1] + cb[:-1]).all()
    pages = set()
    for off, size in zip(co.tolist(), cb.tolist(), strict=True):
        pages.update(range(off // page_size, (off + size) // page_size))
    touched = set()
    for s in wanted.tolist():
        touched.update(
            range(
                s * entry_bytes // page_size, (s * entry_bytes + entry_bytes - 1) // page_size + 1
            )
        )
    # Exactly the touched pages are read (covers every requested byte, reads nothing else).
    assert pages == touched
    assert int(cb.sum()) == len(touched) * page_size
    # Adjacent commands are only separate when a split at max_io forced it.
    joined = co[1:] == co[:-1] + cb[:-1]
    assert (cb[:-1][joined] == (max_io // page_size) * page_size).all()
    assert plan.useful_bytes == wanted.size * entry_bytes
    assert int(plan.run_entries.sum()) == wanted.size
    assert plan.run_entries.size == (int((np.diff(wanted) != 1).sum()) + 1 if wanted.size else 0)
    assert plan_writes(arr, entry_bytes, page_size, max_io).tolist() == cb.tolist()


def test_regions_never_coalesce():
    # the same slots in two regions: pages 0 of region 0 and page 0 of region 1 are distinct
    plan = plan_reads(np.array([0, 1, 0, 1]), 512, 4096, 1 << 20, regions=np.array([0, 0, 1, 1]))
    assert plan.command_bytes.tolist() == [4096, 4096]
    assert plan.command_regions.tolist() == [0, 1]
    assert plan.run_entries.tolist() == [2, 2]
    # slot 7 ends region 0's first page, slot 8 starts region 1's second page: no merge
    plan = plan_reads(np.array([7, 8]), 512, 4096, 1 << 20, regions=np.array([0, 1]))
    assert plan.command_bytes.tolist() == [4096, 4096] and plan.run_entries.tolist() == [1, 1]


@FAST
@given(
    per_region=st.lists(st.lists(st.integers(0, 300), max_size=40), min_size=1, max_size=4),
    entry_bytes=st.sampled_from([256, 1000, 4096, 5000]),
    max_pages=st.integers(1, 5),
)
def test_multi_region_plan_is_the_union_of_region_plans(per_region, entry_bytes, max_pages):
    max_io = max_pages * 4096
    slots = np.array([s for region in per_region for s in region], dtype=np.int64)
    regions = np.repeat(np.arange(len(per_region)), [len(r) for r in per_region])
    together = plan_reads(slots, entry_bytes, 4096, max_io, regions=regions)
    apart = [plan_reads(np.array(r, dtype=np.int64), entry_bytes, 4096, max_io)
             for r in per_region]
    assert together.command_bytes.tolist() == [b for p in apart for b in p.command_bytes.tolist()]
    assert together.run_entries.tolist() == [n for p in apart for n in p.run_entries.tolist()]
    assert together.useful_bytes == sum(p.useful_bytes for p in apart)
    writes = plan_writes(slots, entry_bytes, 4096, max_io, regions=regions)
    assert writes.tolist() == together.command_bytes.tolist()


# ---------------------------------------------------------------------------- layouts, by hand


def test_sequence_layout():
    lay = SequenceLayout(n_positions=10)
    lay.place_prefill(4, None)
    assert lay.slots(np.arange(4)).tolist() == [0, 1, 2, 3]
    assert lay.place_append(4, None) == 4
    assert lay.slots(np.array([4, 0])).tolist() == [4, 0]


def test_cluster_layout_groups_in_order_of_smallest_position():
    # Labels: position 0->7, 1->3, 2->7, 3->5, 4->3, 5->5. Groups by smallest position:
    # label 7 {0,2} at slots 0,1; label 3 {1,4} at 2,3; label 5 {3,5} at 4,5.
    lay = ClusterLayout(n_positions=8)
    lay.place_prefill(6, np.array([7, 3, 7, 5, 3, 5]))
    assert lay.slots(np.arange(6)).tolist() == [0, 2, 1, 4, 3, 5]
    # Decode tokens go to a log after the prefill area, whatever their group.
    assert lay.place_append(6, 3) == 6
    assert lay.place_append(7, 7) == 7
    with pytest.raises(ValueError, match="full"):
        lay.place_append(8, 7)


def test_cluster_layout_without_groups_is_sequence():
    lay = ClusterLayout(n_positions=5)
    lay.place_prefill(3, None)
    assert lay.slots(np.arange(3)).tolist() == [0, 1, 2]


def test_layout_misuse_raises():
    lay = SequenceLayout(n_positions=5)
    with pytest.raises(ValueError, match="before place_prefill"):
        lay.place_append(0, None)
    with pytest.raises(ValueError, match="prompt_len"):
        lay.place_prefill(6, None)
    with pytest.raises(ValueError, match="shape"):
        lay.place_prefill(3, np.array([1, 2]))
    lay.place_prefill(3, None)
    with pytest.raises(ValueError, match="already"):
        lay.place_prefill(3, None)
    with pytest.raises(ValueError, match="expected position 3, got 4"):
        lay.place_append(4, None)
    with pytest.raises(ValueError, match="placed"):
        lay.slots(np.array([3]))
    with pytest.raises(ValueError, match="n_positions"):
        SequenceLayout(n_positions=0)


def test_layout_registry():
    assert {"sequence", "cluster"} <= set(LAYOUTS.names())
    # n_positions is the first field, so the engine's construction works for every member.
    for name in LAYOUTS.names():
        assert LAYOUTS.parameters(name)[0] == "n_positions"
    with pytest.raises(ConfigError, match="valid: .*cluster"):
        LAYOUTS.get("nope")


# ---------------------------------------------------------------------------- layouts, invariants


@FAST
@pytest.mark.parametrize("name", LAYOUTS.names())
@given(data=st.data())
def test_layout_is_a_bijection(name, data):
    n_positions = data.draw(st.integers(1, 200))
    prompt_len = data.draw(st.integers(0, n_positions))
    n_append = data.draw(st.integers(0, n_positions - prompt_len))
    grouped = data.draw(st.booleans())
    n_labels = data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    groups = rng.integers(-1, n_labels, prompt_len) if grouped else None
    lay: FlashLayout = LAYOUTS.get(name)(n_positions=n_positions)
    lay.place_prefill(prompt_len, groups)
    prefill_slots = lay.slots(np.arange(prompt_len))
    appended = [
        lay.place_append(prompt_len + i, int(rng.integers(n_labels)) if grouped else None)
        for i in range(n_append)
    ]
    n = prompt_len + n_append
    assert lay.n_placed == n
    all_slots = lay.slots(np.arange(n))
    assert (all_slots >= 0).all()
    if lay.bounded_slots:
        assert (all_slots < n_positions).all()
    assert np.unique(all_slots).size == n  # injective: no entry overwritten
    if not lay.relocates:
        assert all_slots.tolist()[prompt_len:] == appended
        # Slots assigned at prefill never move.
        assert lay.slots(np.arange(prompt_len)).tolist() == prefill_slots.tolist()
    if name == "cluster" and groups is not None and prompt_len:
        # Every group is one contiguous slot range, positions ascending inside it.
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            s = all_slots[members]
            assert (np.diff(s) == 1).all()
