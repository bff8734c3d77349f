"""PQCache (sim.policies.pqcache): lookup-table scores by hand, exact codes give the exact
top-k, static codebooks encode decode tokens, the index-size formula by hand."""

from __future__ import annotations

import numpy as np
import pytest

from sim.errors import ConfigError
from sim.policies import POLICIES
from sim.policies.base import LayerContext
from sim.policies.pqcache import lut_scores, pq_train_encode


def ctx_of(keys, queries, prompt: int, seed: int = 0) -> LayerContext:
    return LayerContext(
        0, np.asarray(keys, np.float32), np.asarray(queries, np.float32), prompt,
        np.random.default_rng(seed),
    )  # fmt: skip


def selections(policy, ctx) -> list[list[list[int]]]:
    """[head][step] -> sorted positions."""
    sel = policy.select_layer(ctx)
    return [[h.at(s).tolist() for s in range(ctx.decode_steps)] for h in sel.heads]


def test_defaults():
    p = POLICIES.create("pqcache")
    assert (p.budget, p.sink_tokens, p.recent_tokens) == (1024, 32, 32)
    assert (p.n_subvectors, p.bits, p.max_iter, p.group_score) == (2, 6, 20, "softmax")


def test_lookup_table_score_by_hand():
    # 2-D keys, 2 sub-vectors of 1 dim. Codebooks C0 = {1, 3}, C1 = {-2, 5}.
    books = [np.array([[1.0], [3.0]], np.float32), np.array([[-2.0], [5.0]], np.float32)]
    codes = np.array([[0, 1], [1, 0], [1, 1]], np.int32)  # keys (1,5), (3,-2), (3,5)
    # q = (2, 1): T0 = [2, 6], T1 = [-2, 5] -> 2+5, 6-2, 6+5.
    # q = (-1, 0.5): T0 = [-1, -3], T1 = [-1, 2.5] -> -1+2.5, -3-1, -3+2.5.
    q = np.array([[2.0, 1.0], [-1.0, 0.5]], np.float32)
    np.testing.assert_allclose(lut_scores(q, books, codes), [[7, 4, 11], [1.5, -4, -0.5]])


