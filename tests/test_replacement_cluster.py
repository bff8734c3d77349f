"""Cluster-aligned replacement (DynaKV's cache policy): hand-derived victims (large groups
first, whole groups, the reserved region of recently updated groups), equivalence to LRU
without groups, Belady as its lower bound, and an engine run with groups and splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.errors import ConfigError
from sim.kv.cache import LayerCache
from sim.kv.replacement import REPLACEMENTS
from sim.model import ModelGeometry
from sim.outputs import PolicyPass
from sim.policies.base import HeadSelections, LayerSelection, Relabel
from sim.replay import Replay, SimSetup, simulate

from .conftest import HAND_DEVICE, HandPolicy


def a(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def make(n_positions: int, capacity: int, n_heads: int = 1, **knobs) -> LayerCache:
    rep = REPLACEMENTS.create({"type": "cluster_aligned", **knobs})
    return LayerCache(n_heads, n_positions, capacity, rep, check_inputs=True)


def groups_of(c: LayerCache, sizes: dict[int, list[int]], head: int = 0) -> None:
    """The prompt's clusters, as the engine reports them (now = -1: not an update)."""
    for label, positions in sizes.items():
        c.assign_groups(head, a(*positions), label, -1)


# ---------------------------------------------------------------------------- by hand


def test_knobs_and_registry():
    rep = REPLACEMENTS.create("cluster_aligned")
    assert (rep.recent_steps, rep.reserved_fraction, rep.size_classes) == (16, 0.25, "exact")
    assert rep.uses_groups and not rep.needs_future
    for bad in ({"recent_steps": -1}, {"reserved_fraction": 1.5}, {"size_classes": "big"}):
        with pytest.raises(ConfigError):
            REPLACEMENTS.create({"type": "cluster_aligned", **bad})


def test_large_group_leaves_first_and_whole():
    # Groups A = {0} (size 1), B = {1, 2} (size 2), C = {3..7} (size 5); capacity 8.
    c = make(16, 8)
    groups_of(c, {10: [0], 11: [1, 2], 12: [3, 4, 5, 6, 7]})
    c.access([a(0, 1, 2, 3, 4, 5, 6, 7)], now=0)  # all resident, all last used at 0
    # 5 misses -> 5 victims: the size-5 group C, whole (LRU would take 0..4).
    c.access([a(8, 9, 10, 11, 12)], now=1)
    assert c.resident(0).tolist() == [0, 1, 2, 8, 9, 10, 11, 12]
    # 2 victims among A (size 1, used t0), B (size 2, used t0) and the ungrouped 8..12 (size 1
    # each, used t1): the larger B, whole; A stays although it is the least recently used.
    c.access([a(13, 14)], now=2)
    assert c.resident(0).tolist() == [0, 8, 9, 10, 11, 12, 13, 14]
    # Only groups of one are left: least recent use first (A's 0 at t0), then lowest index.
    c.access([a(15)], now=3)
    assert c.resident(0).tolist() == [8, 9, 10, 11, 12, 13, 14, 15]
    assert c.misses == 16 and c.hits == 0


def test_partial_group_takes_its_least_recent_entries_and_older_group_first():
    # C = {0..4}, D = {5..9}: two groups of 5; capacity 10.
    c = make(16, 10)
    groups_of(c, {1: [0, 1, 2, 3, 4], 2: [5, 6, 7, 8, 9]})
    c.access([a(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)], now=0)
    c.access([a(5)], now=1)  # D used at t1, C last at t0
    # 2 victims: same size, C is the less recently used group; inside C all at t0 -> 0, 1.
    c.access([a(10, 11)], now=2)
    assert c.resident(0).tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    c.access([a(2)], now=3)  # C used at t3, D last at t1
    # 1 victim: from D (older group); inside D: 6..9 at t0, 5 at t1 -> 6.
    c.access([a(12)], now=4)
    assert c.resident(0).tolist() == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12]


