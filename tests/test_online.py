"""The step-wise (online) form of every policy against its vectorised layer pass.

Differential: driving a policy's online form (:mod:`sim.policies.online`) over a trace layer
one token at a time, as a model would (prefill, then select with the step's query and append
its key), must give exactly the selections of ``select_layer`` on the same layer and seed. The
online form never sees a future key or query, so equality also shows the vectorised path is
causal.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.policies import POLICIES
from sim.policies.base import LayerContext, LayerSelection, RetrievalPolicy
from sim.policies.online import drive_layer, has_online_form, online_layer

#: Policies with an online form; the registry test fails if one of them loses it.
ONLINE = {"full", "token_topk", "oracle", "static_clusters", "clusterkv", "dynakv",
          "streaming_llm", "h2o", "pqcache", "quest", "infinigen"}
#: Registered policies without one yet (the next session shrinks this list when a policy is
#: added without its online form).
EXPECTED_MISSING: set[str] = set()


def test_every_registered_policy_is_listed_with_or_without_an_online_form():
    names = set(POLICIES.names())
    assert ONLINE.isdisjoint(EXPECTED_MISSING)
    assert names == ONLINE | EXPECTED_MISSING, (
        f"unlisted: {sorted(names - ONLINE - EXPECTED_MISSING)}; "
        f"listed but unregistered: {sorted((ONLINE | EXPECTED_MISSING) - names)}"
    )
    for name in sorted(names):
        policy = POLICIES.create({"type": name})
        assert has_online_form(policy) == (name in ONLINE), name


class NoOnlineForm(RetrievalPolicy):
    """A policy with only the vectorised form (never registered)."""

    name = "no_online_form"

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        return LayerSelection.full(ctx)


def test_a_policy_without_an_online_form_says_so():
    assert not has_online_form(NoOnlineForm())
    with pytest.raises(NotImplementedError, match="'no_online_form' has no online"):
        online_layer(NoOnlineForm(), 5, 2, 10, np.random.default_rng(0))


#: policies whose scores tie exactly by design (pqcache: tokens with the same codes score the
#: same), where the pass's top-k picks among the tied arbitrarily (``LayerIndex``): their online
#: form must select the same scores, not necessarily the same tied positions
TIES = {"pqcache"}


def assert_same_up_to_ties(policy, ctx_factory) -> None:
    """Every step's selection holds the same multiset of the step's scores as the pass's: the
    same up to exchanging positions of exactly equal score."""
    want: LayerSelection = policy.select_layer(ctx_factory())
    ctx = ctx_factory()
    keys = np.asarray(ctx.keys, np.float32)
    prompt = ctx.prompt_len
    layer = online_layer(policy, ctx.layer, ctx.n_kv_heads, keys.shape[1], ctx.rng)
    layer.prefill(keys[:, :prompt])
    assert want.heads is not None
    for s in range(ctx.decode_steps):
        query, key = ctx.queries[:, s], keys[:, prompt + s]
        scores = layer.scores(query, key)[:, 0]
        got = layer.select(query, key)
        assert got is not None
        for h, positions in enumerate(got):
            expected = want.heads[h].at(s)
            assert len(positions) == len(expected)
            if not np.array_equal(positions, expected):
                np.testing.assert_array_equal(np.sort(scores[h, positions]),
                                              np.sort(scores[h, expected]))
        layer.append(key)


def assert_same(policy, ctx_factory) -> None:
    """``drive_layer`` equals ``select_layer`` step by step, head by head."""
    if policy.name in TIES:
        assert_same_up_to_ties(policy, ctx_factory)
        return
    want: LayerSelection = policy.select_layer(ctx_factory())
    got = drive_layer(policy, ctx_factory())
    if want.heads is None:
        assert got is None
        return
    assert got is not None
    steps = len(want.heads[0].offsets) - 1
    for h, (w, g) in enumerate(zip(want.heads, got, strict=True)):
        for s in range(steps):
            np.testing.assert_array_equal(g.at(s), w.at(s), err_msg=f"head {h} step {s}")


# --------------------------------------------------------------------------------------------
# The committed real trace (SmolLM2-135M, 160 + 24 positions)
# --------------------------------------------------------------------------------------------

TRACE_SPECS = [
    {"type": "full"},
    {"type": "token_topk", "budget": 0.1},
    {"type": "token_topk", "budget": 20, "sink_tokens": 4, "recent_tokens": 4},
    {"type": "oracle", "budget": 0.2},
    {"type": "static_clusters", "budget": 0.2, "tokens_per_cluster": 16},
    {"type": "static_clusters", "budget": 0.15, "tokens_per_cluster": 10,
     "update_centroids": True, "distance": "cosine"},
    {"type": "clusterkv", "budget": 0.2, "tokens_per_cluster": 16, "update_interval": 8,
     "window_clusters": 2},
    {"type": "dynakv", "budget": 0.2, "tokens_per_cluster": 16, "buffer_max": 4,
     "tau_quantile": 0.5},
    {"type": "dynakv", "budget": 0.2, "tokens_per_cluster": 16, "adaptation": False},
    {"type": "dynakv", "budget": 0.25, "tokens_per_cluster": 12, "distance": "cosine",
     "tau_quantile": 0.3, "buffer_max": 3},
    {"type": "streaming_llm", "budget": 0.1},
    {"type": "quest", "budget": 0.2},
    {"type": "quest", "budget": 40, "page_tokens": 8, "sink_tokens": 2, "group_reduce": "max",
     "full_layers": 0},
    {"type": "pqcache", "budget": 0.2, "bits": 4},
    {"type": "pqcache", "budget": 24, "sink_tokens": 4, "recent_tokens": 4, "n_subvectors": 4,
     "group_score": "sum"},
]


@pytest.mark.parametrize("spec", TRACE_SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_online_form_equals_the_layer_pass_on_the_sample_trace(fixture_trace, spec):
    policy = POLICIES.create(spec)
    trace = fixture_trace
    for layer in (0, 2, 13, 29):  # a dense layer of clusterkv and three others
        def ctx(layer=layer):
            return LayerContext(
                layer=layer, keys=np.asarray(trace.keys(layer), np.float32),
                queries=np.asarray(trace.decode_queries(layer), np.float32),
                prompt_len=trace.prompt_len, rng=np.random.default_rng([0, layer]),
            )
        assert_same(policy, ctx)


def test_the_spec_list_covers_every_online_policy():
    # h2o and infinigen need the prompt's queries, which the sample trace does not store
    # (queries: decode; infinigen also speculative queries): the generated layers test them
    assert {spec["type"] for spec in TRACE_SPECS} == ONLINE - {"h2o", "infinigen"}


# --------------------------------------------------------------------------------------------
# Small generated layers: shifting topics, every budget regime
# --------------------------------------------------------------------------------------------


def drifting_layer(seed: int, prompt: int, steps: int, n_kv: int, group: int, d: int):
    """Topical keys whose decode part drifts to new topics; queries near stored keys."""
    rng = np.random.default_rng(seed)
    total = prompt + steps
    topics = 3.0 * rng.standard_normal((n_kv, 5, d))
    shifted = 3.0 * rng.standard_normal((n_kv, 2, d))
    keys = topics[np.arange(n_kv)[:, None], rng.integers(0, 5, (n_kv, total))]
    new = shifted[np.arange(n_kv)[:, None], rng.integers(0, 2, (n_kv, steps))]
    drift = rng.random((n_kv, steps)) < 0.5
    keys[:, prompt:][drift] = new[drift]
    keys = (keys + 0.5 * rng.standard_normal((n_kv, total, d))).astype(np.float32)
    queries = np.empty((n_kv * group, total, d), np.float32)  # every position's
    for q in range(n_kv * group):
        targets = rng.integers(0, np.arange(1, total + 1)[:, None], size=(total, 2))
        queries[q] = 0.5 * keys[q // group, targets].sum(axis=1)
    queries += 0.1 * rng.standard_normal(queries.shape).astype(np.float32)
    return queries, keys


def policy_spec(draw, name: str) -> dict:
    if name == "full":
        return {"type": name}
    budget = draw(st.one_of(st.integers(1, 60), st.sampled_from([0.05, 0.2, 0.5, 1.0])))
    sinks = draw(st.integers(0, 4))
    recent = draw(st.integers(0, 4))
    if isinstance(budget, int):
        budget = max(budget, sinks + recent)
    spec = {"type": name, "budget": budget, "sink_tokens": sinks, "recent_tokens": recent}
    if name in ("static_clusters", "clusterkv", "dynakv"):
        spec["tokens_per_cluster"] = draw(st.integers(3, 15))
        spec["distance"] = draw(st.sampled_from(["euclidean", "cosine"]))
    if name == "static_clusters":
        spec["update_centroids"] = draw(st.booleans())
    if name == "clusterkv":
        spec["update_interval"] = draw(st.integers(1, 9))
        spec["window_clusters"] = draw(st.integers(1, 3))
        spec["full_layers"] = draw(st.integers(0, 1))
    if name == "pqcache":
        spec["n_subvectors"] = draw(st.sampled_from([1, 2, 4]))
        spec["bits"] = draw(st.integers(1, 4))
        spec["group_score"] = draw(st.sampled_from(["softmax", "sum"]))
    if name == "quest":
        spec["page_tokens"] = draw(st.integers(1, 9))
        spec["group_reduce"] = draw(st.sampled_from(["sum", "max"]))
        spec["full_layers"] = draw(st.integers(0, 1))
    if name == "infinigen":
        spec["partial_ratio"] = draw(st.sampled_from([0.25, 0.5, 1.0]))
        spec["alpha"] = draw(st.sampled_from([0.0, 1.0, 4.0]))
        spec["full_layers"] = draw(st.integers(0, 1))
    if name == "h2o":
        spec["recent_ratio"] = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    if name == "dynakv":
        spec["adaptation"] = draw(st.booleans())
        spec["tau_quantile"] = draw(st.sampled_from([0.0, 0.3, 0.9]))
        spec["buffer_max"] = draw(st.integers(1, 5))
    return spec


@st.composite
def online_cases(draw):
    name = draw(st.sampled_from(sorted(ONLINE)))
    spec = policy_spec(draw, name)
    layer = dict(
        seed=draw(st.integers(0, 2**16)), prompt=draw(st.integers(12, 50)),
        steps=draw(st.integers(1, 25)), n_kv=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 3)), d=draw(st.sampled_from([4, 8])),
    )
    return spec, layer, draw(st.integers(0, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(online_cases())
def test_online_form_equals_the_layer_pass_on_generated_layers(case):
    spec, shape, layer = case
    policy = POLICIES.create(spec)
    queries, keys = drifting_layer(**shape)
    prompt = shape["prompt"]

    speculative = queries[:, prompt:] + 0.3 * np.random.default_rng(shape["seed"]).standard_normal(
        queries[:, prompt:].shape).astype(np.float32)  # the previous layer's, roughly

    def ctx():
        return LayerContext(layer=layer, keys=keys, queries=queries[:, prompt:],
                            prompt_len=prompt, rng=np.random.default_rng([7, layer]),
                            stored_queries=queries.astype(np.float16), query_start=0,
                            speculative_queries=None if layer == 0 else speculative)

    assert_same(policy, ctx)


# --------------------------------------------------------------------------------------------
# The protocol's own rules
# --------------------------------------------------------------------------------------------


def test_the_protocol_refuses_steps_out_of_order():
    layer = online_layer(POLICIES.create({"type": "token_topk", "budget": 2}), 0, 1, 4,
                         np.random.default_rng(0))
    keys = np.ones((1, 3, 2), np.float32)
    with pytest.raises(ValueError, match="before prefill"):
        layer.select(np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"\(1, P >= 1, d\)"):
        layer.prefill(np.ones((2, 3, 2)))
    layer.prefill(keys)
    with pytest.raises(ValueError, match="prefill once"):
        layer.prefill(keys)
    layer.append(np.ones((1, 2)))
    with pytest.raises(ValueError, match="capacity of 4"):
        layer.append(np.ones((1, 2)))


def test_token_topk_online_picks_the_most_attended_stored_positions():
    """Hand-built: one KV head, one query head, the query aligned with keys 1 and 3."""
    layer = online_layer(POLICIES.create({"type": "token_topk", "budget": 2}), 0, 1, 6,
                         np.random.default_rng(0))
    keys = np.array([[[0, 1], [4, 0], [0, -1], [3, 0]]], np.float32)
    layer.prefill(keys)
    chosen = layer.select(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))
    assert chosen is not None
    np.testing.assert_array_equal(chosen[0], [1, 3])
    layer.append(np.array([[5.0, 0.0]]))  # the new key is stored at position 4 ...
    chosen = layer.select(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))
    assert chosen is not None
    np.testing.assert_array_equal(chosen[0], [1, 4])  # ... and outranks position 3


@pytest.mark.parametrize("spec", [
    {"type": "quest", "budget": 0.2, "page_tokens": 4, "full_layers": 0},
    {"type": "quest", "budget": 20, "page_tokens": 5, "group_reduce": "max", "full_layers": 0,
     "recent_tokens": 4},
    {"type": "token_topk", "budget": 0.1, "sink_tokens": 2},
    {"type": "static_clusters", "budget": 0.2, "tokens_per_cluster": 6},
    {"type": "clusterkv", "budget": 0.2, "tokens_per_cluster": 6, "update_interval": 20,
     "full_layers": 0},
])
def test_online_form_equals_the_layer_pass_across_the_pass_s_step_chunks(spec):
    """70 decode steps: the pass scores 32 steps at a time; the online form one."""
    queries, keys = drifting_layer(seed=5, prompt=50, steps=70, n_kv=2, group=3, d=8)

    def ctx():
        return LayerContext(layer=3, keys=keys, queries=queries[:, 50:], prompt_len=50,
                            rng=np.random.default_rng([1, 3]))

    assert_same(POLICIES.create(spec), ctx)
