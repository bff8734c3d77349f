"""Contract tests generated from the policy registry, plus per-policy properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.errors import ConfigError
from sim.metrics.accuracy import layer_accuracy
from sim.policies import POLICIES
from sim.policies.base import (
    BudgetedPolicy,
    HeadSelections,
    LayerContext,
    LayerSelection,
    RetrievalPolicy,
)

PROMPT, STEPS, N_Q, N_KV, D = 64, 12, 6, 2, 16
BUDGET, SINKS, RECENT = 16, 2, 3
# policies whose budget is a cap (InfiniGen fetches what its threshold admits, at most that)
VARIABLE_SIZE = {"infinigen"}


def make_layer(seed: int = 0, prompt: int = PROMPT, steps: int = STEPS):
    """(queries, keys, values) float32 with topical keys and queries leaning on a few keys."""
    rng = np.random.default_rng(seed)
    total = prompt + steps
    topics = 2.0 * rng.standard_normal((N_KV, 6, D))
    keys = topics[np.arange(N_KV)[:, None], rng.integers(0, 6, (N_KV, total))]
    keys = (keys + rng.standard_normal((N_KV, total, D))).astype(np.float32)
    values = rng.standard_normal((N_KV, total, D)).astype(np.float32)
    group = N_Q // N_KV
    queries = np.empty((N_Q, steps, D), np.float32)
    for q in range(N_Q):
        targets = rng.integers(0, prompt + np.arange(steps)[:, None], size=(steps, 3))
        queries[q] = 0.4 * keys[q // group, targets].sum(axis=1)
    return queries, keys, values


def context(queries, keys, seed: int = 1, prompt: int = PROMPT) -> LayerContext:
    # Stored queries of every position (query_start = 0) for policies that read the prompt's
    # (H2O): a prompt position's query leans on its own key, then the decode queries.
    group = queries.shape[0] // keys.shape[0]
    prompt_q = 0.4 * np.repeat(keys[:, :prompt], group, axis=0)
    stored = np.concatenate([prompt_q, queries], axis=1).astype(np.float16)
    return LayerContext(
        0, keys, queries, prompt, np.random.default_rng(seed), stored_queries=stored
    )


def build(name: str, **overrides) -> RetrievalPolicy:
    """A registered policy sized for the small test layer (budgeted ones get a small budget)."""
    params = {}
    if issubclass(POLICIES.get(name), BudgetedPolicy):
        params = {"budget": BUDGET, "sink_tokens": SINKS, "recent_tokens": RECENT}
        if name in ("static_clusters", "clusterkv", "dynakv"):
            params["tokens_per_cluster"] = 8
        if name in ("quest", "clusterkv"):
            params["full_layers"] = 0  # the test layer is layer 0: exercise the pages, not full
        if name == "clusterkv":
            params |= {"update_interval": 4, "window_clusters": 2}  # local updates within STEPS
    return POLICIES.create({"type": name, **params, **overrides})


@pytest.fixture(scope="module")
def layer():
    return make_layer()


@pytest.mark.parametrize("name", POLICIES.names())
def test_defaults_construct(name):
    policy = POLICIES.create(name)
    assert policy.name == name
    assert policy.min_context() >= 1


@pytest.mark.parametrize("name", POLICIES.names())
@pytest.mark.parametrize("budget", [BUDGET, 0.3])
def test_selection_contract(name, budget, layer):
    queries, keys, _ = layer
    policy = build(name) if name == "full" else build(name, budget=budget)
    sel = policy.select_layer(context(queries, keys))
    assert sel.index_vectors.shape == (N_KV, STEPS)
    assert (sel.index_vectors >= 0).all()
    for groups, width in ((sel.prefill_groups, PROMPT), (sel.append_groups, STEPS)):
        if groups is not None:
            assert groups.shape == (N_KV, width) and groups.dtype == np.int32
    if sel.is_full:
        return
    assert len(sel.heads) == N_KV
    for head in sel.heads:
        assert head.offsets.shape == (STEPS + 1,) and head.positions.dtype == np.int32
        for s in range(STEPS):
            ctx_len = PROMPT + s
            pos = head.at(s)
            assert (np.diff(pos) > 0).all(), "sorted and unique"
            assert pos.min() >= 0 and pos.max() < ctx_len
            if name in VARIABLE_SIZE:
                assert len(pos) <= policy.budget_at(ctx_len)
            else:
                assert len(pos) == policy.budget_at(ctx_len)
            forced = set(range(policy.sink_tokens))
            forced |= set(range(ctx_len - policy.recent_tokens, ctx_len))
            assert forced <= set(pos.tolist())


@pytest.mark.parametrize("name", POLICIES.names())
def test_deterministic_for_a_seed(name, layer):
    queries, keys, _ = layer
    policy = build(name)
    a = policy.select_layer(context(queries, keys, seed=5))
    b = policy.select_layer(context(queries, keys, seed=5))
    np.testing.assert_array_equal(a.index_vectors, b.index_vectors)
    for x, y in ((a.prefill_groups, b.prefill_groups), (a.append_groups, b.append_groups)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    if not a.is_full:
        for ha, hb in zip(a.heads, b.heads, strict=True):
            np.testing.assert_array_equal(ha.positions, hb.positions)
            np.testing.assert_array_equal(ha.offsets, hb.offsets)


@pytest.mark.parametrize("name", [n for n in POLICIES.names() if n != "token_topk"])
def test_token_topk_is_the_recall_upper_bound(name, layer):
    """token_topk maximises the group-aggregated recall (mean over a KV head's query heads)."""
    queries, keys, values = layer
    oracle = build("token_topk", sink_tokens=0, recent_tokens=0)
    rivals = [build(name).select_layer(context(queries, keys))]
    rng = np.random.default_rng(9)
    rivals.append(  # a random selection of the same size
        LayerSelection(
            [
                HeadSelections.from_lists(
                    [np.sort(rng.choice(PROMPT + s, BUDGET, replace=False)) for s in range(STEPS)]
                )
                for _ in range(N_KV)
            ],
            np.zeros((N_KV, STEPS), np.int64),
        )
    )

    def group_recall(sel: LayerSelection) -> np.ndarray:
        acc = layer_accuracy(queries, keys, values, PROMPT, sel)
        return acc["attention_recall"].reshape(N_KV, N_Q // N_KV, STEPS).mean(axis=1)

    best = group_recall(oracle.select_layer(context(queries, keys)))
    for rival in rivals:
        if rival.is_full:
            continue  # full attention is not a selection at this budget
        assert (best >= group_recall(rival) - 1e-5).all()


@pytest.mark.parametrize(
    "name", [n for n in POLICIES.names() if issubclass(POLICIES.get(n), BudgetedPolicy)]
)
@pytest.mark.parametrize(
    "bad, match",
    [
        ({"budget": 0}, "budget"),
        ({"budget": -3}, "budget"),
        ({"budget": 1.5}, "fraction"),
        ({"budget": "all"}, "budget"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"recent_tokens": 2.5}, "recent_tokens"),
        ({"budget": 4, "sink_tokens": 3, "recent_tokens": 3}, "exceed"),
        ({"no_such_knob": 1}, "unknown parameter"),
    ],
)
def test_budgeted_parameters_are_validated(name, bad, match):
    with pytest.raises(ConfigError, match=match):
        build(name, **bad)


@pytest.mark.parametrize(
    "name", [n for n in POLICIES.names() if issubclass(POLICIES.get(n), BudgetedPolicy)]
)
def test_min_context_is_the_token_budget(name):
    assert build(name, budget=40).min_context() >= 40
    assert build(name, budget=0.5).min_context() >= 1


def test_fractional_budget_below_forced_keeps_sinks_then_newest(layer):
    queries, keys, _ = layer
    policy = build("token_topk", budget=0.05, sink_tokens=2, recent_tokens=4)
    sel = policy.select_layer(context(queries, keys))
    for s in range(STEPS):
        k = math.ceil(0.05 * (PROMPT + s))  # 4 at P=64: both sinks and the 2 newest
        want = [0, 1, *range(PROMPT + s - (k - 2), PROMPT + s)]
        assert sel.heads[0].at(s).tolist() == want


@pytest.mark.parametrize(
    "bad",
    [
        {"distance": "manhattan"},
        {"tokens_per_cluster": 0},
        {"n_clusters": 0},
        {"max_iter": 0},
        {"update_centroids": "yes"},
    ],
)
def test_static_clusters_parameters_are_validated(bad):
    with pytest.raises(ConfigError):
        build("static_clusters", **bad)


@pytest.mark.parametrize(
    "variant", [{}, {"distance": "cosine"}, {"update_centroids": True}, {"n_clusters": 5}]
)
def test_static_clusters_groups(variant, layer):
    queries, keys, _ = layer
    policy = build("static_clusters", **variant)
    sel = policy.select_layer(context(queries, keys))
    for h in range(N_KV):
        n = int(sel.index_vectors[h, 0])
        assert (sel.index_vectors[h] == n).all()
        if "n_clusters" in variant:
            assert n == 5
        pre, app = sel.prefill_groups[h], sel.append_groups[h]
        # One label per position: the sinks share the extra label n, the rest are clusters.
        assert (pre[:SINKS] == n).all() and ((pre[SINKS:] >= 0) & (pre[SINKS:] < n)).all()
        assert ((app >= 0) & (app < n)).all()
        sizes = np.bincount(np.concatenate([pre, app]), minlength=n + 1)
        assert sizes.sum() == PROMPT + STEPS and sizes[n] == SINKS
        assert (np.bincount(pre[SINKS:], minlength=n) > 0).all(), "no empty prefill cluster"


def test_static_clusters_fill_whole_clusters_in_rank_order(layer):
    """Beyond the forced tokens, a step's selection is whole clusters plus one partial one,
    and the partial cluster keeps its earliest positions."""
    queries, keys, _ = layer
    policy = build("static_clusters", recent_tokens=0)
    sel = policy.select_layer(context(queries, keys))
    labels = np.concatenate([sel.prefill_groups, sel.append_groups], axis=1)
    for h in range(N_KV):
        for s in range(STEPS):
            pos = sel.heads[h].at(s)
            free = pos[pos >= SINKS]
            members = {
                c: np.flatnonzero(labels[h, : PROMPT + s] == c) for c in set(labels[h, free])
            }
            partial = [c for c, m in members.items() if not np.isin(m, free).all()]
            assert len(partial) <= 1
            for c in partial:
                taken = np.isin(members[c], free)
                assert taken[: taken.sum()].all(), "a truncated cluster keeps its prefix"


def test_decode_token_at_a_centroid_joins_that_cluster():
    queries, keys, _ = make_layer(seed=4)
    policy = build("static_clusters")
    first = policy.select_layer(context(queries, keys, seed=2))
    keys = keys.copy()
    for h in range(N_KV):
        for j, c in ((3, 0), (7, 2)):
            members = np.flatnonzero(first.prefill_groups[h] == c)
            keys[h, PROMPT + j] = keys[h, members].mean(axis=0)
    # Decode keys do not affect prefill clustering, so the same seed gives the same clusters.
    second = policy.select_layer(context(queries, keys, seed=2))
    np.testing.assert_array_equal(first.prefill_groups, second.prefill_groups)
    assert (second.append_groups[:, 3] == 0).all() and (second.append_groups[:, 7] == 2).all()


def test_static_clusters_rejects_prompt_not_longer_than_sinks():
    queries, keys, _ = make_layer(prompt=2)
    with pytest.raises(ValueError, match="sinks"):
        build("static_clusters").select_layer(context(queries, keys, prompt=2))
    assert build("static_clusters", budget=0.5).min_context() == SINKS + 1


def test_token_topk_scores_every_key(layer):
    queries, keys, _ = layer
    sel = build("token_topk").select_layer(context(queries, keys))
    assert (sel.index_vectors == PROMPT + np.arange(STEPS)).all()


def test_full_has_no_index(layer):
    queries, keys, _ = layer
    sel = build("full").select_layer(context(queries, keys))
    assert sel.is_full and (sel.index_vectors == 0).all()