def test_recently_updated_group_is_reserved_until_the_fraction_is_exceeded():
    # Capacity 12, reserved 25% -> 3 entries; recent = updated within 2 ticks of the clock.
    c = make(32, 12, recent_steps=2)
    groups_of(c, {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6, 7]})  # A, B, C, D: size 2
    c.access([a(0, 1, 2, 3, 4, 5, 6, 7)], now=0)  # tick 2
    c.assign_groups(0, a(8), 3, now=1)  # token 8 appended to D: size 3, updated at tick 3
    c.insert([a(8)], now=1)
    # tick 4: 4 misses, 3 free -> 1 victim. D is the largest group, but its 3 resident
    # entries fit the 3-entry reserved region: A/B/C tie (size 2, used t0) -> A's 0.
    c.access([a(9, 10, 11, 12)], now=2)
    assert c.resident(0).tolist() == list(range(1, 13))
    c.assign_groups(0, a(13), 3, now=3)  # D grows to 4 members (3 resident): still reserved
    c.insert([a(13)], now=3)  # 1 victim: A's last member 1 (A, B, C tie; A lowest index)
    assert c.resident(0).tolist() == list(range(2, 14))
    c.assign_groups(0, a(14), 3, now=4)  # D: 5 members, 4 resident > 3 -> no longer reserved
    c.insert([a(14)], now=4)  # 1 victim: D, the largest, its least recent entry 6 (t0)
    assert c.resident(0).tolist() == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14]


def test_reserved_group_survives_only_while_recent():
    # Same start as above with a wide window: D (size 3) stays reserved; then, once no
    # longer recent (window of 2 ticks elapsed), it is the first to go.
    c = make(32, 10, recent_steps=2, reserved_fraction=0.3)  # region: 3 entries
    groups_of(c, {0: [0, 1], 1: [2, 3], 3: [6, 7]})
    c.access([a(0, 1, 2, 3, 6, 7)], now=0)
    c.assign_groups(0, a(8), 3, now=1)
    c.insert([a(8)], now=1)  # resident 0 1 2 3 6 7 8 (7)
    c.access([a(9, 10, 11, 12)], now=2)  # 1 victim, D reserved -> A's 0
    assert 6 in c.resident(0) and 0 not in c.resident(0)
    c.access([a(9)], now=3)  # tick advances: D updated 2 ticks ago -> not recent any more
    c.access([a(13)], now=4)  # 1 victim: the largest group D, its least recent entry 6
    assert c.resident(0).tolist() == [1, 2, 3, 7, 8, 9, 10, 11, 12, 13]


def test_reserved_entries_go_when_nothing_else_is_left():
    c = make(16, 4, reserved_fraction=0.5)  # region: 2 entries
    groups_of(c, {0: [0, 1]})
    c.access([a(0, 1)], now=0)
    c.assign_groups(0, a(2), 0, now=1)
    c.insert([a(2)], now=1)  # G = {0, 1, 2}: 3 resident > 2, not reserved
    c.assign_groups(0, a(3), 5, now=2)
    c.insert([a(3)], now=2)  # H = {3}: reserved (1 entry)
    # 2 misses, 0 free: candidates are G's 0, 1 (2 selected) and H's 3 -> G first (0, 1)...
    c.access([a(2, 4, 5)], now=3)
    assert c.resident(0).tolist() == [2, 3, 4, 5]
    # ...then only H's reserved 3 is not selected: it goes.
    c.access([a(2, 4, 5, 6)], now=4)
    assert c.resident(0).tolist() == [2, 4, 5, 6]


def test_split_moves_members_and_sizes():
    # A split (relabel) moves 3 of C's 5 members to a new group E: C has 2 members, E 3.
    c = make(16, 7, reserved_fraction=0.0)
    groups_of(c, {1: [0, 1], 2: [2, 3, 4, 5, 6]})
    c.access([a(0, 1, 2, 3, 4, 5, 6)], now=0)
    c.assign_groups(0, a(2, 3, 4), 9, now=1)  # C = {5, 6}, E = {2, 3, 4}
    c.access([a(7, 8, 9)], now=2)  # 3 victims: E (largest), whole
    assert c.resident(0).tolist() == [0, 1, 5, 6, 7, 8, 9]


def test_groups_are_per_head_and_spread_over_heads():
    c = make(8, 6, n_heads=2, reserved_fraction=0.0)
    groups_of(c, {0: [0, 1, 2]}, head=0)  # head 0: a group of 3
    groups_of(c, {0: [0]}, head=1)  # the same label in head 1 is another group, of 1
    c.access([a(0, 1, 2), a(0, 1, 2)], now=0)  # head 1: 1, 2 ungrouped
    c.access([a(), a(5, 6, 7)], now=1)  # 3 victims: head 0's group of 3, whole
    assert c.resident(0).tolist() == [] and c.resident(1).tolist() == [0, 1, 2, 5, 6, 7]


# ---------------------------------------------------------------------------- LRU equivalence


