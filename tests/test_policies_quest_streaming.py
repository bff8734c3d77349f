"""Quest, StreamingLLM and the oracle: hand-derived cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sim.errors import ConfigError
from sim.policies import POLICIES
from sim.policies.base import LayerContext
from sim.policies.quest import PageIndex, page_upper_bound

from .test_policies import N_KV, N_Q, PROMPT, STEPS, context, make_layer


@pytest.fixture(scope="module")
def layer():
    return make_layer(seed=3)


def at_layer(queries, keys, layer: int, prompt: int = PROMPT) -> LayerContext:
    return LayerContext(layer, keys, queries, prompt, np.random.default_rng(0))


# ------------------------------------------------------------------------------------ quest


def test_page_upper_bound_by_hand():
    # Page keys (1, 3) and (2, -1): min (1, -1), max (2, 3). For q = (1, -2):
    # channel 0: max(1*1, 1*2) = 2; channel 1: max(-2*-1, -2*3) = max(2, -6) = 2 -> bound 4.
    # q.k: 1 - 6 = -5 and 2 + 2 = 4, so the bound is attained by the second key.
    keys = np.array([[1.0, 3.0], [2.0, -1.0]])
    q = np.array([1.0, -2.0])
    assert page_upper_bound(q, keys.min(axis=0), keys.max(axis=0)) == 4.0
    assert (keys @ q).tolist() == [-5.0, 4.0]


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    q=arrays(np.float32, 5, elements=finite),
    keys=st.integers(1, 16).flatmap(lambda n: arrays(np.float32, (n, 5), elements=finite)),
)
def test_page_upper_bound_bounds_every_key(q, keys):
    q64, k64 = q.astype(np.float64), keys.astype(np.float64)
    bound = page_upper_bound(q64, k64.min(axis=0), k64.max(axis=0))
    assert (k64 @ q64 <= bound + 1e-9 * (1 + abs(bound))).all()
    if len(keys) == 1:  # a one-key page: the bound is q.k itself
        assert math.isclose(bound, float(k64[0] @ q64), rel_tol=1e-12, abs_tol=1e-9)


def test_page_scores_by_hand_with_growing_pages():
    # 1 KV head, 2 query heads, pages of 2 tokens, P = 3, S = 2.
    keys = np.array([[[1, 0], [0, 1], [2, -1], [-1, 3], [5, 5]]], dtype=np.float32)
    q_a = [[1, 1], [1, -1]]  # query head a, steps 0 and 1
    q_b = [[0, -1], [-1, 0]]  # query head b
    grouped = np.array([[q_a, q_b]], dtype=np.float32)  # (H_kv, G, S, d) = (1, 2, 2, 2)
    index = PageIndex(keys[0][None], page_tokens=2)
    # Step 0 (context 3): page 0 = {0, 1}: min (0, 0), max (1, 1); page 1 = {2}: (2, -1).
    #   head a (1, 1):  page 0 -> 1 + 1 = 2;      page 1 -> 2 - 1 = 1
    #   head b (0, -1): page 0 -> 0 + 0 = 0;      page 1 -> 0 + 1 = 1
    # Step 1 (context 4): page 1 grew to {2, 3}: min (-1, -1), max (2, 3).
    #   head a (1, -1): page 0 -> 1 + 0 = 1;      page 1 -> 2 + 1 = 3
    #   head b (-1, 0): page 0 -> 0 + 0 = 0;      page 1 -> 1 + 0 = 1
    # Page 2 = {4} is not visible before context 5: -inf.
    contexts = np.array([3, 4])
    total = index.page_scores(grouped, contexts, "sum")
    most = index.page_scores(grouped, contexts, "max")
    assert total.shape == (1, 2, 2)
    np.testing.assert_array_equal(total[0], [[2, 2], [1, 4]])
    np.testing.assert_array_equal(most[0], [[2, 1], [1, 3]])
    lo, hi = index.bounds_at(4)
    np.testing.assert_array_equal(lo[0], [[0, 0], [-1, -1]])
    np.testing.assert_array_equal(hi[0], [[1, 1], [2, 3]])
    assert index.n_pages(4) == 2 and index.n_pages(5) == 3


def test_incremental_bounds_match_a_fresh_min_max(layer):
    _, keys, _ = layer
    t = 5
    index = PageIndex(keys, t)
    for c in range(PROMPT, PROMPT + STEPS):
        lo, hi = index.bounds_at(c)
        for p in range(index.n_pages(c)):
            page = keys[:, p * t : min((p + 1) * t, c)]
            np.testing.assert_array_equal(lo[:, p], page.min(axis=1))
            np.testing.assert_array_equal(hi[:, p], page.max(axis=1))


def quest(**params):
    base = {"budget": 16, "sink_tokens": 0, "recent_tokens": 0, "page_tokens": 4}
    return POLICIES.create({"type": "quest", **base, **params})


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_quest_takes_pages_in_score_order(reduce, layer):
    """The selection is the first `budget` positions of the visible pages in descending score
    (ties: earlier page), each page's positions ascending; at steps where every visible page
    is complete (s % 4 == 0 with P = 64), that is exactly the 4 best whole pages."""
    queries, keys, _ = layer
    policy = quest(full_layers=0, group_reduce=reduce)
    sel = policy.select_layer(context(queries, keys))
    index = PageIndex(keys, 4)
    group = N_Q // N_KV
    combine = np.sum if reduce == "sum" else np.max
    for s in range(STEPS):
        c = PROMPT + s
        lo, hi = (b.astype(np.float64) for b in index.bounds_at(c))
        q = queries[:, s].astype(np.float64)  # (N_Q, d)
        # float64 reference: bound of every (query head, page), combined over the group
        bounds = page_upper_bound(q[:, None, :], lo.repeat(group, 0), hi.repeat(group, 0))
        scores = combine(bounds.reshape(N_KV, group, -1), axis=1)
        for h in range(N_KV):
            order = np.argsort(-scores[h], kind="stable")
            walk = np.concatenate([np.arange(p * 4, min(p * 4 + 4, c)) for p in order])
            want = np.sort(walk[:16])
            got = sel.heads[h].at(s)
            np.testing.assert_array_equal(got, want)
            if s % 4 == 0:
                assert sorted(set((got // 4).tolist())) == sorted(order[:4].tolist())
                assert np.bincount(got // 4).max() == 4 and len(set(got // 4)) == 4


def test_quest_full_layers_then_pages(layer):
    queries, keys, _ = layer
    policy = quest(full_layers=2, page_tokens=16, budget=32, recent_tokens=16)
    first = policy.select_layer(at_layer(queries, keys, 0))
    assert first.is_full and (first.index_vectors == 0).all()
    assert policy.select_layer(at_layer(queries, keys, 1)).is_full
    third = policy.select_layer(at_layer(queries, keys, 2))
    assert not third.is_full
    # P + s in [64, 76): 64 positions are 4 pages, any more is 5 -> 8 or 10 bound vectors.
    want = [[8] + [10] * (STEPS - 1)] * N_KV
    np.testing.assert_array_equal(third.index_vectors, want)
    np.testing.assert_array_equal(third.prefill_groups, np.tile(np.arange(64) // 16, (N_KV, 1)))
    np.testing.assert_array_equal(third.append_groups, np.full((N_KV, STEPS), 4))
    for head in third.heads:
        assert (head.counts() == 32).all()


@pytest.mark.parametrize(
    "bad", [{"page_tokens": 0}, {"page_tokens": 2.5}, {"full_layers": -1}, {"group_reduce": "avg"}]
)
def test_quest_parameters_are_validated(bad):
    with pytest.raises(ConfigError):
        quest(**bad)


def test_quest_defaults():
    policy = POLICIES.create("quest")
    assert (policy.page_tokens, policy.full_layers, policy.group_reduce) == (16, 2, "sum")
    assert (policy.sink_tokens, policy.recent_tokens, policy.budget) == (0, 16, 1024)


# ---------------------------------------------------------------------------- streaming_llm


def test_streaming_llm_is_sinks_plus_window_whatever_the_queries(layer):
    queries, keys, _ = layer
    policy = POLICIES.create({"type": "streaming_llm", "budget": 20, "sink_tokens": 4})
    assert policy.selection_needs_query is False and policy.window_at(PROMPT) == 16
    rng = np.random.default_rng(7)
    others = [np.zeros_like(queries), rng.standard_normal(queries.shape).astype(np.float32)]
    sels = [policy.select_layer(context(q, keys)) for q in (queries, *others)]
    for s in range(STEPS):
        # window = budget - sinks = 16: [0, 4) U [64 + s - 16, 64 + s)
        want = [0, 1, 2, 3, *range(48 + s, 64 + s)]
        for sel in sels:
            assert sel.prefill_groups is None and (sel.index_vectors == 0).all()
            for head in sel.heads:
                assert head.at(s).tolist() == want


def test_streaming_llm_keeps_its_selection_in_dram(layer):
    queries, keys, _ = layer
    policy = POLICIES.create({"type": "streaming_llm", "budget": 20, "sink_tokens": 4})
    sel = policy.select_layer(context(queries, keys))
    assert sel.kept_in_dram and sel.is_resident and not sel.is_full
    # the kept set (the budget) and the new token, per KV head
    assert policy.dram_held_entries(PROMPT, 3) == 20 + 1
    assert policy.dram_held_entries(10, 0) == 10 + 1  # a context below the budget: all of it


def test_quest_holds_its_recent_page_in_dram(layer):
    queries, keys, _ = layer
    sel = POLICIES.create({"type": "quest", "budget": 32, "full_layers": 0}).select_layer(
        context(queries, keys))
    assert sel.dram_sinks == 0 and sel.dram_tail.tolist() == [PROMPT + s - 16
                                                              for s in range(STEPS)]
    # two vectors (min, max) per page of 16 at context P + s
    policy = POLICIES.create({"type": "quest", "budget": 32})
    assert policy.index_floor(PROMPT, 0, 8) == 2 * math.ceil(PROMPT / 16)
    assert policy.index_floor(33, 0, 8) == 2 * 3


def test_streaming_llm_fractional_budget(layer):
    queries, keys, _ = layer
    policy = POLICIES.create({"type": "streaming_llm", "budget": 0.25})  # sink_tokens 4
    sel = policy.select_layer(context(queries, keys))
    for s in range(STEPS):
        c = PROMPT + s
        window = math.ceil(0.25 * c) - 4  # 12 at c = 64 ... 15 at c = 75 (ceil(18.75) = 19)
        assert policy.window_at(c) == window
        assert sel.heads[0].at(s).tolist() == [0, 1, 2, 3, *range(c - window, c)]


# ----------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize(
    "params", [{"budget": 16}, {"budget": 0.2, "sink_tokens": 2, "recent_tokens": 3}]
)
def test_oracle_is_token_topk_for_free(params, layer):
    queries, keys, _ = layer
    oracle = POLICIES.create({"type": "oracle", **params}).select_layer(context(queries, keys))
    topk = POLICIES.create({"type": "token_topk", **params}).select_layer(context(queries, keys))
    assert (oracle.index_vectors == 0).all() and (topk.index_vectors > 0).all()
    assert oracle.prefill_groups is None and oracle.append_groups is None
    for a, b in zip(oracle.heads, topk.heads, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.offsets, b.offsets)
