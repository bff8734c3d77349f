"""The DRAM footprint (sim.footprint): each part worked out by hand on tiny replays, what DRAM
holds outside the cache never looked up or read, the parts adding up to ``dram_bytes``
(hypothesis), and the cache capacity that makes a policy's total DRAM equal a target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import PipelineSpec
from sim.errors import ConfigError
from sim.footprint import (
    PART_COLUMNS,
    StaticFootprint,
    floor_lower_bound,
    resolve_cache_capacity,
    window_entries,
)
from sim.model import ModelGeometry
from sim.outputs import STEP_COLUMNS, PolicyPass
from sim.policies import POLICIES
from sim.policies.base import HeadSelections, LayerSelection
from sim.replay import Replay, SimSetup, simulate

from .conftest import HAND_DEVICE, HandPolicy

# Two layers (0: full attention, 1: the policy's), two KV heads, head_dim 4 at fp16: an entry
# (K + V) is 2 * 4 * 2 = 16 bytes, an index vector (one key) 8 bytes.
MODEL = ModelGeometry("hand2", n_layers=2, n_q_heads=2, n_kv_heads=2, head_dim=4,
                      params_per_layer=1_000_000)
ENTRY, VECTOR = 16, 8
PROMPT, STEPS = 8, 3
ROWS = [[0, 1, 3, 5, 6, 7], [0, 1, 3, 4, 6, 7, 8], [2, 7, 8, 9]]
# split buffers at the end of each step: 4 (a prompt position, for the test's sake), then 4 and
# the token of step 0 (8), then empty
BUFFERS = [[4], [4, 8], []]


def _heads(rows: list[list[int]], n: int = 2) -> list[HeadSelections]:
    return [HeadSelections.from_lists([np.array(r, np.int32) for r in rows]) for _ in range(n)]


def _held_pass(split: bool = True) -> PolicyPass:
    """Layer 1 holds its 2 sinks and a recent window of 3 in DRAM (``[P + s - 3, P + s)``)
    and, with ``split``, the split buffers of :data:`BUFFERS`."""
    full = LayerSelection(heads=None, index_vectors=np.zeros((2, STEPS), np.int64))
    held = LayerSelection(
        heads=_heads(ROWS), index_vectors=np.full((2, STEPS), 10, np.int64), dram_sinks=2,
        dram_tail=PROMPT + np.arange(STEPS) - 3,
        split_buffers=_heads(BUFFERS) if split else None,
    )
    return PolicyPass(HandPolicy(), PROMPT, STEPS, MODEL, [full, held], pd.DataFrame(), 0.0)


def _setup(capacity: int, layout: dict | None = None, model: ModelGeometry = MODEL,
           **pipeline) -> SimSetup:
    return SimSetup(device=HAND_DEVICE, target=model, kv_dtype="fp16",
                    cache_capacity_bytes=capacity, replacement={"type": "lru"},
                    layout=layout or {"type": "sequence"}, pipeline=PipelineSpec(**pipeline))


def test_each_part_by_hand():
    # Per KV head of layer 1 (both heads alike):
    #   step 0: window [5, 8) and sinks {0, 1} hold 0 1 5 6 7; 3 is read (miss) and cached
    #   step 1: window [6, 9), sinks, and the buffer (4, buffered at step 0's end) hold
    #           0 1 4 6 7 8; 3 hits
    #   step 2: window [7, 10) holds 7 8 9; 2 is read and cached
    # The appended tokens join the window, never the cache.
    steps = simulate(_held_pass(), _setup(1 << 20)).steps
    assert steps["held_entries"].tolist() == [2 * 5, 2 * 6, 2 * 3]
    assert steps["hits"].tolist() == [0, 2, 0] and steps["misses"].tolist() == [2, 0, 2]
    assert steps["selected_misses"].tolist() == [2, 0, 2]
    assert steps["selected_entries"].tolist() == [2 * 6, 2 * 7, 2 * 4]
    assert steps["useful_read_bytes"].tolist() == [2 * ENTRY, 0, 2 * ENTRY]
    assert (steps["write_commands"] == 2).all()  # the new tokens still go to flash
    # cache: 1, 1, 2 entries per head
    assert steps["dram_cache_bytes"].tolist() == [2 * ENTRY, 2 * ENTRY, 4 * ENTRY]
    # index: 10 vectors per head of layer 1
    assert steps["dram_index_bytes"].tolist() == [2 * 10 * VECTOR] * 3
    # buffer: 4 is outside the window at the end of steps 0 and 1; 8 is in the window
    assert steps["dram_buffer_bytes"].tolist() == [2 * ENTRY, 2 * ENTRY, 0]
    # window at the end of step s: sinks {0, 1} + [P + s - 3, P + s] = 2 + 4 entries per head
    assert steps["dram_window_bytes"].tolist() == [2 * 6 * ENTRY] * 3
    # dense: layer 0 holds the context with the current token, P + s + 1 entries per head
    assert steps["dram_dense_bytes"].tolist() == [2 * (PROMPT + s + 1) * ENTRY
                                                  for s in range(STEPS)]
    np.testing.assert_array_equal(steps[list(PART_COLUMNS)].sum(axis=1), steps["dram_bytes"])
    assert steps["dram_bytes"].tolist() == [704, 736, 768]


def test_without_the_buffer_the_entry_is_read_from_flash():
    steps = simulate(_held_pass(split=False), _setup(1 << 20)).steps
    assert steps["misses"].tolist() == [2, 2, 2]  # step 1 now reads 4
    assert steps["held_entries"].tolist() == [2 * 5, 2 * 5, 2 * 3]
    assert not steps["dram_buffer_bytes"].any()


def test_a_kept_set_is_attended_from_dram_and_counted_in_the_window():
    # An eviction policy's layer: the selection (3 per head) is its whole KV, attended from
    # DRAM with the current token: no cache, no flash, 2 x (3 + 1) entries in the window.
    rows = [[0, 5, 6], [0, 6, 7], [0, 7, 8]]
    kept = LayerSelection(heads=_heads(rows), index_vectors=np.zeros((2, 3), np.int64),
                          kept_in_dram=True)
    model = ModelGeometry("hand1", n_layers=1, n_q_heads=2, n_kv_heads=2, head_dim=4,
                          params_per_layer=1_000_000)
    pp = PolicyPass(HandPolicy(), PROMPT, 3, model, [kept], pd.DataFrame(), 0.0)
    replay = Replay(pp, _setup(1 << 20, model=model))
    assert replay.run.caches == [None] and replay.run.layouts == [[]]
    steps = simulate(pp, _setup(1 << 20, model=model)).steps
    for column in ("read_bytes", "write_bytes", "selected_entries", "hits", "misses"):
        assert not steps[column].any(), column
    attention_us = max(4 * 8 * 4 / 1e5, 8 * ENTRY / 1e4)  # 8 entries, HAND_DEVICE's roofline
    np.testing.assert_allclose(steps["latency_us"], 100.0 + attention_us, rtol=1e-12)
    assert steps["dram_window_bytes"].tolist() == [2 * 4 * ENTRY] * 3
    assert steps["dram_bytes"].tolist() == [2 * 4 * ENTRY] * 3


def test_write_buffered_entries_are_counted_once_and_never_read_from_flash():
    # One layer and head, the dual-head layout buffering group 0's appends (256 per 4 KiB
    # page: none written in 4 steps), a recent window of 2 and no cache. Step 3 selects 8 (the
    # token of step 0): out of the window [9, 11) but in the write buffer, so held, not read.
    model = ModelGeometry("hand1", n_layers=1, n_q_heads=1, n_kv_heads=1, head_dim=4,
                          params_per_layer=1_000_000)
    steps_n = 4
    selection = LayerSelection(
        heads=_heads([[1], [1], [1], [1, 8]], 1), index_vectors=np.ones((1, steps_n), np.int64),
        prefill_groups=np.array([[0, 0, 0, 0, 1, 1, 1, 1]], np.int32),
        append_groups=np.zeros((1, steps_n), np.int32),
        coretrieval=[np.array([[5, 1], [1, 2]])],
        dram_tail=PROMPT + np.arange(steps_n) - 2,
    )
    pp = PolicyPass(HandPolicy(), PROMPT, steps_n, model, [selection], pd.DataFrame(), 0.0)
    layout = {"type": "dual_head", "write_buffer_groups": 1, "pool_slack": 2.0}
    steps = simulate(pp, _setup(0, layout, model=model)).steps
    assert steps["misses"].tolist() == [1, 1, 1, 1]  # position 1 only
    assert steps["held_entries"].tolist() == [0, 0, 0, 1]
    assert not steps["write_commands"].any()
    # window: [P + s - 2, P + s] = 3 entries; buffer: appends 8..8+s outside it (8 at step 3)
    assert steps["dram_window_bytes"].tolist() == [3 * ENTRY] * 4
    assert steps["dram_buffer_bytes"].tolist() == [0, 0, 0, ENTRY]
    assert steps["dram_bytes"].tolist() == [3 * ENTRY + VECTOR] * 3 + [4 * ENTRY + VECTOR]


def test_window_entries_by_hand():
    assert window_entries(0, None, 10) == 0
    assert window_entries(4, None, 10) == 4  # sinks only: the new token goes to the cache
    assert window_entries(4, None, 2) == 3  # a context shorter than the sinks (+ new token)
    assert window_entries(4, 7, 10) == 4 + 4  # [0, 4) + [7, 10]
    assert window_entries(4, 2, 10) == 11  # overlapping: [0, 10]
    np.testing.assert_array_equal(window_entries(2, np.array([5, 6]), np.array([8, 9])),
                                  [2 + 4, 2 + 4])


# --------------------------------------------------------------------------------------------
# the parts add up, and what DRAM holds is never looked up (hypothesis)
# --------------------------------------------------------------------------------------------


@st.composite
def _scenarios(draw):
    prompt = draw(st.integers(4, 14))
    steps = draw(st.integers(1, 5))
    n_layers = draw(st.integers(1, 3))
    model = ModelGeometry("inv", n_layers=n_layers, n_q_heads=2, n_kv_heads=2, head_dim=4,
                          params_per_layer=1000)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    selections = []
    for _layer in range(n_layers):
        kind = draw(st.sampled_from(["cached", "cached", "full", "kept"]))
        if kind == "full":
            selections.append(LayerSelection(heads=None,
                                             index_vectors=np.zeros((2, steps), np.int64)))
            continue
        rows = [[np.sort(rng.choice(prompt + s, size=int(rng.integers(0, prompt + s)),
                                    replace=False)).astype(np.int32) for s in range(steps)]
                for _head in range(2)]
        heads = [HeadSelections.from_lists(r) for r in rows]
        if kind == "kept":
            selections.append(LayerSelection(heads, np.zeros((2, steps), np.int64),
                                             kept_in_dram=True))
            continue
        recent = draw(st.integers(0, 4))
        buffers = None
        if draw(st.booleans()):
            buffers = [HeadSelections.from_lists(
                [np.sort(rng.choice(prompt + s + 1, size=int(rng.integers(0, 3)),
                                    replace=False)).astype(np.int32) for s in range(steps)])
                for _head in range(2)]
        extra = [HeadSelections.from_lists(
            [np.setdiff1d(rng.choice(prompt + s, size=2), r[s]).astype(np.int32)
             for s in range(steps)]) for r in rows]
        selections.append(LayerSelection(
            heads, rng.integers(0, 20, size=(2, steps)),
            prefill_groups=rng.integers(0, 3, size=(2, prompt)).astype(np.int32),
            append_groups=rng.integers(0, 3, size=(2, steps)).astype(np.int32),
            extra_reads=extra,
            dram_sinks=draw(st.integers(0, 3)),
            dram_tail=None if not recent else np.maximum(0, prompt + np.arange(steps) - recent),
            split_buffers=buffers,
        ))
    layout = draw(st.sampled_from([
        {"type": "sequence"}, {"type": "cluster"},
        {"type": "dual_head", "write_buffer_groups": 2, "pool_slack": 4.0},
    ]))
    capacity_entries = draw(st.integers(0, 30))
    pipeline = {"swap_layers": draw(st.booleans()), "stream_index": draw(st.booleans())}
    pp = PolicyPass(HandPolicy(draw(st.booleans())), prompt, steps, model, selections,
                    pd.DataFrame(), 0.0)
    device = HAND_DEVICE.model_copy(
        update={"flash": HAND_DEVICE.flash.model_copy(update={"page_size_bytes": 64})}
    )  # 4 entries a page: the write buffers fill and flush
    setup = SimSetup(device=device, target=model, kv_dtype="fp16",
                     cache_capacity_bytes=capacity_entries * ENTRY * n_layers,
                     replacement={"type": draw(st.sampled_from(["lru", "belady"]))},
                     layout=layout, pipeline=PipelineSpec(**pipeline))
    return pp, setup, capacity_entries


def _held(selection: LayerSelection, prompt: int, step: int, head: int) -> set[int]:
    """What the policy holds in DRAM for KV head ``head`` as ``step`` starts, by the
    definition: its sinks, its window and its split buffers at the previous step's end."""
    context = prompt + step
    held = set(range(min(selection.dram_sinks, context)))
    if selection.dram_tail is not None:
        held |= set(range(int(selection.dram_tail[step]), context))
    if selection.split_buffers is not None and step:
        held |= set(selection.split_buffers[head].at(step - 1).tolist())
    return held


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_scenarios())
def test_parts_add_up_and_held_entries_are_never_looked_up(scenario):
    pp, setup, capacity_entries = scenario
    replay = Replay(pp, setup)
    replay.env.process(replay.decode(None))
    replay.env.run()
    steps = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    parts = steps[list(PART_COLUMNS)]
    np.testing.assert_array_equal(parts.sum(axis=1), steps["dram_bytes"])
    assert (parts >= 0).all().all()
    assert (steps["hits"] + steps["misses"] + steps["held_entries"]
            == steps["selected_entries"] + steps["extra_entries"]).all()
    assert (steps["selected_misses"] <= steps["misses"]).all()
    assert (steps["misses"] - steps["selected_misses"] <= steps["extra_entries"]).all()
    n_cached = sum(c is not None for c in replay.run.caches)
    images = min(2, n_cached) if setup.pipeline.swap_layers else n_cached
    assert (steps["dram_cache_bytes"] <= images * capacity_entries * ENTRY).all()
    # the window part: each layer's sinks and window (the formula), or its kept set
    static = StaticFootprint(pp, setup.target, "fp16", setup.pipeline.stream_index)
    np.testing.assert_array_equal(steps["dram_window_bytes"], static.window)
    # without write buffers holding anything, the entries looked up are exactly the selected
    # and extra ones the policy does not hold (counted independently, with sets)
    if setup.layout.get("write_buffer_groups"):
        return
    for step in range(pp.decode_steps):
        looked_up = 0
        for selection in pp.selections:
            if selection.is_resident:
                continue
            for head in range(2):
                assert selection.heads is not None and selection.extra_reads is not None
                wanted = set(selection.heads[head].at(step).tolist())
                wanted |= set(selection.extra_reads[head].at(step).tolist())
                looked_up += len(wanted - _held(selection, pp.prompt_len, step, head))
        assert steps["hits"][step] + steps["misses"][step] == looked_up, step