def test_decode_tokens_use_the_prefill_codebooks():
    # Sub-space 0 trains on {0, 0.2, 10, 10.2} -> centroids {0.1, 10.1}; sub-space 1 on
    # {-5, -5.4, 4, 4.4} -> {-5.2, 4.2} (one sink at position 0 is left out of training).
    prefill = [[99.0, 99.0], [0.0, -5.0], [0.2, 4.0], [10.0, -5.4], [10.2, 4.4]]
    decode = [[10.1, -5.2], [0.1, 4.2], [0.1, -5.2]]  # every decode sub-vector is a centroid
    keys = np.array(prefill + decode, np.float32)
    books, codes = pq_train_encode(keys, 1, 5, 2, 1, 20, np.random.default_rng(3))
    np.testing.assert_allclose(np.sort(books[0][:, 0]), [0.1, 10.1], rtol=1e-6)
    np.testing.assert_allclose(np.sort(books[1][:, 0]), [-5.2, 4.2], rtol=1e-6)
    for t, key in enumerate(decode):
        for m in range(2):
            assert books[m][codes[5 + t, m], 0] == pytest.approx(key[m])
    # Static: the decode keys change nothing in the codebooks.
    other = keys.copy()
    other[5:] = 1000.0
    books2, codes2 = pq_train_encode(other, 1, 5, 2, 1, 20, np.random.default_rng(3))
    for a, b in zip(books, books2, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(codes[:5], codes2[:5])


def exact_codes_layer(seed: int = 0):
    """8 prompt keys (each sub-vector distinct: with 2^bits >= 8 it is its own centroid) and
    decode keys copied from prompt keys, so every code is exact. 2 KV heads, group 3, d = 4."""
    rng = np.random.default_rng(seed)
    prompt, steps, n_kv, group, d = 8, 5, 2, 3, 4
    keys = rng.standard_normal((n_kv, prompt + steps, d)).astype(np.float32)
    keys[:, prompt:] = keys[:, [3, 0, 6, 3, 1]]
    queries = rng.standard_normal((n_kv * group, steps, d)).astype(np.float32)
    return keys, queries, prompt


@pytest.mark.parametrize("bits", [3, 6])
def test_exact_codes_give_the_exact_topk_by_summed_inner_product(bits):
    keys, queries, prompt = exact_codes_layer()
    n_kv, group = keys.shape[0], queries.shape[0] // keys.shape[0]
    policy = POLICIES.create(
        {"type": "pqcache", "budget": 3, "sink_tokens": 0, "recent_tokens": 0,
         "bits": bits, "group_score": "sum"}
    )  # fmt: skip
    got = selections(policy, ctx_of(keys, queries, prompt))
    k64, q64 = keys.astype(np.float64), queries.astype(np.float64)
    for h in range(n_kv):
        for s in range(queries.shape[1]):
            summed_q = q64[h * group : (h + 1) * group, s].sum(axis=0)
            scores = k64[h, : prompt + s] @ summed_q
            assert got[h][s] == sorted(np.argsort(-scores)[:3].tolist())


def test_exact_codes_softmax_matches_token_topk():
    keys, queries, prompt = exact_codes_layer(seed=1)
    common = {"budget": 4, "sink_tokens": 1, "recent_tokens": 1}
    pq = POLICIES.create({"type": "pqcache", "bits": 4, **common})
    topk = POLICIES.create({"type": "token_topk", **common})
    ctx = ctx_of(keys, queries, prompt)
    assert selections(pq, ctx) == selections(topk, ctx)


def test_index_vectors_by_hand():
    # d = 16: an FP16 key is 256 bits; a token's codes 2 x 6 = 12 bits.
    # s = 0: 2^6 + ceil(64 * 12 / 256) = 64 + 3 = 67; s = 1..11: ceil((65..75) * 12 / 256) = 4.
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 64 + 12, 16))
    queries = rng.standard_normal((6, 12, 16))
    sel = POLICIES.create({"type": "pqcache", "budget": 16, "sink_tokens": 2,
                           "recent_tokens": 3}).select_layer(ctx_of(keys, queries, 64))  # fmt: skip
    want = [67] + [68] * 11
    assert sel.index_vectors.tolist() == [want, want]
    assert sel.prefill_groups is None and sel.append_groups is None
    # bits = 2, 4 sub-vectors: 4 + ceil((64 + s) * 8 / 256) = 4 + 2 (s = 0), 4 + 3 (s >= 1).
    policy = POLICIES.create({"type": "pqcache", "n_subvectors": 4, "bits": 2})
    assert policy.index_vectors(64, 3, 1, 16).tolist() == [[6, 7, 7]]


@pytest.mark.parametrize(
    "bad",
    [{"bits": 0}, {"bits": 17}, {"n_subvectors": 0}, {"max_iter": 0}, {"group_score": "max"}],
)
def test_parameters_are_validated(bad):
    with pytest.raises(ConfigError):
        POLICIES.create({"type": "pqcache", **bad})


def test_head_dim_must_split_and_prompt_must_pass_the_sinks():
    keys, queries, prompt = exact_codes_layer()
    odd = {"type": "pqcache", "budget": 3, "sink_tokens": 0, "recent_tokens": 0, "n_subvectors": 3}
    with pytest.raises(ValueError, match="divide"):
        POLICIES.create(odd).select_layer(ctx_of(keys, queries, prompt))
    with pytest.raises(ValueError, match="sinks"):
        POLICIES.create({"type": "pqcache", "budget": 0.5, "sink_tokens": 8}).select_layer(
            ctx_of(keys, queries, prompt)
        )
    assert POLICIES.create({"type": "pqcache", "budget": 0.5}).min_context() == 33
