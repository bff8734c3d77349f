"""Sliding-window layers (Gemma 3's local layers): the window selection, the windowed accuracy
reference against attention computed by hand, the policy pass skipping the policy on them, and
the replay attending the window from DRAM with no flash I/O.

Convention under test (transformers' ``sliding_window_overlay``: key ``j`` visible to query
``i`` iff ``j > i - w``): the token at position ``t = P + s`` attends ``(t - w, t]``.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config import PipelineSpec
from sim.errors import KvsimError
from sim.metrics.accuracy import layer_accuracy, reference_output
from sim.model import ModelGeometry
from sim.outputs import PolicyPass
from sim.policies import POLICIES
from sim.policies.base import HeadSelections, LayerContext, LayerSelection, RetrievalPolicy
from sim.policy_pass import run_policy_pass, sliding_windows
from sim.replay import Replay, SimSetup, simulate
from sim.trace.format import open_trace
from sim.trace.writer import TraceWriter

from .conftest import HAND_DEVICE

# --------------------------------------------------------------------------------------------
# the selection and the reference, on tiny inputs
# --------------------------------------------------------------------------------------------


def _ctx(prompt: int, steps: int, n_kv: int = 1, group: int = 1, dim: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n_kv, prompt + steps, dim)).astype(np.float32)
    values = rng.normal(size=(n_kv, prompt + steps, dim)).astype(np.float32)
    queries = (2 * rng.normal(size=(n_kv * group, steps, dim))).astype(np.float32)
    ctx = LayerContext(layer=0, keys=keys, queries=queries, prompt_len=prompt,
                       rng=np.random.default_rng(0))
    return ctx, values


def test_window_selection_lists_the_stored_part_of_the_window():
    ctx, _ = _ctx(prompt=5, steps=3, n_kv=2)
    sel = LayerSelection.sliding_window(ctx, 3)
    # t = 5, 6, 7 attend (t - 3, t]: stored {3, 4}, {4, 5}, {5, 6}, each plus itself
    for head in sel.heads:
        assert [head.at(s).tolist() for s in range(3)] == [[3, 4], [4, 5], [5, 6]]
    assert sel.window == 3 and sel.is_resident and not sel.is_full
    assert not sel.index_vectors.any()
    # a window wider than the context: everything stored (as full attention would)
    wide = LayerSelection.sliding_window(ctx, 100)
    assert [wide.heads[0].at(s).tolist() for s in range(3)] == [
        list(range(5)), list(range(6)), list(range(7))]
    # a window of one position is the current token alone
    assert LayerSelection.sliding_window(ctx, 1).heads[0].counts().tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="integer >= 1"):
        LayerSelection.sliding_window(ctx, 0)


def _hand_attention(q, k, v, lo, hi, scale):
    """softmax(q . k_j * scale) over positions lo..hi (inclusive), in float64, by the book."""
    logits = [float(np.dot(q, k[j])) * scale for j in range(lo, hi + 1)]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    out = sum(w * v[j].astype(np.float64) for w, j in zip(weights, range(lo, hi + 1),
                                                            strict=True))
    return out / total, [w / total for w in weights]


def test_windowed_reference_is_attention_over_the_window_only():
    prompt, steps, window = 6, 4, 3
    ctx, values = _ctx(prompt, steps, n_kv=2, group=2, dim=4, seed=3)
    ref = reference_output(ctx.queries, ctx.keys, values, prompt, window=window, chunk_steps=3)
    glob = reference_output(ctx.queries, ctx.keys, values, prompt)
    for q_head in range(4):
        kv = q_head // 2
        for s in range(steps):
            t = prompt + s
            expected, _ = _hand_attention(ctx.queries[q_head, s], ctx.keys[kv], values[kv],
                                          t - window + 1, t, 1 / 2)
            np.testing.assert_allclose(ref[q_head, s], expected, rtol=1e-5, atol=1e-6)
            everything, _ = _hand_attention(ctx.queries[q_head, s], ctx.keys[kv], values[kv],
                                            0, t, 1 / 2)
            np.testing.assert_allclose(glob[q_head, s], everything, rtol=1e-5, atol=1e-6)
    assert np.abs(ref - glob).max() > 0.05  # the window matters on these inputs


def test_accuracy_on_a_window_layer_is_measured_against_the_window():
    prompt, steps, window = 6, 4, 3
    ctx, values = _ctx(prompt, steps, n_kv=1, group=2, dim=4, seed=4)
    sel = LayerSelection.sliding_window(ctx, window)
    scores = layer_accuracy(ctx.queries, ctx.keys, values, prompt, sel, window=window)
    np.testing.assert_array_equal(scores["attention_recall"], 1.0)
    np.testing.assert_array_equal(scores["topk_recall"], 1.0)
    np.testing.assert_array_equal(scores["output_rel_error"], 0.0)
    np.testing.assert_array_equal(scores["n_selected"], window - 1)
    # Drop the oldest window position: recall is 1 minus its windowed probability (by hand),
    # not its probability under global attention.
    dropped = HeadSelections.from_lists([sel.heads[0].at(s)[1:] for s in range(steps)])
    partial = LayerSelection(heads=[dropped], index_vectors=sel.index_vectors)
    scores = layer_accuracy(ctx.queries, ctx.keys, values, prompt, partial, window=window)
    for q_head in range(2):
        for s in range(steps):
            t = prompt + s
            _, probs = _hand_attention(ctx.queries[q_head, s], ctx.keys[0], values[0],
                                       t - window + 1, t, 1 / 2)
            assert scores["attention_recall"][q_head, s] == pytest.approx(1 - probs[0],
                                                                          rel=1e-5)
    unwindowed = layer_accuracy(ctx.queries, ctx.keys, values, prompt, partial)
    assert np.abs(unwindowed["attention_recall"] - scores["attention_recall"]).max() > 0.05


# --------------------------------------------------------------------------------------------
# policy pass and replay on a synthetic trace with a sliding_window list
# --------------------------------------------------------------------------------------------

PROMPT, STEPS, HEADS, GROUP, DIM = 64, 6, 2, 2, 8
WINDOWS = [16, None, 40, None]


@pytest.fixture(scope="module")
def window_trace(tmp_path_factory):
    rng = np.random.default_rng(11)
    path = tmp_path_factory.mktemp("trace") / "windowed"
    total = PROMPT + STEPS
    model = {"name": "synthetic-gemma", "n_layers": len(WINDOWS), "n_q_heads": HEADS * GROUP,
             "n_kv_heads": HEADS, "head_dim": DIM, "params_per_layer": 50_000,
             "sliding_window": WINDOWS}
    with TraceWriter(path, model=model, prompt_len=PROMPT, decode_steps=STEPS, query_start=0,
                     text={"source": "synthetic"}, capture={"seed": 11}) as writer:
        for layer in range(len(WINDOWS)):
            keys = rng.normal(size=(HEADS, total, DIM))
            values = rng.normal(size=(HEADS, total, DIM))
            queries = 2 * rng.normal(size=(HEADS * GROUP, total, DIM))
            writer.write_layer(layer, keys, values, queries)
        writer.write_tokens(np.arange(total, dtype=np.int32))
    return open_trace(path)


class CountingTopK(RetrievalPolicy):
    """token_topk at 8 tokens, remembering which layers it was asked about."""

    name = "counting"

    def __init__(self) -> None:
        self.inner = POLICIES.create({"type": "token_topk", "budget": 8})
        self.layers: list[int] = []
        self.lock = threading.Lock()

    def select_layer(self, ctx):
        with self.lock:
            self.layers.append(ctx.layer)
        return self.inner.select_layer(ctx)


def test_policy_pass_skips_the_policy_on_window_layers(window_trace):
    assert sliding_windows(window_trace) == WINDOWS
    policy = CountingTopK()
    pp = run_policy_pass(window_trace, policy, seed=0, workers=2)
    assert sorted(policy.layers) == [1, 3]  # the global layers only
    acc = pp.accuracy
    for layer, window in enumerate(WINDOWS):
        rows = acc[acc["layer"] == layer]
        sel = pp.selections[layer]
        if window is None:
            assert sel.window is None and (rows["n_selected"] == 8).all()
            assert rows["attention_recall"].max() < 1.0  # a real selection, not the window
        else:
            assert sel.window == window
            np.testing.assert_array_equal(rows["attention_recall"], 1.0)
            np.testing.assert_array_equal(rows["output_rel_error"], 0.0)
            assert (rows["n_selected"] == window - 1).all()
            expected = [list(range(PROMPT + s - window + 1, PROMPT + s)) for s in range(STEPS)]
            for head in sel.heads:
                assert [head.at(s).tolist() for s in range(STEPS)] == expected
    # full attention on this trace is the model's own attention: recall 1 everywhere
    full = run_policy_pass(window_trace, POLICIES.create({"type": "full"}), seed=0, workers=1)
    np.testing.assert_array_equal(full.accuracy["attention_recall"], 1.0)


def _replayed(pp: PolicyPass, target: ModelGeometry, swap: bool = False) -> Replay:
    setup = SimSetup(device=HAND_DEVICE, target=target, kv_dtype="fp16",
                     cache_capacity_bytes=1 << 20, replacement={"type": "lru"},
                     layout={"type": "sequence"}, pipeline=PipelineSpec(swap_layers=swap))
    replay = Replay(pp, setup)
    replay.env.process(replay.decode(None))
    replay.env.run()
    return replay


def _last_step_dram(replay: Replay, window_entries: int, index_vectors: int) -> int:
    """Caches as left by the run + the windows' entries + the index, in bytes (no swapping)."""
    cached = sum(c.resident_entries for c in replay.run.caches if c is not None)
    run = replay.run
    return (cached + window_entries) * run.entry_bytes + index_vectors * run.vector_bytes


