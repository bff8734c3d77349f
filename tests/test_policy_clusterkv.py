"""ClusterKV (local update): window clustering, cluster growth and the selection rule, checked
against a straightforward re-derivation from the published labels."""

from __future__ import annotations

import numpy as np
import pytest

from sim.errors import ConfigError
from sim.policies import POLICIES
from sim.policies.base import LayerContext

from .test_policies import N_KV, N_Q, PROMPT, context, make_layer

STEPS = 30  # three complete windows of 8 and a trailing one of 6
M, K, SINKS, BUDGET = 8, 3, 2, 24


def build(**overrides):
    params = {
        "type": "clusterkv",
        "budget": BUDGET,
        "sink_tokens": SINKS,
        "tokens_per_cluster": 8,
        "update_interval": M,
        "window_clusters": K,
        "full_layers": 0,
    }
    return POLICIES.create({**params, **overrides})


@pytest.fixture(scope="module")
def layer():
    return make_layer(seed=7, steps=STEPS)


@pytest.fixture(scope="module")
def selection(layer):
    queries, keys, _ = layer
    return build().select_layer(context(queries, keys))


def labels_of(sel) -> np.ndarray:
    return np.concatenate([sel.prefill_groups, sel.append_groups], axis=1)


def test_clusters_grow_by_window_clusters_every_interval(selection):
    for h in range(N_KV):
        n_prefill = len(np.unique(selection.prefill_groups[h, SINKS:]))
        # 62 clustered prompt keys / 8 per cluster -> round(7.75) = 8 prefill clusters.
        assert n_prefill == 8
        steps = np.arange(STEPS)
        np.testing.assert_array_equal(selection.index_vectors[h], n_prefill + K * (steps // M))


def test_new_clusters_hold_only_their_window(selection):
    for h in range(N_KV):
        pre, app = selection.prefill_groups[h], selection.append_groups[h]
        n_prefill = len(np.unique(pre[SINKS:]))
        assert (pre[SINKS:] < n_prefill).all() and (pre[:SINKS] == n_prefill).all()
        seen: set[int] = set(pre.tolist())
        for w in range(STEPS // M):
            ids = set(app[w * M : (w + 1) * M].tolist())
            assert len(ids) == K
            assert min(ids) > n_prefill, "new ids above the prefill ones and the sinks'"
            assert not ids & seen, "a window's clusters hold no token outside the window"
            seen |= ids
        # The trailing window (steps 24..29) is never clustered: one label of its own, the last.
        tail = app[(STEPS // M) * M :]
        assert len(set(tail.tolist())) == 1 and tail[0] == max(seen) + 1


def reference_selection(sel, queries, keys, h: int, s: int) -> list[int]:
    """Sinks + unclustered window, then whole clusters by group-mean-query . mean-key, the last
    one cut to its earliest positions; re-derived from the labels only."""
    labels = labels_of(sel)[h]
    clustered_end = PROMPT + (s // M) * M  # windows complete by step s are clustered
    forced = list(range(SINKS)) + list(range(clustered_end, PROMPT + s))
    room = BUDGET - len(forced)
    query = queries.reshape(N_KV, N_Q // N_KV, STEPS, -1).mean(axis=1)[h, s]
    existing = np.unique(labels[SINKS:clustered_end])
    members = {c: np.flatnonzero(labels == c) for c in existing}
    score = {c: float(query @ keys[h, members[c]].mean(axis=0)) for c in existing}
    taken = []
    for c in sorted(existing, key=lambda c: -score[c]):
        if room == 0:
            break
        assert members[c].max() < clustered_end
        taken += members[c][:room].tolist()
        room -= min(room, len(members[c]))
    return sorted(forced + taken)


def test_selection_is_window_plus_top_clusters_last_one_truncated(layer, selection):
    queries, keys, _ = layer
    for h in range(N_KV):
        for s in range(STEPS):
            pos = selection.heads[h].at(s).tolist()
            assert len(pos) == BUDGET
            assert pos == reference_selection(selection, queries, keys, h, s), (h, s)


def test_window_tokens_are_selected_until_clustered(selection):
    for h in range(N_KV):
        for s in range(STEPS):
            pos = set(selection.heads[h].at(s).tolist())
            window = set(range(PROMPT + (s // M) * M, PROMPT + s))
            assert window <= pos
            assert len(window) == s % M


def test_sinks_and_the_unclustered_window_are_held_in_dram(selection):
    # the window of step s starts at P + (s // 8) * 8 (no recent tokens forced on top)
    assert selection.dram_sinks == SINKS
    assert selection.dram_tail.tolist() == [PROMPT + (s // M) * M for s in range(STEPS)]
    assert not selection.kept_in_dram and selection.split_buffers is None
    # with recent tokens forced beyond the window, the earlier start wins
    recent = build(recent_tokens=5).dram_window(PROMPT, np.array([0, 3, 8, 13]))
    assert recent[0] == SINKS and recent[1].tolist() == [PROMPT - 5, PROMPT - 2, PROMPT + 3,
                                                         PROMPT + 8]
    # held at the end of step 13: 2 sinks + positions P + 8 .. P + 13
    assert build().dram_held_entries(PROMPT, 13) == SINKS + 6


def test_whole_clusters_plus_at_most_one_partial(selection):
    labels = labels_of(selection)
    for h in range(N_KV):
        for s in range(STEPS):
            pos = selection.heads[h].at(s)
            free = pos[(pos >= SINKS) & (pos < PROMPT + (s // M) * M)]
            partial = [
                c
                for c in set(labels[h, free].tolist())
                if not np.isin(np.flatnonzero(labels[h] == c), free).all()
            ]
            assert len(partial) <= 1


@pytest.mark.parametrize("interval", [M, 1000])
def test_prefill_clustering_equals_static_clusters_cosine(layer, interval):
    """Same k-means code, seed draw and settings: the prefill labels match exactly, whether or
    not local updates happen (window k-means seeds do not touch the layer's stream)."""
    queries, keys, _ = layer
    ckv = build(update_interval=interval).select_layer(context(queries, keys, seed=4))
    static = POLICIES.create(
        {
            "type": "static_clusters",
            "budget": BUDGET,
            "sink_tokens": SINKS,
            "recent_tokens": 0,
            "tokens_per_cluster": 8,
            "distance": "cosine",
        }
    ).select_layer(context(queries, keys, seed=4))
    np.testing.assert_array_equal(ckv.prefill_groups, static.prefill_groups)
    np.testing.assert_array_equal(ckv.index_vectors[:, 0], static.index_vectors[:, 0])
    if interval > STEPS:  # no update: every decode token is in the one trailing window
        assert (ckv.index_vectors == static.index_vectors).all()
        assert (ckv.append_groups == static.index_vectors[:, :1] + 1).all()


def test_window_larger_than_budget_keeps_sinks_then_newest():
    queries, keys, _ = make_layer(seed=2, steps=12)
    sel = build(budget=6, update_interval=100).select_layer(context(queries, keys))
    for s in range(12):
        want = [0, 1, *range(PROMPT + max(0, s - 4), PROMPT + s)]
        if s < 4:  # window + sinks below the budget: the rest is clustered prompt tokens
            assert set(want) <= set(sel.heads[0].at(s).tolist())
        else:
            assert sel.heads[0].at(s).tolist() == want


def test_first_layers_are_full(layer):
    queries, keys, _ = layer
    policy = build(full_layers=2)
    for index, full in ((0, True), (1, True), (2, False)):
        ctx = LayerContext(index, keys, queries, PROMPT, np.random.default_rng(0))
        sel = policy.select_layer(ctx)
        assert sel.is_full == full
        if full:
            assert (sel.index_vectors == 0).all() and sel.prefill_groups is None


def test_defaults_are_the_papers():
    p = POLICIES.create("clusterkv")
    assert (p.budget, p.sink_tokens, p.recent_tokens, p.tokens_per_cluster) == (1024, 16, 0, 80)
    assert (p.distance, p.max_iter, p.update_interval, p.window_clusters, p.full_layers) == (
        "cosine",
        20,
        320,
        4,
        2,
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"update_interval": 0},
        {"window_clusters": 0},
        {"tokens_per_cluster": 0},
        {"max_iter": 0},
        {"full_layers": -1},
        {"distance": "manhattan"},
    ],
)
def test_parameters_are_validated(bad):
    with pytest.raises(ConfigError):
        build(**bad)


def test_on_the_real_fixture_trace(fixture_trace):
    layer = 5
    keys = np.asarray(fixture_trace.keys(layer), np.float32)
    queries = np.asarray(fixture_trace.decode_queries(layer), np.float32)
    steps, prompt = queries.shape[1], fixture_trace.prompt_len
    ctx = LayerContext(layer, keys, queries, prompt, np.random.default_rng([0, layer]))
    sel = build(budget=32, sink_tokens=4, full_layers=2).select_layer(ctx)
    n_prefill = sel.index_vectors[:, :1]
    assert (sel.index_vectors == n_prefill + K * (np.arange(steps) // M)).all()
    for head in sel.heads:
        for s in range(steps):
            pos = head.at(s)
            assert len(pos) == 32
            assert set(range(prompt + (s // M) * M, prompt + s)) <= set(pos.tolist())