# --------------------------------------------------------------------------------------------
# equal total DRAM: the resolved capacity
# --------------------------------------------------------------------------------------------


def test_capacity_for_a_total_by_hand():
    # Without the cache, the held pass peaks at 704 bytes (steps 1 and 2: index 160 + window
    # 192 + dense 320 + buffer 32, and 160 + 192 + 352 + 0). One layer has a cache: a target
    # of 704 + 50 leaves 50 bytes, 3 whole entries (48 B) for it; the replay splits the
    # capacity over both layers, so the capacity is 3 entries x 16 B x 2 layers.
    pp = _held_pass()
    setup = _setup(0)
    assert int(StaticFootprint(pp, MODEL, "fp16", False).rest().max()) == 704
    capacity = resolve_cache_capacity(pp, setup, 704 + 50, "run hand")
    assert capacity == 3 * ENTRY * 2
    # the run then never exceeds the target
    steps = simulate(pp, _setup(capacity)).steps
    assert steps["dram_bytes"].max() <= 704 + 50
    assert resolve_cache_capacity(pp, setup, 704, "run hand") == 0
    with pytest.raises(ConfigError) as info:
        resolve_cache_capacity(pp, setup, 703, "run hand")
    message = str(info.value)
    assert "\n" not in message and message.startswith("run hand: cache.dram_total")
    assert "hand holds in DRAM" in message and "at its peak 0.000704 MB" in message