def test_replay_attends_windows_from_dram_without_flash(window_trace):
    pp = run_policy_pass(window_trace, CountingTopK(), seed=0, workers=1)
    replay = _replayed(pp, window_trace.model)
    records = pd.DataFrame(replay.records, columns=[*replay.col])
    assert [c is None for c in replay.run.caches] == [True, False, True, False]
    assert [len(row) for row in replay.run.layouts] == [0, HEADS, 0, HEADS]
    # only the two global layers look anything up: 8 entries per KV head per step each
    assert (records["selected_entries"] == 2 * HEADS * 8).all()
    assert (records["hits"] + records["misses"] == 2 * HEADS * 8).all()
    # one append per global layer and KV head, each in its own region: 4 write commands a step
    assert (records["write_commands"] == 2 * HEADS).all()
    # DRAM at the last step: each window layer holds min(w, P + s + 1) = w entries per KV
    # head; token_topk's index is every stored key (P + s vectors per KV head, global layers)
    last = STEPS - 1
    assert records["dram_bytes"].iloc[-1] == _last_step_dram(
        replay, (16 + 40) * HEADS, 2 * HEADS * (PROMPT + last))
    # swapped, the window layers stay put: only the global layers' images move. Nothing is
    # evicted (large cache), so a global layer's image after step s is every position it
    # selected so far plus its appended tokens; each image is read in whole 4 KiB pages.
    swapped = pd.DataFrame(_replayed(pp, window_trace.model, swap=True).records,
                           columns=[*replay.col])
    expected = [0]
    for step in range(STEPS - 1):
        pages = 0
        for layer in (1, 3):
            resident = sum(
                len(set(np.concatenate([head.at(s) for s in range(step + 1)]).tolist())
                    | set(range(PROMPT, PROMPT + step + 1)))
                for head in pp.selections[layer].heads
            )
            pages += -(-resident * replay.run.entry_bytes // 4096)
        expected.append(pages * 4096)
    assert swapped["swap_read_bytes"].tolist() == expected


def test_window_layer_timeline_by_hand():
    # One window layer of 5 on a 1-layer, 1-head model: step s attends min(5, 8 + s + 1) = 5
    # entries; no scoring, no reads: dense + attention only, and nothing touches the flash,
    # swapping or not.
    model = ModelGeometry("hand", n_layers=1, n_q_heads=1, n_kv_heads=1, head_dim=4,
                          params_per_layer=1_000_000)
    ctx = LayerContext(layer=0, keys=np.zeros((1, 10, 4), np.float32),
                       queries=np.zeros((1, 2, 4), np.float32), prompt_len=8,
                       rng=np.random.default_rng(0))
    pp = PolicyPass(CountingTopK(), 8, 2, model, [LayerSelection.sliding_window(ctx, 5)],
                    pd.DataFrame(), 0.0)
    attention_us = max(4 * 5 * 4 / 1e5, 5 * 16 / 1e4)  # roofline of HAND_DEVICE
    for swap in (False, True):
        setup = SimSetup(device=HAND_DEVICE, target=model, kv_dtype="fp16",
                         cache_capacity_bytes=0, replacement={"type": "lru"},
                         layout={"type": "sequence"}, pipeline=PipelineSpec(swap_layers=swap))
        steps = simulate(pp, setup).steps
        np.testing.assert_allclose(steps["latency_us"], 100.0 + attention_us, rtol=1e-12)
        assert steps["dram_bytes"].tolist() == [5 * 16, 5 * 16]
        for column in ("read_bytes", "write_bytes", "read_commands", "selected_entries",
                       "swap_read_bytes", "swap_write_bytes", "index_read_bytes"):
            assert not steps[column].any(), column


def test_a_deeper_target_inherits_the_windows_of_the_layers_it_replays(window_trace):
    # 7 target layers over 4 trace layers: round(i * 3 / 6) = 0, 0, 1, 2, 2, 2, 3 (half to even)
    pp = run_policy_pass(window_trace, CountingTopK(), seed=0, workers=1)
    target = ModelGeometry("deep", n_layers=7, n_q_heads=4, n_kv_heads=2, head_dim=8,
                           params_per_layer=50_000)
    replay = _replayed(pp, target)
    assert replay.run.layer_map.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert [c is None for c in replay.run.caches] == [True, True, False, True, True, True, False]
    records = pd.DataFrame(replay.records, columns=[*replay.col])
    assert (records["selected_entries"] == 2 * HEADS * 8).all()  # two cached target layers
    # two layers of window 16 and three of 40, per KV head; two global layers' indexes
    assert records["dram_bytes"].iloc[-1] == _last_step_dram(
        replay, (2 * 16 + 3 * 40) * HEADS, 2 * HEADS * (PROMPT + STEPS - 1))


def test_a_malformed_window_list_is_an_error(tmp_path):
    model = {"name": "bad", "n_layers": 2, "n_q_heads": 2, "n_kv_heads": 1, "head_dim": 4,
             "params_per_layer": 10, "sliding_window": [8]}
    rng = np.random.default_rng(0)
    with TraceWriter(tmp_path / "t", model=model, prompt_len=4, decode_steps=1, query_start=0,
                     text={}, capture={}) as writer:
        for layer in range(2):
            arrays = [rng.normal(size=(h, 5, 4)) for h in (1, 1, 2)]
            writer.write_layer(layer, *arrays)
        writer.write_tokens(np.arange(5, dtype=np.int32))
    with pytest.raises(KvsimError, match="must list 2 windows"):
        sliding_windows(open_trace(tmp_path / "t"))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 1000),
    prompt=st.integers(1, 40),
    steps=st.integers(1, 50),
    window=st.integers(1, 60),
    every=st.sampled_from([1, 3, 8]),
    chunk=st.sampled_from([4, 32]),
)
def test_window_layer_scores_are_what_the_arithmetic_gives(seed, prompt, steps, window, every,
                                                          chunk):
    """A window layer's figures are stated without the arithmetic (recall 1, error 0): the
    same arrays, to the last bit and dtype, as computing them like any selection's."""
    ctx, values = _ctx(prompt, steps, n_kv=2, group=2, dim=8, seed=seed)
    _assert_window_figures(ctx, values, window, every, chunk)


