"""DynaKV (arXiv 2511.07427, Algorithm 1): hand-built scenarios and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.errors import ConfigError
from sim.policies import POLICIES
from sim.policies.base import LayerContext, LayerSelection
from sim.policies.dynakv import split_in_two

from .dynakv_reference import ReferenceDynaKV

# --------------------------------------------------------------------------------------------
# A tiny layer worked out by hand: 1 KV head, 1 query head, 2-D keys, P = 9.
#   position 0: the sink; A = positions 1-4 around (10, 0); B = positions 5-8 around (-10, 0),
#   each a "+" of half-width 0.1: variance 0.01 for both, so tau_h = 0.01 at any quantile.
# Budget 6 = the sink + 5 tokens. Query (1, 0) ranks A (score 10) above B (-10): the step
# takes the sink, all of A and B's earliest member (5), so A is active and B is not.
# Query (-1, 0) ranks B first.
# --------------------------------------------------------------------------------------------

PROMPT = 9
PLUS = [(0.1, 0.0), (-0.1, 0.0), (0.0, 0.1), (0.0, -0.1)]
TOWARDS_A, TOWARDS_B = (1.0, 0.0), (-1.0, 0.0)


def tiny_layer(decode_keys, decode_queries):
    prefill = [(0.0, 5.0)] + [(10 + x, y) for x, y in PLUS] + [(-10 + x, y) for x, y in PLUS]
    keys = np.array([prefill + list(decode_keys)], np.float32)
    queries = np.array([decode_queries], np.float32)
    return LayerContext(0, keys, queries, PROMPT, np.random.default_rng(0))


def tiny_policy(**overrides):
    params = {"budget": 6, "sink_tokens": 1, "recent_tokens": 0, "n_clusters": 2}
    return POLICIES.create({"type": "dynakv", **params, **overrides})


def clusters_a_b(sel: LayerSelection) -> tuple[int, int]:
    """The ids k-means gave A and B (checked to be the intended clusters)."""
    pre = sel.prefill_groups[0]
    a, b = int(pre[1]), int(pre[5])
    assert pre.tolist() == [2] + [a] * 4 + [b] * 4 and {a, b} == {0, 1}
    return a, b


def test_far_key_joining_an_unloaded_cluster_is_buffered_then_split_when_loaded():
    # step 0: (-10, 3) is nearest B, B's variance with it is (0.04 + 0.8 * 9) / 5 > tau and B
    #   is only partly loaded -> buffered; step 1: the query loads B whole (the buffered
    #   entry ranked first inside it) -> B and its buffer split; (10, 0) is A's centroid:
    #   appended (variance 0.04 / 5 <= tau).
    ctx = tiny_layer([(-10, 3), (10, 0), (10, 0)], [TOWARDS_A, TOWARDS_B, TOWARDS_A])
    sel = tiny_policy().select_layer(ctx)
    a, b = clusters_a_b(sel)
    assert sel.heads[0].at(0).tolist() == [0, 1, 2, 3, 4, 5]
    assert sel.heads[0].at(1).tolist() == [0, 5, 6, 7, 8, 9]  # B plus its buffered entry
    assert sel.append_groups[0].tolist() == [b, a, a]
    (event,) = sel.relabels[0]
    assert (event.step, event.positions.tolist(), event.group) == (1, [9], 3)
    assert sel.index_vectors[0].tolist() == [2, 2, 3]
    assert sel.extra_reads is None
    # the buffer holds 9 at the end of step 0 and nothing once B split at step 1
    assert [sel.split_buffers[0].at(s).tolist() for s in range(3)] == [[9], [], []]
    assert sel.dram_sinks == 1 and sel.dram_tail is None  # recent_tokens 0: no window


def test_buffered_entry_is_attended_first_in_a_truncated_cluster_which_is_not_split():
    # Budget 4: step 1 takes the sink, the buffered entry 9 and B's earliest 5, 6; B's 7, 8
    # stay on flash, so B is not active and is not split.
    ctx = tiny_layer([(-10, 3), (10, 0)], [TOWARDS_A, TOWARDS_B])
    sel = tiny_policy(budget=4).select_layer(ctx)
    clusters_a_b(sel)
    assert sel.heads[0].at(1).tolist() == [0, 5, 6, 9]
    assert sel.relabels[0] == [] and sel.index_vectors[0].tolist() == [2, 2]
    assert [sel.split_buffers[0].at(s).tolist() for s in range(2)] == [[9], [9]]


def test_far_key_joining_a_loaded_cluster_splits_at_once():
    ctx = tiny_layer([(10, 3), (10, 0)], [TOWARDS_A, TOWARDS_A])
    sel = tiny_policy().select_layer(ctx)
    a, _ = clusters_a_b(sel)
    assert sel.append_groups[0, 0] == a  # joined A, then moved by the split
    (event,) = sel.relabels[0]
    assert (event.step, event.positions.tolist(), event.group) == (0, [9], 3)
    assert sel.index_vectors[0].tolist() == [2, 3]
    assert sel.split_buffers is None  # nothing was ever buffered


def test_full_buffer_forces_a_load_of_the_cluster_members_on_flash():
    # buffer_max=1: the entry buffered at step 0 fills the buffers, so B is force-loaded at
    # step 0. extra_reads = B's stored members not in DRAM at that step: B = {5..8}, the
    # selection holds 5, the buffer holds only 9 (not yet stored) -> {6, 7, 8}.
    ctx = tiny_layer([(-10, 3), (10, 0)], [TOWARDS_A, TOWARDS_A])
    sel = tiny_policy(buffer_max=1).select_layer(ctx)
    _, b = clusters_a_b(sel)
    assert sel.append_groups[0, 0] == b
    assert sel.extra_reads[0].at(0).tolist() == [6, 7, 8]
    assert sel.extra_reads[0].at(1).tolist() == []
    (event,) = sel.relabels[0]
    assert (event.step, event.positions.tolist(), event.group) == (0, [9], 3)


def test_without_adaptation_the_far_key_just_joins():
    ctx = tiny_layer([(-10, 3), (10, 3)], [TOWARDS_A, TOWARDS_B])
    sel = tiny_policy(adaptation=False, buffer_max=1).select_layer(ctx)
    a, b = clusters_a_b(sel)
    assert sel.append_groups[0].tolist() == [b, a]
    assert sel.relabels is None and sel.extra_reads is None
    assert sel.index_vectors[0].tolist() == [2, 2]


# --------------------------------------------------------------------------------------------
# adaptation=False is static update: static_clusters with the same settings and seed
# --------------------------------------------------------------------------------------------


def drifting_layer(seed: int, prompt: int, steps: int, n_kv: int, group: int, d: int):
    """Topical keys whose decode part drifts to new topics (distribution shift)."""
    rng = np.random.default_rng(seed)
    total = prompt + steps
    topics = 3.0 * rng.standard_normal((n_kv, 5, d))
    shifted = 3.0 * rng.standard_normal((n_kv, 2, d))
    keys = topics[np.arange(n_kv)[:, None], rng.integers(0, 5, (n_kv, total))]
    new = shifted[np.arange(n_kv)[:, None], rng.integers(0, 2, (n_kv, steps))]
    drift = rng.random((n_kv, steps)) < 0.5
    keys[:, prompt:][drift] = new[drift]
    keys = (keys + 0.5 * rng.standard_normal((n_kv, total, d))).astype(np.float32)
    queries = np.empty((n_kv * group, steps, d), np.float32)
    for q in range(n_kv * group):
        targets = rng.integers(0, prompt + np.arange(steps)[:, None], size=(steps, 2))
        queries[q] = 0.5 * keys[q // group, targets].sum(axis=1)
    return queries, keys


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "variant",
    [
        {"budget": 24},
        {"budget": 0.2, "distance": "cosine"},
        {"budget": 30, "n_clusters": 7, "recent_tokens": 0},
    ],
)
def test_no_adaptation_equals_static_clusters(seed, variant):
    queries, keys = drifting_layer(seed, prompt=90, steps=20, n_kv=2, group=2, d=8)
    common = {"sink_tokens": 3, "recent_tokens": 4, "tokens_per_cluster": 9, **variant}
    ctx = lambda: LayerContext(0, keys, queries, 90, np.random.default_rng(seed))  # noqa: E731
    static = POLICIES.create({"type": "static_clusters", **common}).select_layer(ctx())
    off = POLICIES.create({"type": "dynakv", "adaptation": False, **common}).select_layer(ctx())
    on = POLICIES.create({"type": "dynakv", **common}).select_layer(ctx())
    np.testing.assert_array_equal(off.index_vectors, static.index_vectors)
    np.testing.assert_array_equal(off.prefill_groups, static.prefill_groups)
    np.testing.assert_array_equal(off.append_groups, static.append_groups)
    for x, y in zip(off.heads, static.heads, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.offsets, y.offsets)
    # Adaptation starts from the very same prefill clusters.
    np.testing.assert_array_equal(on.prefill_groups, static.prefill_groups)


# --------------------------------------------------------------------------------------------
# Invariants on random small layers
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(12, 60),
    steps=st.integers(1, 24),
    n_kv=st.integers(1, 2),
    group=st.integers(1, 2),
    d=st.integers(2, 6),
    budget=st.one_of(st.integers(8, 12), st.floats(0.2, 0.9)),
    sinks=st.integers(0, 3),
    recent=st.integers(0, 4),
    per_cluster=st.integers(2, 8),
    buffer_max=st.integers(1, 4),
    tau_quantile=st.floats(0.0, 1.0),
    distance=st.sampled_from(["euclidean", "cosine"]),
)
def test_cluster_invariants(
    seed, prompt, steps, n_kv, group, d, budget, sinks, recent, per_cluster, buffer_max,
    tau_quantile, distance,
):
    queries, keys = drifting_layer(seed, prompt, steps, n_kv, group, d)
    policy = POLICIES.create(
        {
            "type": "dynakv", "budget": budget, "sink_tokens": sinks, "recent_tokens": recent,
            "tokens_per_cluster": per_cluster, "buffer_max": buffer_max,
            "tau_quantile": tau_quantile, "distance": distance,
        }
    )
    sel = policy.select_layer(LayerContext(0, keys, queries, prompt, np.random.default_rng(seed)))
    for h in range(n_kv):
        pre, app = sel.prefill_groups[h], sel.append_groups[h]
        n0 = int(sel.index_vectors[h, 0])
        sink_id = n0
        assert (pre[:sinks] == sink_id).all() and ((pre[sinks:] >= 0) & (pre[sinks:] < n0)).all()
        labels = np.full(prompt + steps, -1)
        labels[:prompt] = pre
        live = set(range(n0))
        events = iter(sel.relabels[h])
        event = next(events, None)
        relabels_so_far = 0
        for s in range(steps):
            ctx_len = prompt + s
            # cluster count = initial + relabels of earlier steps
            assert sel.index_vectors[h, s] == n0 + relabels_so_far == len(live)
            pos = sel.heads[h].at(s)
            assert len(pos) == policy.budget_at(ctx_len)
            assert (np.diff(pos) > 0).all() and pos.min() >= 0 and pos.max() < ctx_len
            forced = {*range(min(sinks, ctx_len)), *range(ctx_len - recent, ctx_len)}
            if len(pos) >= len(forced):
                assert forced <= set(pos.tolist())
            assert app[s] in live
            labels[ctx_len] = app[s]
            if sel.extra_reads is not None:
                extra = sel.extra_reads[h].at(s)
                assert not np.isin(extra, pos).any()
                if len(extra):
                    assert extra.max() < ctx_len and len(set(labels[extra].tolist())) == 1
            while event is not None and event.step == s:
                moved = event.positions
                assert len(moved) and moved.max() <= ctx_len
                (old,) = set(labels[moved].tolist())  # members of one (old) cluster
                assert old in live and event.group == n0 + 1 + relabels_so_far
                labels[moved] = event.group
                live.add(event.group)
                relabels_so_far += 1
                event = next(events, None)
            assert event is None or event.step > s, "relabels are time-ordered"
            # every stored position in exactly one cluster (or the sinks), no cluster empty
            seen = labels[: ctx_len + 1]
            assert set(seen[sinks:].tolist()) == live
            assert (seen[:sinks] == sink_id).all()
        assert event is None


# --------------------------------------------------------------------------------------------
# The optimised step loop equals the original one (tests/dynakv_reference.py) bit for bit
# --------------------------------------------------------------------------------------------


def assert_same_selection(got: LayerSelection, want: LayerSelection) -> None:
    def same_heads(a, b):
        assert (a is None) == (b is None)
        for x, y in zip(a or [], b or [], strict=True):
            np.testing.assert_array_equal(x.positions, y.positions, strict=True)
            np.testing.assert_array_equal(x.offsets, y.offsets, strict=True)

    same_heads(got.heads, want.heads)
    same_heads(got.extra_reads, want.extra_reads)
    for name in ("index_vectors", "prefill_groups", "append_groups"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), strict=True)
    assert (got.relabels is None) == (want.relabels is None)
    for x, y in zip(got.relabels or [], want.relabels or [], strict=True):
        assert len(x) == len(y)
        for a, b in zip(x, y, strict=True):
            assert (a.step, a.group) == (b.step, b.group)
            np.testing.assert_array_equal(a.positions, b.positions, strict=True)
    assert (got.coretrieval is None) == (want.coretrieval is None)
    for x, y in zip(got.coretrieval or [], want.coretrieval or [], strict=True):
        np.testing.assert_array_equal(x, y, strict=True)


def same_as_reference(seed, prompt, steps, n_kv, group, d, **params):
    queries, keys = drifting_layer(seed, prompt, steps, n_kv, group, d)
    spec = {"type": "dynakv", **params}
    fast = POLICIES.create(spec)
    reference = ReferenceDynaKV(**{k: v for k, v in spec.items() if k != "type"})
    ctx = lambda: LayerContext(0, keys, queries, prompt, np.random.default_rng(seed))  # noqa: E731
    assert_same_selection(fast.select_layer(ctx()), reference.select_layer(ctx()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    prompt=st.integers(12, 80),
    steps=st.integers(1, 30),
    n_kv=st.integers(1, 2),
    d=st.integers(2, 6),
    budget=st.one_of(st.integers(1, 40), st.floats(0.01, 1.0)),
    sinks=st.integers(0, 4),
    recent=st.integers(0, 6),
    per_cluster=st.integers(2, 10),
    buffer_max=st.integers(1, 5),
    tau_quantile=st.floats(0.0, 1.0),
    distance=st.sampled_from(["euclidean", "cosine"]),
    adaptation=st.booleans(),
)
def test_step_loop_matches_the_reference_implementation(
    seed, prompt, steps, n_kv, d, budget, sinks, recent, per_cluster, buffer_max,
    tau_quantile, distance, adaptation,
):
    if isinstance(budget, int) and budget < sinks + recent:
        budget = sinks + recent  # a token budget must hold the forced positions
    same_as_reference(
        seed, prompt, steps, n_kv, 2, d, budget=budget, sink_tokens=sinks,
        recent_tokens=recent, tokens_per_cluster=per_cluster, buffer_max=buffer_max,
        tau_quantile=tau_quantile, distance=distance, adaptation=adaptation,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("buffer_max", [2, 16])
def test_step_loop_matches_the_reference_on_a_longer_layer(seed, buffer_max):
    # Hundreds of positions and steps: many splits, buffers, forced loads and truncations.
    same_as_reference(
        seed, 400, 120, 2, 3, 8, budget=0.1, sink_tokens=4, recent_tokens=8,
        tokens_per_cluster=20, buffer_max=buffer_max, tau_quantile=0.5,
    )


# --------------------------------------------------------------------------------------------
# The split and the parameters
# --------------------------------------------------------------------------------------------


def test_split_in_two_separates_groups_and_never_empties():
    points = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [0, 0.1]], np.float64)
    half = split_in_two(points, iters=10)
    assert half.tolist() in ([False, False, True, True, False], [True, True, False, False, True])
    for n in (2, 3, 6):
        same = np.ones((n, 3))
        half = split_in_two(same, iters=10)
        assert 0 < half.sum() < n


@pytest.mark.parametrize(
    "bad",
    [
        {"adaptation": "yes"},
        {"tau_quantile": 1.5},
        {"tau_quantile": -0.1},
        {"buffer_max": 0},
        {"split_iters": 0},
        {"tokens_per_cluster": 0},
        {"distance": "manhattan"},
        {"n_clusters": 0},
    ],
)
def test_parameters_are_validated(bad):
    with pytest.raises(ConfigError):
        POLICIES.create({"type": "dynakv", **bad})


def test_defaults_are_documented():
    doc = POLICIES.get("dynakv").__doc__
    policy = POLICIES.create("dynakv")
    for name in ("tau_quantile", "buffer_max", "split_iters", "adaptation", "tokens_per_cluster"):
        assert f"{name} (" in doc and f"default {getattr(policy, name)}" in doc
    assert "2511.07427" in doc and "Algorithm 1" in doc
