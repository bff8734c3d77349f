"""Accuracy metrics against hand-computed softmax numbers and a naive reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.metrics.accuracy import layer_accuracy
from sim.policies.base import HeadSelections, LayerSelection

# Tiny layer: 1 KV head, 2 query heads, P=3, S=2, d=2. Queries are scaled by sqrt(2) so the
# logits q.k / sqrt(d) are plain dot products with the unscaled directions below.
R2 = math.sqrt(2.0)
KEYS = np.array([[[1, 0], [0, 1], [0.5, 0.5], [0, 0], [1, 1]]], dtype=np.float32)
VALUES = np.array([[[1, 0], [0, 1], [1, 1], [2, 0], [0, 2]]], dtype=np.float32)
QUERIES = np.array([[[R2, 0], [R2, R2]], [[0, R2], [0, 0]]], dtype=np.float32)  # (H_q=2, S=2, d=2)
P = 3


def selection(*per_step: list[int], heads: int = 1) -> LayerSelection:
    rows = [np.array(p, dtype=np.int32) for p in per_step]
    return LayerSelection(
        [HeadSelections.from_lists(rows) for _ in range(heads)],
        np.zeros((heads, len(rows)), np.int64),
    )


def by_hand(logits: list[float], values: list[list[float]], chosen: set[int]) -> tuple:
    """(recall, output error) from logits over [0, P+s] with math.exp; the last is current."""
    e = [math.exp(x) for x in logits]
    z = sum(e)
    keep = chosen | {len(logits) - 1}
    zs = sum(e[j] for j in keep)
    full = [sum(e[j] * values[j][c] for j in range(len(e))) / z for c in range(2)]
    sel = [sum(e[j] * values[j][c] for j in keep) / zs for c in range(2)]
    err = math.dist(full, sel) / math.hypot(*full)
    return zs / z, err


def test_hand_computed_step0():
    # Step 0 attends keys 0..2 plus current key 3 = [0, 0]; selection {0}.
    acc = layer_accuracy(QUERIES, KEYS, VALUES, P, selection([0], [1, 2]))
    # Head 0, q = [1, 0]: logits 1, 0, 0.5, 0 -> recall (e + 1) / (e + 2 + sqrt(e)).
    e = math.e
    assert acc["attention_recall"][0, 0] == pytest.approx((e + 1) / (e + 2 + math.sqrt(e)))
    # Head 1, q = [0, 1]: logits 0, 1, 0.5, 0 -> recall 2 / (e + 2 + sqrt(e)).
    assert acc["attention_recall"][1, 0] == pytest.approx(2 / (e + 2 + math.sqrt(e)))
    # Top-1 of head 0 is key 0 (selected); of head 1 it is key 1 (not selected).
    assert acc["topk_recall"][:, 0].tolist() == [1.0, 0.0]
    vals = VALUES[0].tolist()
    for head, logits in ((0, [1, 0, 0.5, 0]), (1, [0, 1, 0.5, 0])):
        _, err = by_hand(logits, vals[:4], {0})
        assert acc["output_rel_error"][head, 0] == pytest.approx(err, rel=1e-5)
    assert acc["n_selected"][:, 0].tolist() == [1, 1]


def test_hand_computed_step1():
    # Step 1 attends keys 0..3 plus current key 4 = [1, 1]; selection {1, 2}.
    acc = layer_accuracy(QUERIES, KEYS, VALUES, P, selection([0], [1, 2]))
    vals = VALUES[0].tolist()
    # Head 0, q = [1, 1]: logits 1, 1, 1, 0, 2. Head 1, q = 0: uniform.
    for head, logits in ((0, [1, 1, 1, 0, 2]), (1, [0, 0, 0, 0, 0])):
        recall, err = by_hand(logits, vals, {1, 2})
        assert acc["attention_recall"][head, 1] == pytest.approx(recall, rel=1e-6)
        assert acc["output_rel_error"][head, 1] == pytest.approx(err, rel=1e-5, abs=1e-7)
    # Head 0: top-2 of (1, 1, 1, 0) is a tie among keys 0-2; ties favour the selection.
    assert acc["topk_recall"][0, 1] == 1.0
    assert acc["attention_recall"][1, 1] == pytest.approx(3 / 5)


def test_full_selection_is_exact():
    full = LayerSelection(None, np.zeros((1, 2), np.int64))
    acc = layer_accuracy(QUERIES, KEYS, VALUES, P, full)
    assert (acc["attention_recall"] == 1).all() and (acc["topk_recall"] == 1).all()
    assert (acc["output_rel_error"] == 0).all()
    assert acc["n_selected"].tolist() == [[3, 4], [3, 4]]


def random_layer(rng: np.random.Generator, prompt: int, steps: int, n_q=4, n_kv=2, d=8):
    total = prompt + steps
    keys = rng.standard_normal((n_kv, total, d)).astype(np.float32)
    values = rng.standard_normal((n_kv, total, d)).astype(np.float32)
    queries = (2 * rng.standard_normal((n_q, steps, d))).astype(np.float32)
    return queries, keys, values


def random_selection(rng, n_kv, prompt, steps, frac=None) -> LayerSelection:
    heads = []
    for _ in range(n_kv):
        rows = []
        for s in range(steps):
            c = prompt + s
            k = int(rng.integers(0, c + 1)) if frac is None else max(1, math.ceil(frac * c))
            rows.append(np.sort(rng.choice(c, k, replace=False)))
        heads.append(HeadSelections.from_lists(rows))
    return LayerSelection(heads, np.zeros((n_kv, steps), np.int64))


def test_explicit_everything_equals_full():
    rng = np.random.default_rng(3)
    q, k, v = random_layer(rng, 20, 6)
    sel = LayerSelection(
        [HeadSelections.from_lists([np.arange(20 + s) for s in range(6)]) for _ in range(2)],
        np.zeros((2, 6), np.int64),
    )
    acc = layer_accuracy(q, k, v, 20, sel)
    np.testing.assert_allclose(acc["attention_recall"], 1.0, atol=1e-6)
    np.testing.assert_array_equal(acc["topk_recall"], 1.0)
    np.testing.assert_allclose(acc["output_rel_error"], 0.0, atol=1e-6)
    assert (acc["n_selected"] == 20 + np.arange(6)).all()


@pytest.mark.parametrize("frac", [None, 0.3])
def test_matches_naive_reference(frac):
    """Differential test: every metric against a per-(head, step) float64 loop."""
    rng = np.random.default_rng(7)
    prompt, steps, n_q, n_kv, d = 30, 11, 6, 2, 8
    q, k, v = random_layer(rng, prompt, steps, n_q, n_kv, d)
    sel = random_selection(rng, n_kv, prompt, steps, frac)
    # fp16 inputs and an odd chunk size exercise conversion and ragged chunks.
    acc = layer_accuracy(
        q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), prompt, sel, chunk_steps=4
    )
    q, k, v = (a.astype(np.float16).astype(np.float64) for a in (q, k, v))
    group = n_q // n_kv
    for qh in range(n_q):
        h = qh // group
        for s in range(steps):
            c = prompt + s
            x = k[h, : c + 1] @ q[qh, s] / math.sqrt(d)
            p = np.exp(x - x.max())
            p /= p.sum()
            chosen = sel.heads[h].at(s)
            keep = np.zeros(c + 1, bool)
            keep[chosen] = keep[c] = True
            n = len(chosen)
            top = np.argsort(-p[:c], kind="stable")[:n]
            want_topk = 1.0 if n in (0, c) else len(np.intersect1d(top, chosen)) / n
            full = p @ v[h, : c + 1]
            ps = np.where(keep, p, 0) / p[keep].sum()
            err = np.linalg.norm(ps @ v[h, : c + 1] - full) / np.linalg.norm(full)
            assert acc["attention_recall"][qh, s] == pytest.approx(p[keep].sum(), abs=1e-5)
            assert acc["topk_recall"][qh, s] == pytest.approx(want_topk)
            assert acc["output_rel_error"][qh, s] == pytest.approx(err, rel=1e-4, abs=1e-5)
            assert acc["n_selected"][qh, s] == n


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), prompt=st.integers(1, 24), steps=st.integers(1, 9))
def test_recall_bounded_and_monotone(seed, prompt, steps):
    rng = np.random.default_rng(seed)
    q, k, v = random_layer(rng, prompt, steps)
    small = random_selection(rng, 2, prompt, steps)
    # A superset of every step's selection: add random extra positions.
    bigger = LayerSelection(
        [
            HeadSelections.from_lists(
                [np.union1d(h.at(s), rng.choice(prompt + s, 1 + s // 2)) for s in range(steps)]
            )
            for h in small.heads
        ],
        small.index_vectors,
    )
    a = layer_accuracy(q, k, v, prompt, small, chunk_steps=3)
    b = layer_accuracy(q, k, v, prompt, bigger, chunk_steps=3)
    for acc in (a, b):
        assert ((0 <= acc["attention_recall"]) & (acc["attention_recall"] <= 1)).all()
        assert ((0 <= acc["topk_recall"]) & (acc["topk_recall"] <= 1)).all()
        assert (acc["output_rel_error"] >= 0).all()
    assert (b["attention_recall"] >= a["attention_recall"] - 1e-6).all()


@pytest.mark.parametrize(
    "rows, message",
    [
        (([2, 1], [0]), "sorted and unique"),
        (([1, 1], [0]), "sorted and unique"),
        (([3], [0]), "outside"),
        (([0], [-1]), "outside"),
    ],
)
def test_rejects_malformed_selection(rows, message):
    with pytest.raises(ValueError, match=message):
        layer_accuracy(QUERIES, KEYS, VALUES, P, selection(*rows))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="KV heads"):
        layer_accuracy(QUERIES, KEYS, VALUES, P, selection([0], [1], heads=2))
    with pytest.raises(ValueError, match="positions"):
        layer_accuracy(QUERIES, KEYS, VALUES, 2, selection([0], [1]))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-2, 9), max_size=6), min_size=1, max_size=5),
    dtype=st.sampled_from([np.int32, np.int64, np.uint16]),
)
def test_selection_check_matches_a_step_by_step_reading(rows, dtype):
    """The CSR check says what a step-by-step reading of the rows says: a position outside
    its step's context [0, P + s) first (any step), else an unsorted or repeated one."""
    from sim.metrics.accuracy import _validated_counts

    prompt = 4
    if dtype == np.uint16:
        rows = [[max(p, 0) for p in row] for row in rows]
    outside = any(p < 0 or p >= prompt + s for s, row in enumerate(rows) for p in row)
    unsorted = any(b <= a for row in rows for a, b in zip(row, row[1:], strict=False))
    sel = HeadSelections.from_lists([np.array(row, np.int64) for row in rows])
    sel = HeadSelections(sel.positions.astype(dtype), sel.offsets)
    if outside:
        with pytest.raises(ValueError, match="outside"):
            _validated_counts(sel, len(rows), prompt)
    elif unsorted:
        with pytest.raises(ValueError, match="sorted and unique"):
            _validated_counts(sel, len(rows), prompt)
    else:
        np.testing.assert_array_equal(_validated_counts(sel, len(rows), prompt),
                                      [len(row) for row in rows])
