"""LFU and Belady (MIN) replacement: hand-derived victims, the textbook OPT figure, MIN as the
lower bound of every other policy, and a differential + exhaustive-search check of Belady."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.kv.cache import LayerCache
from sim.kv.replacement import REPLACEMENTS
from sim.model import ModelGeometry
from sim.outputs import PolicyPass
from sim.policies.base import HeadSelections, LayerSelection
from sim.replay import Replay, SimSetup, simulate

from .conftest import HAND_DEVICE, HandPolicy


def a(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def make(n_positions: int, capacity: int, name: str, n_heads: int = 1) -> LayerCache:
    return LayerCache(
        n_heads, n_positions, capacity, REPLACEMENTS.create(name), check_inputs=True
    )


Op = tuple[str, list[int]]  # ("access" | "insert", sorted positions), single head


def run_ops(name: str, ops: list[Op], capacity: int, n_positions: int) -> tuple[int, list]:
    """Replay single-head ``ops`` at now = 0, 1, ...; misses and resident set after each op."""
    c = make(n_positions, capacity, name)
    if c.replacement.needs_future:
        c.observe_future([(now, [a(*pos)]) for now, (_kind, pos) in enumerate(ops)])
    residents = []
    for now, (kind, pos) in enumerate(ops):
        if kind == "access":
            c.access([a(*pos)], now)
        else:
            c.insert([a(*pos)], now)
        residents.append(c.resident(0).tolist())
    assert c.streamed == 0
    return c.misses, residents


# ---------------------------------------------------------------------------- LFU by hand


def test_lfu_exact_victims():
    # capacity 3; (count since insertion, last use) per entry in the comments.
    ops: list[Op] = [
        ("access", [0, 1, 2]),  # t0: 0:(1,0) 1:(1,0) 2:(1,0)
        ("access", [0, 1]),  # t1: 0:(2,1) 1:(2,1)
        ("access", [1]),  # t2: 1:(3,2)
        ("access", [3]),  # t3: candidates 0:(2,1) 1:(3,2) 2:(1,0) -> evict 2
        ("access", [2]),  # t4: 0:(2,1) 1:(3,2) 3:(1,3) -> evict 3 (LRU would evict 0)
        ("access", [0]),  # t5: 0:(3,5)
        ("access", [4]),  # t6: 0:(3,5) 1:(3,2) 2:(1,4) -> evict 2
        ("access", [5, 6]),  # t7: 4:(1,6) first, then count tie 0/1 -> less recent 1
        ("access", [7]),  # t8: 0:(3,5) 5:(1,7) 6:(1,7) -> full tie -> lowest index 5
        ("insert", [8]),  # t9: 0:(3,5) 6:(1,7) 7:(1,8) -> evict 6
        ("access", [5]),  # t10: 0:(3,5) 7:(1,8) 8:(1,9) -> evict 7
        ("access", [9]),  # t11: 0:(3,5) 5:(1,10) 8:(1,9) -> evict 8
        ("access", [1]),  # t12: 0:(3,5) 5:(1,10) 9:(1,11) -> evict 5; 1 restarts at (1,12)
        ("access", [9]),  # t13: 9:(2,13)
        ("access", [2]),  # t14: 0:(3,5) 1:(1,12) 9:(2,13) -> evict 1 (its old count 3 is gone)
    ]
    _, residents = run_ops("lfu", ops, capacity=3, n_positions=10)
    victims = [
        sorted(set(before) - set(after))
        for before, after in zip([[]] + residents[:-1], residents, strict=True)
    ]
    assert victims == [[], [], [], [2], [3], [], [2], [1, 4], [5], [6], [7], [8], [5], [], [1]]
    assert residents[-1] == [0, 2, 9]


def test_lfu_spreads_over_heads_and_counts_insert_touches():
    c = make(8, 3, "lfu", n_heads=2)
    c.access([a(0), a(0, 1)], now=0)  # h0:0 (1,0), h1:0 (1,0), h1:1 (1,0)
    c.insert([a(), a(1)], now=1)  # already resident: a use -> h1:1 (2,1)
    c.access([a(0), a()], now=2)  # h0:0 (2,2)
    c.access([a(), a(5)], now=3)  # candidates h0:0 (2,2), h1:0 (1,0), h1:1 (2,1) -> h1:0
    assert c.resident(0).tolist() == [0] and c.resident(1).tolist() == [1, 5]


# ---------------------------------------------------------------------------- Belady by hand

# Silberschatz, Galvin & Gagne, "Operating System Concepts", the page-replacement chapter:
# reference string with 3 frames gives 15 faults under FIFO, 12 under LRU and 9 under OPT.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def test_belady_textbook_reference_string():
    ops: list[Op] = [("access", [p]) for p in TEXTBOOK]
    figures = {name: run_ops(name, ops, capacity=3, n_positions=8)[0]
               for name in ("belady", "lru", "fifo")}
    assert figures == {"belady": 9, "lru": 12, "fifo": 15}
    _, residents = run_ops("belady", ops, capacity=3, n_positions=8)
    # The textbook's OPT frames after the last fault (reference 17: 7 replaces 2).
    assert residents[-1] == [0, 1, 7]


def test_belady_evicts_never_used_again_first_then_farthest():
    ops: list[Op] = [
        ("access", [0, 1, 2, 3]),
        ("access", [4]),  # 2 is never used again -> evicted; 0, 1, 3 are
        ("access", [5]),  # next uses: 0 at t4, 1 at t3, 3 at t5, 4 never -> 4
        ("access", [1]),
        ("access", [0]),
        ("access", [3, 5]),
    ]
    misses, residents = run_ops("belady", ops, capacity=4, n_positions=8)
    assert residents[1] == [0, 1, 3, 4] and residents[2] == [0, 1, 3, 5]
    assert misses == 6


def test_belady_ties_go_to_lowest_flat_index():
    ops: list[Op] = [("access", [0, 1, 2]), ("access", [3]), ("access", [4])]
    _, residents = run_ops("belady", ops, capacity=3, n_positions=8)
    assert residents == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]  # all never used again


# ---------------------------------------------------------------------------- references


def reference_min(ops: list[Op], capacity: int) -> tuple[int, list[list[int]]]:
    """Pure-Python MIN with the cache's semantics: an access admits its misses, an insert its
    new positions; victims are the non-selected residents used farthest in the future (never
    first), ties to the lowest position. Next uses are found by scanning the remaining ops."""
    resident: set[int] = set()
    misses = 0
    residents = []
    for t, (kind, pos) in enumerate(ops):
        new = [p for p in pos if p not in resident]
        if kind == "access":
            misses += len(new)
        excess = len(resident) + len(new) - capacity
        if excess > 0:

            def next_use(p: int, t: int = t) -> float:
                for u in range(t + 1, len(ops)):
                    if p in ops[u][1]:
                        return u
                return float("inf")

            candidates = sorted(resident - set(pos), key=lambda p: (-next_use(p), p))
            resident -= set(candidates[:excess])
        resident |= set(new)
        residents.append(sorted(resident))
    return misses, residents


def optimal_misses(ops: list[Op], capacity: int) -> int:
    """The fewest misses of *any* replacement (exhaustive search over every choice of victims,
    every miss admitted): an independent lower bound, for tiny inputs only."""
    states: dict[frozenset[int], int] = {frozenset(): 0}
    for kind, pos in ops:
        selected = frozenset(pos)
        following: dict[frozenset[int], int] = {}
        for resident, misses in states.items():
            new = selected - resident
            if kind == "access":
                misses += len(new)
            excess = len(resident) + len(new) - capacity
            choices = (
                itertools.combinations(sorted(resident - selected), excess)
                if excess > 0
                else [()]
            )
            for evicted in choices:
                state = (resident - frozenset(evicted)) | new
                if misses < following.get(state, 1 << 30):
                    following[state] = misses
        states = following
    return min(states.values())


@st.composite
def single_head_runs(draw, max_prompt: int = 12, max_steps: int = 30):
    """Decode-like runs: each step accesses fewer positions than the capacity among those that
    exist, then (usually) inserts a new position, which later steps may access."""
    capacity = draw(st.integers(2, 6))
    context = draw(st.integers(1, max_prompt))
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, max_steps))):
        size = draw(st.integers(1, capacity - 1))
        pos = draw(st.sets(st.integers(0, context - 1), min_size=1, max_size=size))
        ops.append(("access", sorted(pos)))
        if draw(st.integers(0, 3)):
            ops.append(("insert", [context]))
            context += 1
    return capacity, context, ops


@settings(max_examples=150, deadline=None)
@given(run=single_head_runs())
def test_belady_is_the_lower_bound_and_matches_the_reference(run):
    capacity, n_positions, ops = run
    results = {
        name: run_ops(name, ops, capacity, n_positions)
        for name in ("belady", "lru", "lfu", "fifo")
    }
    belady_misses, belady_residents = results["belady"]
    for name in ("lru", "lfu", "fifo"):
        assert belady_misses <= results[name][0], name
    ref_misses, ref_residents = reference_min(ops, capacity)
    assert belady_misses == ref_misses
    assert belady_residents == ref_residents


@settings(max_examples=60, deadline=None)
@given(run=single_head_runs(max_prompt=5, max_steps=8))
def test_belady_equals_exhaustive_optimum(run):
    capacity, n_positions, ops = run
    assert run_ops("belady", ops, capacity, n_positions)[0] == optimal_misses(ops, capacity)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_belady_lower_bound_over_heads(data):
    # Several heads share the capacity: each (head, position) is one entry to MIN.
    n_heads, n_positions = data.draw(st.integers(2, 3)), 8
    capacity = data.draw(st.integers(n_heads, 3 * n_heads))
    ops = []
    for _ in range(data.draw(st.integers(1, 25))):
        per_head = [
            data.draw(st.sets(st.integers(0, n_positions - 1), max_size=capacity // n_heads))
            for _ in range(n_heads)
        ]
        ops.append([a(*sorted(p)) for p in per_head])
    misses = {}
    for name in REPLACEMENTS.names():
        c = make(n_positions, capacity, name, n_heads=n_heads)
        if c.replacement.needs_future:
            c.observe_future(list(enumerate(ops)))
        for now, per_head in enumerate(ops):
            c.access(per_head, now)
        misses[name] = c.misses
    assert misses["belady"] == min(misses.values())


def test_belady_tolerates_a_future_that_does_not_happen():
    c = make(8, 2, "belady")
    c.observe_future([(0, [a(0, 1)]), (1, [a(2)]), (2, [a(0)])])
    c.access([a(0, 1)], 0)
    c.access([a(3)], 1)  # not the observed access: still a valid choice (1: never used again)
    c.access([a(4)], 5)  # now beyond the observed run: every entry "never used again"
    assert c.resident(0).tolist() == [3, 4]


# ---------------------------------------------------------------------------- engine




@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), capacity_entries=st.integers(4, 40))
def test_engine_belady_misses_no_more_than_lru(seed, capacity_entries):
    # 2 simulated layers x 3 KV heads replaying a 2-layer x 2-head trace (head 2 -> trace head 0).
    rng = np.random.default_rng(seed)
    prompt, steps = 24, 12
    trace_model = ModelGeometry("t", n_layers=2, n_q_heads=2, n_kv_heads=2, head_dim=4,
                                params_per_layer=1000)
    target = ModelGeometry("s", n_layers=2, n_q_heads=3, n_kv_heads=3, head_dim=4,
                           params_per_layer=1000)
    layers = []
    for _layer in range(trace_model.n_layers):
        heads = []
        for _head in range(trace_model.n_kv_heads):
            per_step = []
            for s in range(steps):
                size = int(rng.integers(1, max(2, capacity_entries // 3)))
                chosen = rng.choice(prompt + s, size=min(size, prompt + s), replace=False)
                per_step.append(np.sort(chosen).astype(np.int32))
            heads.append(HeadSelections.from_lists(per_step))
        layers.append(LayerSelection(heads=heads, index_vectors=np.zeros((2, steps), np.int64)))
    pp = PolicyPass(HandPolicy(), prompt, steps, trace_model, layers, pd.DataFrame(), 0.0)
    totals = {}
    for name in ("belady", "lru", "lfu", "fifo"):
        setup = SimSetup(device=HAND_DEVICE, target=target, kv_dtype="fp16",
                         cache_capacity_bytes=capacity_entries * 16 * target.n_layers,
                         replacement={"type": name}, layout={"type": "sequence"})
        result = simulate(pp, setup)
        assert result.steps["streamed"].sum() == 0  # selections fit: MIN is the lower bound
        totals[name] = result.steps["misses"].sum()
    assert totals["belady"] <= min(totals["lru"], totals["lfu"], totals["fifo"])


def test_engine_future_is_exactly_what_the_replay_does():
    # Each observed use is consumed once: at the end every entry's pointer is on its sentinel,
    # so the future the engine builds matches the replay's accesses and inserts one for one.
    rng = np.random.default_rng(7)
    prompt, steps = 30, 6
    model = ModelGeometry("t", n_layers=2, n_q_heads=2, n_kv_heads=2, head_dim=4,
                          params_per_layer=1000)
    target = ModelGeometry("s", n_layers=3, n_q_heads=3, n_kv_heads=3, head_dim=4,
                           params_per_layer=1000)
    heads = [
        HeadSelections.from_lists(
            [np.sort(rng.choice(prompt + s, 5, replace=False)).astype(np.int32)
             for s in range(steps)]
        )
        for _ in range(2)
    ]
    layer = LayerSelection(heads=heads, index_vectors=np.zeros((2, steps), np.int64))
    pp = PolicyPass(HandPolicy(), prompt, steps, model, [layer, layer], pd.DataFrame(), 0.0)
    setup = SimSetup(device=HAND_DEVICE, target=target, kv_dtype="fp16",
                     cache_capacity_bytes=20 * 16 * target.n_layers,
                     replacement={"type": "belady"}, layout={"type": "sequence"})
    replay = Replay(pp, setup)
    replay.env.process(replay.decode(None))
    replay.env.run()
    for cache in replay.run.caches:
        belady = cache.replacement
        assert (belady.next_use_rank(np.arange(3 * (prompt + steps))) == belady._never).all()
        assert cache.misses > 0
