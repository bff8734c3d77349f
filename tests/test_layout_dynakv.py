"""DynaKV's continuity-centric flash management (arXiv 2511.07427, Technique 2): co-retrieval
measurement, the intra_inter and dual_head layouts and the page-aligned write buffer.

Hand cases have their numbers derived in comments; hypothesis checks the invariants (slots a
bijection, every rewrite reported, dual_head groups contiguous in slot order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.kv.layouts import LAYOUTS
from sim.kv.layouts.coretrieval import coretrieval_chain
from sim.kv.layouts.dual_head import DualHeadLayout
from sim.kv.layouts.intra_inter import IntraInterLayout
from sim.outputs import PolicyPass
from sim.policies import POLICIES
from sim.policies.base import HeadSelections, LayerContext, LayerSelection
from sim.replay import Replay, SimSetup

from .conftest import HAND_DEVICE, HandPolicy
from .test_engine import MODEL

FAST = settings(max_examples=80, deadline=None)


# ---------------------------------------------------------------------------- intra_inter

# Symmetric counts: the most co-retrieved pair is (0, 3) = 5 -> chain [0, 3]; from 3 the
# unplaced 1 (0) and 2 (2) -> 2; from 2 -> 1 (4): order 0, 3, 2, 1.
CORE = np.array([[9, 1, 0, 5], [1, 9, 4, 0], [0, 4, 9, 2], [5, 0, 2, 9]])
GROUPS = np.array([3, 0, 1, 2, 0, 3, 1, 2])  # 0: {1, 4}, 1: {2, 6}, 2: {3, 7}, 3: {0, 5}


def test_chain_follows_coretrieval():
    assert coretrieval_chain(GROUPS, CORE).tolist() == [0, 3, 2, 1]


def test_chain_restarts_from_the_best_unplaced_pair():
    # (1, 3) = 3 first; 3 was never retrieved with 0 or 2 -> the best unplaced pair (0, 2) = 2.
    core = np.zeros((4, 4), int)
    core[1, 3] = core[3, 1] = 3
    core[0, 2] = core[2, 0] = 2
    assert coretrieval_chain(GROUPS, core).tolist() == [1, 3, 0, 2]
    # nothing co-retrieved at all: ascending labels
    assert coretrieval_chain(GROUPS, np.eye(4, dtype=int)).tolist() == [0, 1, 2, 3]


def test_chain_without_a_usable_matrix_is_cluster_order():
    assert coretrieval_chain(GROUPS, None).tolist() == [3, 0, 1, 2]  # by smallest position
    # a label outside the matrix (-1 or >= 4): fall back too
    assert coretrieval_chain(np.array([-1, 0, -1]), CORE).tolist() == [-1, 0]
    assert coretrieval_chain(np.array([5, 0]), CORE).tolist() == [5, 0]


def test_intra_inter_slots():
    # Order 0, 3, 2, 1: group 0 {1, 4} -> slots 0, 1; 3 {0, 5} -> 2, 3; 2 {3, 7} -> 4, 5;
    # 1 {2, 6} -> 6, 7.
    lay = IntraInterLayout(n_positions=10)
    lay.place_prefill(8, GROUPS, coretrieval=CORE)
    assert lay.slots(np.arange(8)).tolist() == [2, 0, 6, 4, 1, 3, 7, 5]
    assert lay.place_append(8, 1) == 8  # the append log, as `cluster`
    # without co-retrieval: `cluster`'s layout
    plain = LAYOUTS.get("cluster")(n_positions=10)
    plain.place_prefill(8, GROUPS)
    lay = IntraInterLayout(n_positions=10)
    lay.place_prefill(8, GROUPS)
    assert lay.slots(np.arange(8)).tolist() == plain.slots(np.arange(8)).tolist()


# ---------------------------------------------------------------------------- dual_head by hand


def test_dual_head_pair_grows_toward_each_other():
    # Groups 0 {0, 2, 4} and 1 {1, 3}, co-retrieved -> one pool; pool_entries = 3 x 2.0 = 6,
    # pool of 12 slots: group 0 up from 0 (slots 0, 1, 2), group 1 down from 11 (11, 10).
    lay = DualHeadLayout(n_positions=20, pool_slack=2.0)
    lay.place_prefill(5, np.array([0, 1, 0, 1, 0]), coretrieval=np.array([[3, 2], [2, 3]]))
    assert lay.slots(np.arange(5)).tolist() == [0, 11, 1, 10, 2]
    for position, group, slot in [(5, 0, 3), (6, 1, 9), (7, 0, 4), (8, 1, 8)]:
        assert lay.place_append(position, group) == slot
        assert lay.due_writes(slot).tolist() == [slot]  # nothing else moves
    assert lay.group_slots(0).tolist() == [0, 1, 2, 3, 4]
    assert lay.group_slots(1).tolist() == [11, 10, 9, 8]


def test_dual_head_full_pool_relocates_the_appending_group():
    # pool_entries = 3, pool of 6: group 0 at 0, 1, 2 and group 1 at 5, 4; position 5 (group
    # 1) takes slot 3, the last free one.
    lay = DualHeadLayout(n_positions=20)
    lay.place_prefill(5, np.array([0, 1, 0, 1, 0]), coretrieval=np.array([[3, 2], [2, 3]]))
    assert lay.place_append(5, 1) == 3
    assert lay.due_writes(3).tolist() == [3]
    # Position 6 (group 0): pool full -> group 0 (3 entries + the new one = 4) moves to a new
    # pool of max(2 x 3, 2 x 4) = 8 slots from 6: entries 0, 2, 4 -> 6, 7, 8, the new one 9.
    slot = lay.place_append(6, 0)
    assert slot == 9
    assert lay.due_writes(slot).tolist() == [6, 7, 8, 9]
    assert lay.slots(np.arange(7)).tolist() == [6, 5, 7, 4, 8, 3, 9]
    # Group 1 now grows into the freed space of the first pool: slot 2, then 1.
    assert lay.place_append(7, 1) == 2
    assert lay.due_writes(2).tolist() == [2]
    assert lay.group_slots(1).tolist() == [5, 4, 3, 2]


def test_dual_head_relabel_moves_exactly_the_split_half():
    # No co-retrieval: cluster order pairs (0, 1); pool_entries = 4, pool of 8: group 0 at
    # 0..3 (positions 0..3), group 1 at 7, 6 (positions 4, 5).
    lay = DualHeadLayout(n_positions=20)
    lay.place_prefill(6, np.array([0, 0, 0, 0, 1, 1]))
    assert lay.slots(np.arange(6)).tolist() == [0, 1, 2, 3, 7, 6]
    # Split: positions 1, 3 become group 9. No pool has a vacant head -> a new pool of 8 from
    # 8: slots 8, 9. Only they are rewritten; positions 0, 2 stay at slots 0, 2.
    assert lay.relabel(np.array([3, 1]), 9).tolist() == [8, 9]
    assert lay.slots(np.arange(6)).tolist() == [0, 8, 2, 9, 7, 6]
    # Appends: group 9 next to its entries (10), group 0 at its head's frontier (4).
    assert lay.place_append(6, 9) == 10
    assert lay.place_append(7, 0) == 4
    # Split of group 1: position 4 -> group 10 (one entry). Pool 2 (start 8, cap 8) has a
    # vacant high head and 5 free slots (11..15) >= 2 x 1: slot 15.
    assert lay.relabel(np.array([4]), 10).tolist() == [15]
    _assert_contiguous(lay, {0: [0, 2, 7], 1: [5], 9: [1, 3, 6], 10: [4]})


def test_dual_head_relabel_into_an_existing_group_rewrites_it_whole():
    lay = DualHeadLayout(n_positions=20)
    lay.place_prefill(6, np.array([0, 0, 0, 0, 1, 1]))
    # group 1 {4, 5} gains position 0: group 1 leaves its head; {0, 4, 5} go to a new pool
    # (start 8) in position order: 8, 9, 10.
    assert lay.relabel(np.array([0]), 1).tolist() == [8, 9, 10]
    _assert_contiguous(lay, {0: [1, 2, 3], 1: [0, 4, 5]})


def test_dual_head_without_groups_is_sequence():
    lay = DualHeadLayout(n_positions=5)
    lay.place_prefill(3, None)
    assert lay.place_append(3, None) == 3
    assert lay.due_writes(3).tolist() == [3]
    assert lay.relabel(np.array([0]), 4).size == 0


def test_dual_head_parameters_are_validated():
    for bad in ({"pool_slack": 0}, {"write_buffer_groups": -1}, {"entry_bytes": 0}):
        with pytest.raises(ValueError):
            DualHeadLayout(n_positions=4, **bad)
    lay = DualHeadLayout(n_positions=4, write_buffer_groups=1)  # sizes not given
    with pytest.raises(ValueError, match="entry_bytes and page_bytes"):
        lay.place_prefill(2, np.array([0, 1]))


# ---------------------------------------------------------------------------- write buffer


def test_write_buffer_holds_a_hot_group_until_a_page_is_full():
    # 1024 B entries, 4096 B pages: 4 entries per page. Row sums 5 and 3: group 0 is the one
    # hot group. pool_entries = 2 x 4 = 8, pool of 16: group 0 at 0, 1; group 1 at 15, 14.
    lay = DualHeadLayout(n_positions=20, pool_slack=4.0, write_buffer_groups=1,
                         entry_bytes=1024, page_bytes=4096)
    lay.place_prefill(4, np.array([0, 1, 0, 1]), coretrieval=np.array([[4, 1], [1, 2]]))
    for position, held in [(4, 1), (5, 2), (6, 3)]:
        slot = lay.place_append(position, 0)
        assert lay.due_writes(slot).size == 0 and lay.buffered_entries == held
    # a cold group writes at once, the buffer keeps its 3 entries
    assert lay.due_writes(lay.place_append(7, 1)).tolist() == [13]
    assert lay.buffered_entries == 3
    # the 4th entry of group 0 fills a page: its 4 slots (2..5) are written, buffer empty
    assert lay.due_writes(lay.place_append(8, 0)).tolist() == [2, 3, 4, 5]
    assert lay.buffered_entries == 0


def test_split_writes_the_buffered_entries_it_moves():
    lay = DualHeadLayout(n_positions=20, pool_slack=4.0, write_buffer_groups=1,
                         entry_bytes=1024, page_bytes=4096)
    lay.place_prefill(4, np.array([0, 1, 0, 1]), coretrieval=np.array([[4, 1], [1, 2]]))
    for position in (4, 5):
        lay.due_writes(lay.place_append(position, 0))
    # positions 0 and 5 (buffered) move to group 7: a new pool from 16, slots 16, 17
    assert lay.relabel(np.array([0, 5]), 7).tolist() == [16, 17]
    assert lay.buffered_entries == 1  # position 4 stays buffered


def test_engine_fills_the_entry_and_page_sizes():
    # 16 B entries, 4096 B pages: 256 entries per page, so two decode appends of the hot group
    # 0 stay in DRAM: no write command at all (pool_slack 2: its pool of 16 has room).
    heads = [HeadSelections.from_lists([np.array([0, 1], np.int32)] * 2)]
    selection = LayerSelection(
        heads=heads, index_vectors=np.ones((1, 2), np.int64),
        prefill_groups=np.array([[0, 0, 0, 0, 1, 1, 1, 1]], np.int32),
        append_groups=np.zeros((1, 2), np.int32),
        coretrieval=[np.array([[5, 1], [1, 2]])],
    )
    pp = PolicyPass(HandPolicy(), 8, 2, MODEL, [selection], pd.DataFrame(), 0.0)
    setup = SimSetup(device=HAND_DEVICE, target=MODEL, kv_dtype="fp16", cache_capacity_bytes=0,
                     replacement={"type": "lru"},
                     layout={"type": "dual_head", "write_buffer_groups": 1,
                             "pool_slack": 2.0})
    replay = Replay(pp, setup)
    layout = replay.run.layouts[0][0]
    assert (layout.entry_bytes, layout.page_bytes) == (16, 4096)
    replay.env.process(replay.decode(None))
    replay.env.run()
    assert replay.records[:, replay.col["write_commands"]].tolist() == [0, 0]
    assert layout.buffered_entries == 2


def test_defaults_are_documented():
    for cls, names in ((DualHeadLayout, ("pool_slack", "write_buffer_groups")),):
        lay = cls(n_positions=1)
        for name in names:
            assert f"{name} (" in cls.__doc__ and f"default {getattr(lay, name)}" in cls.__doc__
    for cls in (DualHeadLayout, IntraInterLayout):
        assert "2511.07427" in cls.__doc__


# ---------------------------------------------------------------------------- invariants


def _assert_contiguous(lay: DualHeadLayout, members: dict[int, list[int]]) -> None:
    """Each group is one block in the slot order of all placed entries, positions monotone."""
    n = lay.n_placed
    slots = lay.slots(np.arange(n))
    assert np.unique(slots).size == n
    label_of = np.empty(n, dtype=object)
    for label, positions in members.items():
        label_of[positions] = label
        assert lay.group_slots(label).tolist() == slots[sorted(positions)].tolist()
    by_slot = label_of[np.argsort(slots)]
    blocks = [by_slot[0]] + [b for a, b in zip(by_slot[:-1], by_slot[1:], strict=True) if a != b]
    assert len(blocks) == len(set(blocks)), f"a group is split: {blocks}"
    for positions in members.values():
        s = slots[sorted(positions)]
        steps = np.diff(s)
        assert (steps > 0).all() or (steps < 0).all()


@FAST
@pytest.mark.parametrize("name", LAYOUTS.names())
@given(data=st.data())
def test_layouts_stay_bijective_and_report_every_rewrite(name, data):
    n_positions = data.draw(st.integers(1, 120))
    prompt_len = data.draw(st.integers(0, n_positions))
    n_labels = data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    groups = rng.integers(0, n_labels, prompt_len)
    core = rng.integers(0, 5, (n_labels, n_labels)) if data.draw(st.booleans()) else None
    params = {}
    if name == "dual_head":
        params = {"pool_slack": data.draw(st.sampled_from([0.5, 1.0, 2.0])),
                  "write_buffer_groups": data.draw(st.integers(0, 2)),
                  "entry_bytes": 1024, "page_bytes": data.draw(st.sampled_from([1024, 4096]))}
    lay = LAYOUTS.get(name)(n_positions=n_positions, **params)
    lay.place_prefill(prompt_len, groups, coretrieval=core)
    label = {p: int(g) for p, g in enumerate(groups)}
    on_flash = dict(enumerate(lay.slots(np.arange(prompt_len)).tolist()))  # position -> slot

    def record(written: np.ndarray) -> None:
        slots = lay.slots(np.arange(lay.n_placed))
        where = {s: p for p, s in enumerate(slots.tolist())}
        for s in written.tolist():
            on_flash[where[s]] = s

    next_label = 100
    for position in range(prompt_len, n_positions):
        group = int(rng.integers(n_labels + 2))
        label[position] = group
        record(lay.due_writes(lay.place_append(position, group)))
        if rng.random() < 0.2:  # a split: some positions of one group to a fresh label
            old = int(rng.choice(list(set(label.values()))))
            members = np.array([p for p, g in label.items() if g == old])
            moved = members[rng.random(len(members)) < 0.5]
            target = next_label if rng.random() < 0.8 else int(rng.integers(n_labels))
            next_label += 1
            record(lay.relabel(moved, target))
            label.update({int(p): target for p in moved})
        n = lay.n_placed
        slots = lay.slots(np.arange(n))
        assert (slots >= 0).all() and np.unique(slots).size == n
        if lay.bounded_slots:
            assert (slots < n_positions).all()
        # every entry is on flash at its current slot, except those a write buffer holds
        stale = sum(on_flash.get(p) != s for p, s in enumerate(slots.tolist()))
        assert stale == lay.buffered_entries
        if name == "dual_head" and n:
            members = {}
            for p, g in label.items():
                members.setdefault(g, []).append(p)
            _assert_contiguous(lay, members)


# ---------------------------------------------------------------------------- co-retrieval

# A tiny layer (1 KV head, 1 query head, 2-D keys, P = 13): position 0 the sink; A = 1-4
# around (10, 0), B = 5-8 around (-10, 0), C = 9-12 around (0, 10). With 2 measuring queries
# (positions 11 and 12, contexts [0, 11) and [0, 12)) and budget 6 = the sink + 5 tokens:
#   q11 = (1, 0.5) ranks A (10) > C (5) > B (-10): sink, A, C's earliest (9) -> {s, A, C};
#   q12 = (-1, 0.5) ranks B (10) > C (5) > A: sink, B, 9 -> {s, B, C}.
# Counts: diagonal A 1, B 1, C 2, s 2; A-C 1, B-C 1, A-s 1, B-s 1, C-s 2, A-B 0.

PLUS = [(0.1, 0.0), (-0.1, 0.0), (0.0, 0.1), (0.0, -0.1)]


def _tiny_ctx(stored: bool = True) -> LayerContext:
    prefill = ([(0.0, -5.0)] + [(10 + x, y) for x, y in PLUS] + [(-10 + x, y) for x, y in PLUS]
               + [(x, 10 + y) for x, y in PLUS])
    keys = np.array([prefill + [(10.0, 0.0)]], np.float32)
    decode_q = np.array([[(1.0, 0.0)]], np.float32)
    prompt_q = np.zeros((1, 13, 2), np.float32)
    prompt_q[0, 11], prompt_q[0, 12] = (1.0, 0.5), (-1.0, 0.5)
    queries = np.concatenate([prompt_q, decode_q], axis=1).astype(np.float16)
    return LayerContext(0, keys, decode_q, 13, np.random.default_rng(0),
                        stored_queries=queries if stored else None)


@pytest.mark.parametrize("name", ["static_clusters", "dynakv"])
def test_coretrieval_by_hand(name):
    params = {"budget": 6, "sink_tokens": 1, "recent_tokens": 0, "n_clusters": 3,
              "coretrieval_queries": 2}
    sel = POLICIES.create({"type": name, **params}).select_layer(_tiny_ctx())
    pre = sel.prefill_groups[0]
    a, b, c = int(pre[1]), int(pre[5]), int(pre[9])
    assert pre.tolist() == [3] + [a] * 4 + [b] * 4 + [c] * 4 and {a, b, c} == {0, 1, 2}
    expected = np.zeros((4, 4), int)
    for retrieved in ([3, a, c], [3, b, c]):
        expected[np.ix_(retrieved, retrieved)] += 1
    np.testing.assert_array_equal(sel.coretrieval[0], expected)


def test_coretrieval_is_none_without_prompt_queries_or_when_off():
    params = {"budget": 6, "sink_tokens": 1, "recent_tokens": 0, "n_clusters": 3}
    sel = POLICIES.create({"type": "dynakv", **params}).select_layer(_tiny_ctx(stored=False))
    assert sel.coretrieval is None
    off = POLICIES.create({"type": "static_clusters", **params, "coretrieval_queries": 0})
    assert off.select_layer(_tiny_ctx()).coretrieval is None


def test_clusterkv_measures_coretrieval_over_its_prefill_groups():
    params = {"budget": 6, "sink_tokens": 1, "recent_tokens": 0, "tokens_per_cluster": 4,
              "full_layers": 0, "distance": "euclidean"}
    sel = POLICIES.create({"type": "clusterkv", **params}).select_layer(_tiny_ctx())
    n_groups = int(sel.prefill_groups[0].max()) + 1
    core = sel.coretrieval[0]
    assert core.shape == (n_groups, n_groups)
    assert (core == core.T).all()
    assert core[-1, -1] == 12  # the sinks: in all 12 (= P - 1) measuring queries