@st.composite
def multi_head_ops(draw):
    n_heads = draw(st.integers(1, 3))
    n_positions = draw(st.integers(2, 30))
    capacity = draw(st.integers(1, n_heads * n_positions))
    ops = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["access", "access", "insert"]))
        per_head = [
            a(*sorted(draw(st.sets(st.integers(0, n_positions - 1),
                                   max_size=n_positions if kind == "access" else 2))))
            for _ in range(n_heads)
        ]
        ops.append((kind, per_head))
    return n_heads, n_positions, capacity, ops


def replay(c: LayerCache, ops) -> list:
    trail = []
    for now, (kind, per_head) in enumerate(ops):
        if kind == "access":
            trail.append([m.tolist() for m in c.access(per_head, now)])
        else:
            c.insert(per_head, now)
        trail.append([c.resident(h).tolist() for h in range(c.n_heads)])
    return trail


@settings(max_examples=80, deadline=None)
@given(w=multi_head_ops(), singletons=st.booleans())
def test_without_groups_it_is_lru(w, singletons):
    """No groups (fast path), or every entry labelled its own group at the prompt (the general
    path): the same misses and residents as LRU after every operation."""
    n_heads, n_positions, capacity, ops = w
    lru = LayerCache(n_heads, n_positions, capacity, REPLACEMENTS.create("lru"))
    ca = make(n_positions, capacity, n_heads=n_heads)
    if singletons:
        for h in range(n_heads):
            ca.assign_groups(h, np.arange(n_positions), np.arange(n_positions) + 7, -1)
    assert replay(ca, ops) == replay(lru, ops)
    assert (ca.hits, ca.misses, ca.streamed) == (lru.hits, lru.misses, lru.streamed)


# ---------------------------------------------------------------------------- Belady bound


@st.composite
def grouped_runs(draw):
    """Decode-like single-head runs with groups: the prompt's clusters, each new token joining
    a cluster (an update), the odd split; every selection fits the cache."""
    capacity = draw(st.integers(2, 8))
    prompt = draw(st.integers(1, 12))
    n_groups = draw(st.integers(1, 4))
    labels = draw(st.lists(st.integers(0, n_groups - 1), min_size=prompt, max_size=prompt))
    steps = []
    context = prompt
    for _ in range(draw(st.integers(1, 25))):
        size = draw(st.integers(1, capacity - 1))
        sel = sorted(draw(st.sets(st.integers(0, context - 1), min_size=1, max_size=size)))
        group = draw(st.integers(0, n_groups))
        split = None
        if draw(st.integers(0, 4)) == 0:
            moved = sorted(draw(st.sets(st.integers(0, context), min_size=1, max_size=3)))
            split = (moved, draw(st.integers(n_groups + 1, n_groups + 3)))
        steps.append((sel, group, split))
        context += 1
    return capacity, prompt, labels, steps, draw(st.sampled_from(["exact", "log2"]))


def run_grouped(name: str, run, **knobs) -> int:
    capacity, prompt, labels, steps, _ = run
    n_positions = prompt + len(steps)
    rep = REPLACEMENTS.create({"type": name, **knobs})
    c = LayerCache(1, n_positions, capacity, rep, check_inputs=True)
    if rep.needs_future:
        future = []
        for s, (sel, _group, _split) in enumerate(steps):
            future += [(s, [a(*sel)]), (s, [a(prompt + s)])]
        c.observe_future(future)
    if rep.uses_groups:
        c.assign_groups(0, np.arange(prompt), np.array(labels), -1)
    for s, (sel, group, split) in enumerate(steps):
        c.access([a(*sel)], s)
        if rep.uses_groups:  # the engine's order: append's group, splits, then the insert
            c.assign_groups(0, a(prompt + s), group, s)
            if split is not None:
                c.assign_groups(0, a(*split[0]), split[1], s)
        c.insert([a(prompt + s)], s)
    assert c.streamed == 0
    return c.misses


@settings(max_examples=150, deadline=None)
@given(run=grouped_runs())
def test_belady_stays_the_lower_bound(run):
    knobs = {"size_classes": run[-1]}
    ca = run_grouped("cluster_aligned", run, **knobs)
    assert run_grouped("belady", run) <= ca
    assert run_grouped("belady", run) <= run_grouped("cluster_aligned", run,
                                                     reserved_fraction=1.0, recent_steps=3)


# ---------------------------------------------------------------------------- engine