def test_capacity_for_a_total_with_swapping_counts_two_images():
    # Two layers with caches, swapped: DRAM holds two images, so the 64 bytes left over the
    # rest's peak give each layer 64 // (2 x 16) = 2 entries; unswapped, 64 // (2 x 16) too
    # (two layers), and with three layers with caches the swapped run would still count two.
    held = _held_pass().selections[1]
    model = ModelGeometry("hand3", n_layers=3, n_q_heads=2, n_kv_heads=2, head_dim=4,
                          params_per_layer=1_000_000)
    pp = PolicyPass(HandPolicy(), PROMPT, STEPS, model, [held, held, held], pd.DataFrame(),
                    0.0)
    rest = int(StaticFootprint(pp, model, "fp16", False).rest().max())
    assert rest == 3 * (160 + 192 + 32)  # index + window + buffer, every step
    swapped = _setup(0, model=model, swap_layers=True)
    assert resolve_cache_capacity(pp, swapped, rest + 64, "r") == 2 * ENTRY * 3
    plain = _setup(0, model=model)
    assert resolve_cache_capacity(pp, plain, rest + 96, "r") == 2 * ENTRY * 3
    # a streamed index counts once: 160 instead of 3 x 160
    streamed = _setup(0, model=model, stream_index=True)
    floor = int(StaticFootprint(pp, model, "fp16", True).rest().max())
    assert floor == rest - 2 * 160
    assert resolve_cache_capacity(pp, streamed, floor + 96, "r") == 2 * ENTRY * 3


