"""Cluster labels over time and the update->retrieval statistic (Table 2), on hand-made
selections."""

from __future__ import annotations

import numpy as np

from sim.metrics.clusters import labels_after, update_retrieval
from sim.policies.base import HeadSelections, LayerSelection, Relabel

# one KV head, prompt of 6 positions: sinks 0 (group -1), groups 0: {1,2,3}, 1: {4,5}
PROMPT = 6
PREFILL = np.array([[-1, 0, 0, 0, 1, 1]])


def _selection(per_step, appends, relabels=()):
    steps = len(per_step)
    return LayerSelection(
        heads=[HeadSelections.from_lists([np.array(p) for p in per_step])],
        index_vectors=np.zeros((1, steps), dtype=np.int64),
        prefill_groups=PREFILL,
        append_groups=np.array([appends]),
        relabels=[list(relabels)],
    )


def test_labels_follow_appends_and_splits():
    split = Relabel(step=1, positions=np.array([2, 3]), group=2)
    sel = _selection([[0], [0], [0]], [1, 0, 2], [split])
    assert labels_after(PROMPT, sel, 0, -1).tolist() == [-1, 0, 0, 0, 1, 1]
    assert labels_after(PROMPT, sel, 0, 0).tolist() == [-1, 0, 0, 0, 1, 1, 1]
    assert labels_after(PROMPT, sel, 0, 1).tolist() == [-1, 0, 2, 2, 1, 1, 1, 0]
    assert labels_after(PROMPT, sel, 0, 2).tolist() == [-1, 0, 2, 2, 1, 1, 1, 0, 2]


def test_update_retrieval_counts_by_hand():
    # step 0: token 6 joins group 1; step 1: token 7 joins group 0; step 2: token 8 joins 1;
    # step 3: token 9 joins 0. Selections (recent window 0): step 0 {0}, step 1 {4} (group 1),
    # step 2 {0}, step 3 {1} (group 0), step 4 {0}.
    sel = _selection([[0], [4], [0], [1], [0]], [1, 0, 1, 0, 1])
    counts = update_retrieval(PROMPT, sel, horizon=2)
    # updates with 2 steps left: step 0 (group 1), 1 (group 0), 2 (group 1)
    # group 1 updated at 0: retrieved at step 1 -> within 1. group 0 updated at 1: retrieved
    # at step 3 -> within 2. group 1 updated at 2: steps 3, 4 select groups 0 and -> never.
    assert counts.tolist() == [3, 1, 2]


def test_recent_window_entries_do_not_count_as_retrieval():
    # step 1 selects position 6, the token of step 0 (group 1), inside a 2-token window
    sel = _selection([[0], [6], [0]], [1, 0, 1])
    assert update_retrieval(PROMPT, sel, horizon=1).tolist() == [2, 1]
    # a 2-token window at step s: positions from PROMPT + s + 1 - 2 on are kept, not retrieved
    window = lambda step: PROMPT + step + 1 - 2  # noqa: E731
    assert update_retrieval(PROMPT, sel, horizon=1, kept_tail_start=window).tolist() == [2, 0]


def test_clusterkv_unclustered_window_is_a_kept_tail():
    from sim.policies import POLICIES

    policy = POLICIES.create({"type": "clusterkv", "budget": 64, "update_interval": 4})
    # steps 0-3: window starts at the prompt's end; step 5: after the update at step 4
    assert policy.kept_tail_start(100, 2) == 100
    assert policy.kept_tail_start(100, 5) == 104
    recent = POLICIES.create({"type": "static_clusters", "budget": 64, "recent_tokens": 8})
    assert recent.kept_tail_start(100, 5) == 100 + 5 + 1 - 8


def test_split_updates_both_halves():
    split = Relabel(step=0, positions=np.array([2, 3]), group=2)
    # step 0: token 6 joins group 1, group 0 splits into 0 and 2; step 1 selects 2 (group 2)
    sel = _selection([[0], [2], [0]], [1, 1, 1], [split])
    counts = update_retrieval(PROMPT, sel, horizon=1)
    # updates at step 0: groups 1, 0, 2 (3); at step 1: group 1 -> 4; retrieved within 1:
    # group 2 (at step 1); group 1 at step 2? step 2 selects 0 (sink) -> no
    assert counts.tolist() == [4, 1]