@pytest.mark.parametrize("every", [1, 8])
def test_window_layer_scores_above_the_small_product_limit(every):
    """Long enough that the sampled products run on their rows alone (SMALL_PRODUCT)."""
    rng = np.random.default_rng(5)
    prompt, steps, n_kv, group, dim = 2300, 40, 1, 4, 64
    keys = rng.normal(size=(n_kv, prompt + steps, dim)).astype(np.float32)
    values = rng.normal(size=(n_kv, prompt + steps, dim)).astype(np.float32)
    queries = (2 * rng.normal(size=(n_kv * group, steps, dim))).astype(np.float32)
    ctx = LayerContext(layer=0, keys=keys, queries=queries, prompt_len=prompt,
                       rng=np.random.default_rng(0))
    _assert_window_figures(ctx, values, 512, every, 32)


def _assert_window_figures(ctx, values, window, every, chunk):
    sel = LayerSelection.sliding_window(ctx, window)
    stated = layer_accuracy(ctx.queries, ctx.keys, values, ctx.prompt_len, sel,
                            chunk_steps=chunk, window=window, every=every)
    as_any = dataclasses.replace(sel, window=None)  # the same positions, computed
    computed = layer_accuracy(ctx.queries, ctx.keys, values, ctx.prompt_len, as_any,
                              chunk_steps=chunk, window=window, every=every)
    for column, array in computed.items():
        assert stated[column].dtype == array.dtype and stated[column].shape == array.shape
        assert stated[column].tobytes() == array.tobytes(), column
