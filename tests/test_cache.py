"""DRAM cache (sim.kv.cache): hand-derived cases, invariants under hypothesis, and a
differential test of LRU against a pure-Python OrderedDict reference."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.errors import ConfigError
from sim.kv.cache import LayerCache
from sim.kv.replacement import REPLACEMENTS, ReplacementPolicy

FAST = settings(max_examples=60, deadline=None)


def a(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def make(n_heads: int, n_positions: int, capacity: int, name: str = "lru") -> LayerCache:
    return LayerCache(
        n_heads, n_positions, capacity, REPLACEMENTS.create(name), check_inputs=True
    )


# ---------------------------------------------------------------------------- by hand


def test_lru_evicts_least_recent_not_selected():
    c = make(1, 16, 4)
    assert c.access([a(0, 1, 2, 3)], now=0)[0].tolist() == [0, 1, 2, 3]
    assert c.access([a(0, 1)], now=1)[0].tolist() == []  # 0,1 refreshed at t=1
    # Miss on 4: victim among {2, 3} (stamp 0); tie -> lowest index 2.
    assert c.access([a(4)], now=2)[0].tolist() == [4]
    assert c.resident(0).tolist() == [0, 1, 3, 4]
    assert (c.hits, c.misses, c.streamed) == (2, 5, 0)


def test_fifo_ignores_accesses():
    c = make(1, 16, 4, "fifo")
    c.access([a(0, 1, 2, 3)], now=0)
    c.access([a(2, 3)], now=1)
    c.insert([a(5)], now=1)  # inserted at t=1
    # Victim: oldest insertion among non-selected -> {0, 1} at t=0 (accesses ignored) -> 0 first.
    assert c.resident(0).tolist() == [1, 2, 3, 5]
    c.access([a(6, 7)], now=2)  # needs 2 victims: 1 (t=0) then a t=1 entry... 2 or 3 or 5?
    # Entries 2,3 were inserted at t=0 too, so stamps: 1,2,3 -> 0 and 5 -> 1: victims 1, 2.
    assert c.resident(0).tolist() == [3, 5, 6, 7]


def test_victims_spread_over_heads_by_recency():
    c = make(2, 8, 4)
    c.access([a(0, 1), a(0)], now=0)
    c.access([a(2), a()], now=1)
    # Resident: h0 {0,1,2}, h1 {0} = 4. Two misses on head 1: victims are the two oldest
    # non-selected: stamps h0:0->0, h0:1->0, h0:2->1, h1:0->0 -> by (stamp, flat): h0:0, h0:1.
    assert c.access([a(), a(0, 5, 6)], now=2)[1].tolist() == [5, 6]
    assert c.resident(0).tolist() == [2]
    assert c.resident(1).tolist() == [0, 5, 6]
    assert c.resident_entries == 4 == c.peak_resident_entries


def test_selection_larger_than_capacity_streams():
    c = make(2, 10, 3)
    c.access([a(7), a()], now=0)
    # 5 selected, 1 hit (h0:7) -> 4 misses, room for 2 -> keep lowest positions across heads:
    # h1:0 (pos 0), h0:1 (pos 1); streamed h0:8, h1:9.
    misses = c.access([a(1, 7, 8), a(0, 9)], now=1)
    assert [m.tolist() for m in misses] == [[1, 8], [0, 9]]
    assert c.resident(0).tolist() == [1, 7] and c.resident(1).tolist() == [0]
    assert (c.hits, c.misses, c.streamed, c.resident_entries) == (1, 5, 2, 3)


def test_zero_capacity_streams_everything():
    c = make(1, 10, 0)
    assert c.access([a(1, 2)], now=0)[0].tolist() == [1, 2]
    c.insert([a(3)], now=0)
    assert c.resident(0).size == 0 and c.streamed == 2 and c.peak_resident_entries == 0


def test_insert_evicts_and_touches():
    c = make(1, 10, 2)
    c.access([a(0, 1)], now=0)
    c.insert([a(1)], now=1)  # already resident: a touch only (LRU refresh)
    assert c.resident_entries == 2
    c.insert([a(2)], now=2)  # evicts 0 (t=0) not 1 (touched t=1)
    assert c.resident(0).tolist() == [1, 2]
    assert (c.hits, c.misses) == (0, 2)  # insert never counts as an access


def test_bad_inputs_raise():
    c = make(2, 10, 4)
    with pytest.raises(ValueError, match="expected 2 heads, got 1"):
        c.access([a(1)], now=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        c.access([a(1, 10), a()], now=0)
    with pytest.raises(ValueError, match="sorted and unique"):
        c.access([a(2, 1), a()], now=0)
    with pytest.raises(ValueError, match="capacity_entries"):
        LayerCache(1, 4, -1, REPLACEMENTS.create("lru"))
    rep = REPLACEMENTS.create("lru")
    LayerCache(1, 4, 1, rep)
    with pytest.raises(ValueError, match="already bound"):
        LayerCache(1, 4, 1, rep)


def test_replacement_registry():
    assert {"lru", "fifo", "lfu", "belady", "cluster_aligned"} <= set(REPLACEMENTS.names())
    with pytest.raises(ConfigError, match="valid: belady, cluster_aligned, fifo"):
        REPLACEMENTS.get("belady-typo")
    with pytest.raises(ConfigError, match="unknown parameter"):
        REPLACEMENTS.create({"type": "lru", "size": 3})


def test_custom_policy_hooks_called_in_order():
    log: list[tuple] = []

    class Spy(ReplacementPolicy):
        def on_access(self, head, positions, now):
            log.append(("access", head, positions.tolist(), now))

        def on_insert(self, head, positions, now):
            log.append(("insert", head, positions.tolist(), now))

        def on_evict(self, flat_idx):
            log.append(("evict", flat_idx.tolist()))

        def victims(self, candidates, n):
            return candidates[-n:]  # most recent flat index: an MRU-ish choice

    c = LayerCache(1, 8, 2, Spy(), check_inputs=True)
    c.access([a(0, 1)], now=0)
    c.access([a(5)], now=1)
    assert log == [
        ("access", 0, [0, 1], 0),
        ("insert", 0, [0, 1], 0),
        ("access", 0, [5], 1),
        ("evict", [1]),
        ("insert", 0, [5], 1),
    ]


def test_default_on_insert_flat_calls_on_insert_per_head():
    log: list[tuple] = []

    class Spy(ReplacementPolicy):
        def on_insert(self, head, positions, now):
            log.append((head, positions.tolist(), now))

        def victims(self, candidates, n):
            return candidates[:n]

    c = LayerCache(3, 10, 30, Spy(), check_inputs=True)
    c.access([a(1, 4), a(), a(0, 9)], now=7)
    c.insert([a(5)] * 3, now=8)
    assert log == [(0, [1, 4], 7), (2, [0, 9], 7), (0, [5], 8), (1, [5], 8), (2, [5], 8)]


@pytest.mark.parametrize("name", REPLACEMENTS.names())
def test_insert_of_one_shared_position_array_matches_separate_arrays(name):
    # The engine inserts the new token as one array shared by every head (a fast path);
    # separate but equal arrays take the general path: same residents and counters.
    rng = np.random.default_rng(5)
    n_heads, prompt, steps = 3, 40, 30
    caches = [make(n_heads, prompt + steps, 25, name) for _ in range(2)]
    ops = []
    for s in range(steps):
        ops.append([np.sort(rng.choice(prompt + s, 6, replace=False)) for _ in range(n_heads)])
        ops.append([np.array([prompt + s])] * n_heads)
    future = [(s // 2, per_head) for s, per_head in enumerate(ops)]
    for i, c in enumerate(caches):
        if c.replacement.needs_future:
            c.observe_future(future)
        for s, per_head in enumerate(ops):
            if s % 2 == 0:
                c.access(per_head, s // 2)
            else:
                c.insert(per_head if i == 0 else [p.copy() for p in per_head], s // 2)
    shared, separate = caches
    for h in range(n_heads):
        assert shared.resident(h).tolist() == separate.resident(h).tolist()
    assert (shared.hits, shared.misses, shared.resident_entries) == (
        separate.hits, separate.misses, separate.resident_entries
    )


# ---------------------------------------------------------------------------- invariants


@st.composite
def workloads(draw):
    n_heads = draw(st.integers(1, 3))
    n_positions = draw(st.integers(1, 40))
    capacity = draw(st.integers(0, n_heads * n_positions))
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["access", "access", "insert"]))
        per_head = [
            np.array(
                sorted(
                    draw(
                        st.sets(
                            st.integers(0, n_positions - 1),
                            max_size=n_positions if kind == "access" else 2,
                        )
                    )
                ),
                dtype=np.int64,
            )
            for _ in range(n_heads)
        ]
        ops.append((kind, per_head))
    return n_heads, n_positions, capacity, ops


@FAST
@pytest.mark.parametrize("name", REPLACEMENTS.names())
@given(w=workloads())
def test_cache_invariants(name, w):
    n_heads, n_positions, capacity, ops = w
    c = make(n_heads, n_positions, capacity, name)
    if c.replacement.needs_future:
        # Offline policies (Belady) are told the run's accesses first, as the engine does.
        c.observe_future([(now, per_head) for now, (_kind, per_head) in enumerate(ops)])
    total_selected = 0
    for now, (kind, per_head) in enumerate(ops):
        before = [set(c.resident(h).tolist()) for h in range(n_heads)]
        streamed_before = c.streamed
        if kind == "access":
            misses = c.access(per_head, now)
            total_selected += sum(p.size for p in per_head)
            for h in range(n_heads):
                # Misses are exactly the selected entries that were not resident.
                assert misses[h].tolist() == sorted(set(per_head[h].tolist()) - before[h])
            after = [set(c.resident(h).tolist()) for h in range(n_heads)]
            selected_resident = sum(
                len(set(p.tolist()) & r) for p, r in zip(per_head, after, strict=True)
            )
            n_selected = sum(p.size for p in per_head)
            # Every selected entry that fit is resident; the rest were streamed.
            assert n_selected - selected_resident == c.streamed - streamed_before
            # Hits are never evicted by the access that uses them.
            for h in range(n_heads):
                assert (set(per_head[h].tolist()) & before[h]) <= after[h]
            if n_selected <= capacity:
                assert c.streamed == streamed_before
        else:
            c.insert(per_head, now)
            n_new = sum(p.size for p in per_head)
            if n_new <= capacity:
                for h in range(n_heads):
                    assert set(per_head[h].tolist()) <= set(c.resident(h).tolist())
        resident = sum(c.resident(h).size for h in range(n_heads))
        assert resident == c.resident_entries <= capacity
        assert c.peak_resident_entries <= capacity
        assert c.hits + c.misses == total_selected


# ---------------------------------------------------------------------------- differential LRU


class ReferenceLRU:
    """Textbook LRU on an OrderedDict (oldest first). One access touches the selected positions in
    ascending order, then evicts from the old end; since the selection fits, no selected entry is
    ever at the old end while something unselected remains."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.od: OrderedDict[int, None] = OrderedDict()

    def access(self, positions: list[int]) -> list[int]:
        misses = [p for p in positions if p not in self.od]
        for p in positions:
            self.od[p] = None
            self.od.move_to_end(p)
        while len(self.od) > self.capacity:
            self.od.popitem(last=False)
        return misses


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_lru_matches_ordereddict_reference(data):
    prompt = data.draw(st.integers(1, 30))
    steps = data.draw(st.integers(1, 30))
    capacity = data.draw(st.integers(1, prompt + steps))
    c = make(1, prompt + steps, capacity)
    ref = ReferenceLRU(capacity)
    for s in range(steps):
        context = prompt + s
        size = data.draw(st.integers(0, min(capacity, context)))
        sel = sorted(data.draw(st.sets(st.integers(0, context - 1), min_size=size, max_size=size)))
        # Engine clock: access then insert of the new token at the same `now`.
        got = c.access([np.array(sel, dtype=np.int64)], now=s)
        assert got[0].tolist() == ref.access(sel)
        c.insert([a(context)], now=s)
        ref.access([context])
        assert c.resident(0).tolist() == sorted(ref.od)
    assert c.streamed == 0


def test_offline_policy_without_future_fails_loudly():
    c = make(1, 8, 1, "belady")
    c.access([a(0)], now=0)
    with pytest.raises(RuntimeError, match="observe_future"):
        c.access([a(1)], now=1)


def test_observe_future_checks_its_input():
    c = make(2, 8, 4, "belady")
    with pytest.raises(ValueError, match="time order"):
        c.observe_future([(1, [a(0), a()]), (0, [a(1), a()])])
    with pytest.raises(ValueError, match="expected 2 heads"):
        c.observe_future([(0, [a(0)])])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        c.observe_future([(0, [a(8), a()])])
    online = make(1, 8, 4, "lru")
    online.observe_future([(0, [a(0)])])  # accepted and ignored by online policies