def test_capacity_for_a_total_reserves_the_write_buffers_bound():
    # dual_head buffering 1 hot group of 2 per head: at most 256 - 1 entries of 16 B each, per
    # KV head of the one layer with a cache (4 KiB pages).
    pp = _held_pass()
    selection = pp.selections[1]
    selection.prefill_groups = np.tile(np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32), (2, 1))
    selection.append_groups = np.zeros((2, STEPS), np.int32)
    setup = _setup(0, {"type": "dual_head", "write_buffer_groups": 1})
    bound = 2 * 255 * ENTRY
    assert resolve_cache_capacity(pp, setup, 704 + bound, "r") == 0
    with pytest.raises(ConfigError):
        resolve_cache_capacity(pp, setup, 704 + bound - 1, "r")


def test_full_attention_has_no_cache_to_size():
    full = LayerSelection(heads=None, index_vectors=np.zeros((2, STEPS), np.int64))
    pp = PolicyPass(HandPolicy(), PROMPT, STEPS, MODEL, [full, full], pd.DataFrame(), 0.0)
    whole = 2 * 2 * (PROMPT + STEPS) * ENTRY  # every layer's context at the last step
    assert resolve_cache_capacity(pp, _setup(0), whole, "r") == 0
    with pytest.raises(ConfigError, match="at its peak"):
        resolve_cache_capacity(pp, _setup(0), whole - 1, "r")


