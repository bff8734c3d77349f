"""The budgeted fill computed on groups (``GroupRanking``) against the fill of the per-position
scores it stands for (``score_steps``): the same selections, to the last position.

Static update, ClusterKV and Quest rank whole groups (clusters, pages), StreamingLLM one
window; their selections are computed on the groups, which costs about the budget per step
instead of the context. The reference here is the budgeted base's top-k of ``score_steps``
(the index with its ``groups`` removed), over random layers and every budget regime (whole
context, below the forced positions, the plain fill), fractional and token budgets, sinks,
recent windows, ClusterKV's unclustered window and short update intervals, pages of any size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.policies import POLICIES
from sim.policies.base import LayerContext


def layer(seed: int, prompt: int, steps: int, n_kv: int = 2, group: int = 2, d: int = 8):
    rng = np.random.default_rng(seed)
    total = prompt + steps
    topics = 2.0 * rng.standard_normal((n_kv, 5, d))
    keys = topics[np.arange(n_kv)[:, None], rng.integers(0, 5, (n_kv, total))]
    keys = (keys + rng.standard_normal((n_kv, total, d))).astype(np.float32)
    queries = rng.standard_normal((n_kv * group, steps, d)).astype(np.float32)
    return keys, queries


def both(spec: dict, keys: np.ndarray, queries: np.ndarray, prompt: int):
    """Selections of ``spec`` on groups and on per-position scores (same seed)."""
    policy = POLICIES.create(dict(spec))

    def ctx() -> LayerContext:
        return LayerContext(0, keys, queries, prompt, np.random.default_rng(7))

    on_groups = policy.select_layer(ctx())
    index_layer = policy.index_layer
    policy.index_layer = lambda c: dataclasses.replace(index_layer(c), groups=None)  # type: ignore[method-assign]
    assert policy.index_layer(ctx()).groups is None
    on_scores = policy.select_layer(ctx())
    assert index_layer(ctx()).groups is not None  # the policy does rank groups
    return on_groups, on_scores


def assert_same(a, b) -> None:
    assert a.heads is not None and b.heads is not None
    for x, y in zip(a.heads, b.heads, strict=True):
        assert x.positions.dtype == y.positions.dtype
        np.testing.assert_array_equal(x.offsets, y.offsets)
        np.testing.assert_array_equal(x.positions, y.positions)


def assert_fills_equal(spec: dict, seed: int, prompt: int, steps: int) -> None:
    """``spec``'s fill on groups equals its score fill on a random layer; a token budget below
    the sinks and recent window it must hold is raised just above them."""
    forced = spec.get("sink_tokens", 0) + spec.get("recent_tokens", 0)
    if isinstance(spec["budget"], int) and spec["budget"] < forced:
        spec = {**spec, "budget": forced + 1}
    keys, queries = layer(seed, prompt, steps)
    assert_same(*both(spec, keys, queries, prompt))


budgets = st.one_of(st.sampled_from([0.02, 0.05, 0.2, 0.5, 1.0]), st.integers(1, 120))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(12, 80),
    steps=st.integers(1, 70),
    budget=budgets,
    sinks=st.integers(0, 6),
    recent=st.integers(0, 6),
    per_cluster=st.integers(3, 20),
    update=st.booleans(),
)
def test_static_clusters(seed, prompt, steps, budget, sinks, recent, per_cluster, update):
    spec = {"type": "static_clusters", "budget": budget, "sink_tokens": sinks,
            "recent_tokens": recent, "tokens_per_cluster": per_cluster,
            "update_centroids": update, "coretrieval_queries": 0}
    assert_fills_equal(spec, seed, prompt, steps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(12, 80),
    steps=st.integers(1, 90),
    budget=budgets,
    sinks=st.integers(0, 6),
    recent=st.integers(0, 6),
    interval=st.integers(2, 40),
    window_clusters=st.integers(1, 5),
)
def test_clusterkv(seed, prompt, steps, budget, sinks, recent, interval, window_clusters):
    spec = {"type": "clusterkv", "budget": budget, "sink_tokens": sinks,
            "recent_tokens": recent, "tokens_per_cluster": 6, "update_interval": interval,
            "window_clusters": window_clusters, "full_layers": 0, "coretrieval_queries": 0}
    assert_fills_equal(spec, seed, prompt, steps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(12, 80),
    steps=st.integers(1, 70),
    budget=budgets,
    sinks=st.integers(0, 6),
    recent=st.integers(0, 6),
    page=st.integers(1, 20),
    reduce=st.sampled_from(["sum", "max"]),
)
def test_quest(seed, prompt, steps, budget, sinks, recent, page, reduce):
    spec = {"type": "quest", "budget": budget, "sink_tokens": sinks, "recent_tokens": recent,
            "page_tokens": page, "group_reduce": reduce, "full_layers": 0}
    assert_fills_equal(spec, seed, prompt, steps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(1, 80),
    steps=st.integers(1, 70),
    budget=budgets,
    sinks=st.integers(0, 6),
    recent=st.integers(0, 6),
)
def test_streaming_llm(seed, prompt, steps, budget, sinks, recent):
    """StreamingLLM's ranking (the newest first after the sinks) as one lead window."""
    spec = {"type": "streaming_llm", "budget": budget, "sink_tokens": sinks,
            "recent_tokens": recent}
    assert_fills_equal(spec, seed, prompt, steps)


def test_tied_scores_rank_the_lowest_id_first():
    """Zero queries score every cluster and page alike: the stable order (lowest id first)
    decides, on groups as in the scores."""
    keys, queries = layer(3, 48, 30)
    queries[:] = 0.0
    for spec in (
        {"type": "static_clusters", "budget": 0.3, "sink_tokens": 2, "recent_tokens": 2,
         "tokens_per_cluster": 6, "coretrieval_queries": 0},
        {"type": "clusterkv", "budget": 0.3, "sink_tokens": 2, "tokens_per_cluster": 6,
         "update_interval": 8, "full_layers": 0, "coretrieval_queries": 0},
        {"type": "quest", "budget": 0.3, "recent_tokens": 2, "page_tokens": 4, "full_layers": 0},
    ):
        assert_same(*both(spec, keys, queries, 48))