@pytest.mark.parametrize("layout", ["sequence", "cluster"])
def test_engine_run_with_groups_appends_and_splits(layout):
    # 2 simulated layers x 2 KV heads from a 1-layer x 2-head trace: prompt of 24 in 4
    # clusters of sizes 2, 4, 6, 12; 10 decode steps, each new token joins a cluster; a split
    # at step 3 moves half of the 12-cluster to a new cluster 9.
    rng = np.random.default_rng(3)
    prompt, steps, capacity_entries = 24, 10, 12
    model = ModelGeometry("t", n_layers=1, n_q_heads=2, n_kv_heads=2, head_dim=4,
                          params_per_layer=1000)
    target = ModelGeometry("s", n_layers=2, n_q_heads=2, n_kv_heads=2, head_dim=4,
                           params_per_layer=1000)
    labels = np.repeat([0, 1, 2, 3], [2, 4, 6, 12]).astype(np.int32)
    heads = [
        HeadSelections.from_lists(
            [np.sort(rng.choice(prompt + s, 5, replace=False)).astype(np.int32)
             for s in range(steps)]
        )
        for _ in range(2)
    ]
    split = Relabel(step=3, positions=np.arange(12, 18), group=9)
    layer = LayerSelection(
        heads=heads, index_vectors=np.zeros((2, steps), np.int64),
        prefill_groups=np.stack([labels, labels[::-1]]),
        append_groups=rng.integers(0, 4, size=(2, steps)).astype(np.int32),
        relabels=[[split], []],
    )
    pp = PolicyPass(HandPolicy(), prompt, steps, model, [layer], pd.DataFrame(), 0.0)
    misses = {}
    for name in ("cluster_aligned", "lru", "belady"):
        setup = SimSetup(device=HAND_DEVICE, target=target, kv_dtype="fp16",
                         cache_capacity_bytes=capacity_entries * 16 * target.n_layers,
                         replacement={"type": name}, layout={"type": layout})
        replay_ = Replay(pp, setup)
        replay_.env.process(replay_.decode(None))
        replay_.env.run()
        for cache in replay_.run.caches:
            assert cache.peak_resident_entries <= capacity_entries
        if name == "cluster_aligned":
            rep = replay_.run.caches[0].replacement
            gid = rep._gid_rows[0]
            # the split's members share a new group, apart from the rest of cluster 3
            assert len(set(gid[12:18].tolist())) == 1 and gid[12] != gid[18]
            assert rep._gsize[gid[12]] == 6
        result = simulate(pp, setup)
        assert result.totals["peak_cache_bytes"] <= capacity_entries * 16 * target.n_layers
        steps_df = result.steps
        assert steps_df["hits"].sum() + steps_df["misses"].sum() == 2 * 2 * 5 * steps
        misses[name] = int(steps_df["misses"].sum())
    assert misses["cluster_aligned"] > 0
    assert misses["belady"] <= min(misses["cluster_aligned"], misses["lru"])


# ---------------------------------------------------------------------------- batched hooks


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n_heads=st.integers(1, 4), n_positions=st.integers(2, 20))
def test_assign_group_heads_is_assign_group_per_head(data, n_heads, n_positions):
    """The engine's batched append bookkeeping (all heads at once) leaves the same state and
    the same later victims as assign_group head by head: positions with or without a group,
    resident or not, labels old and new, the same label twice."""
    capacity = data.draw(st.integers(1, n_heads * n_positions))
    caches = [make(n_positions, capacity, n_heads=n_heads) for _ in range(2)]
    for now in range(data.draw(st.integers(1, 25))):
        kind = data.draw(st.sampled_from(["access", "assign", "assign", "split"]))
        if kind == "access":
            per_head = [
                a(*sorted(data.draw(st.sets(st.integers(0, n_positions - 1), max_size=5))))
                for _ in range(n_heads)
            ]
            trails = [[m.tolist() for m in c.access(per_head, now)] for c in caches]
            assert trails[0] == trails[1]
        elif kind == "assign":
            position = data.draw(st.integers(0, n_positions - 1))
            groups = data.draw(st.lists(st.integers(0, 4), min_size=n_heads, max_size=n_heads))
            caches[0].assign_group_heads(position, groups, now)
            for head, group in enumerate(groups):
                caches[1].assign_group(head, position, group, now)
        else:
            head = data.draw(st.integers(0, n_heads - 1))
            moved = a(*sorted(data.draw(st.sets(st.integers(0, n_positions - 1), min_size=1))))
            label = data.draw(st.integers(0, 6))
            for c in caches:
                c.assign_groups(head, moved, label, now)
        states = [
            [getattr(c.replacement, name).tolist()
             for name in ("_gid", "_gsize", "_gres", "_glast", "_gupd", "_stamp", "_res")]
            + [c.replacement._gid_of, c.replacement._has_groups, c.replacement._tick]
            for c in caches
        ]
        assert states[0] == states[1]