def test_the_plan_time_bound_by_hand():
    # token_topk's index is every stored key; on a 30-layer, 3-KV-head trace of 160 + 24
    # positions (head_dim 64, fp16: 128-byte keys) it is at least 183 keys per head and layer
    # at the last step: 30 x 3 x 183 x 128 bytes, or one layer's with a streamed index.
    trace = ModelGeometry("t", n_layers=30, n_q_heads=9, n_kv_heads=3, head_dim=64)
    policy = POLICIES.create({"type": "token_topk", "budget": 16})
    bound = floor_lower_bound(policy, trace, [None] * 30, 160, 24, trace, "fp16", False)
    assert bound == 30 * 3 * 183 * 128
    assert floor_lower_bound(policy, trace, [None] * 30, 160, 24, trace, "fp16", True) == \
        3 * 183 * 128
    # static_clusters' 16 sinks and 32 recent tokens (+ the new one) per head and layer; its
    # index is bounded by 0. A sliding-window layer holds its window, a dense layer the context.
    static = POLICIES.create({"type": "static_clusters", "budget": 64})
    windows = [8] + [None] * 29
    assert floor_lower_bound(static, trace, windows, 160, 24, trace, "fp16", False) == \
        (8 + 29 * (16 + 33)) * 3 * 256
    clusterkv = POLICIES.create({"type": "clusterkv", "budget": 64, "update_interval": 10})
    # ClusterKV: 2 dense layers; at step 23 its window holds steps 20..23 (4 tokens) + sinks
    assert floor_lower_bound(clusterkv, trace, [None] * 30, 160, 24, trace, "fp16", False) == \
        (2 * 184 + 28 * (16 + 4)) * 3 * 256
    full = POLICIES.create({"type": "full"})
    assert floor_lower_bound(full, trace, [None] * 30, 160, 24, trace, "fp16", False) == \
        184 * trace.kv_bytes_per_token("fp16")
