"""The decode-step engine against timelines worked out by hand, and its accounting invariants."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.config import PipelineSpec
from sim.model import ModelGeometry
from sim.outputs import STEP_COLUMNS, PolicyPass
from sim.policies.base import HeadSelections, LayerSelection, Relabel
from sim.replay import Replay, SimSetup, simulate

from .conftest import HAND_DEVICE, HandPolicy

# HAND_DEVICE (conftest): every duration is a round number, see its comment.
# One layer, one KV head, head_dim 4: an entry (K + V at fp16) is 2 * 4 * 2 = 16 bytes.
MODEL = ModelGeometry("hand", n_layers=1, n_q_heads=1, n_kv_heads=1, head_dim=4,
                      params_per_layer=1_000_000)
PROMPT = 8
DENSE_US = 100.0            # max(2e6 flops / 1e5, 1e6 bytes / 1e4)
DENSE_PRE_US = DENSE_US * (4 * (1 + 2) * 4) / 1e6   # QKV share: hidden 4 x (1 + 2 heads) x 4
SCORING_US = 0.8            # 1000 vectors: max(2*1000*4 / 1e5, 1000 * 8 bytes / 1e4)
READ_PAGE_US = 50 + 4096 / 4096


def attention_us(entries: int) -> float:
    return max(4 * entries * 4 / 1e5, entries * 16 / 1e4)


def _pass(per_step: list[list[int]] | None, needs_query: bool = True,
          model: ModelGeometry = MODEL, prompt: int = PROMPT) -> PolicyPass:
    steps = len(per_step) if per_step is not None else 2
    heads = None
    if per_step is not None:
        heads = [HeadSelections.from_lists([np.array(p, dtype=np.int32) for p in per_step])
                 for _ in range(model.n_kv_heads)]
    index = np.full((model.n_kv_heads, steps), 0 if per_step is None else 1000)
    selection = LayerSelection(heads=heads, index_vectors=index)
    return PolicyPass(HandPolicy(needs_query), prompt, steps, model, [selection] * model.n_layers,
                      pd.DataFrame(), 0.0)


def _setup(capacity_bytes: int, model: ModelGeometry = MODEL, layout: str = "sequence") -> SimSetup:
    return SimSetup(device=HAND_DEVICE, target=model, kv_dtype="fp16",
                    cache_capacity_bytes=capacity_bytes, replacement={"type": "lru"},
                    layout={"type": layout})


def test_cold_reads_stream_through_a_zero_cache():
    # step 0 reads positions 0-3 (bytes 0-63), step 1 positions 0 and 8 (the token appended at
    # step 0, bytes 128-143): each step is one 4 KiB page read.
    result = simulate(_pass([[0, 1, 2, 3], [0, 8]]), _setup(capacity_bytes=0))
    steps = result.steps
    expected = [DENSE_US + SCORING_US + READ_PAGE_US + attention_us(5),
                DENSE_US + SCORING_US + READ_PAGE_US + attention_us(3)]
    np.testing.assert_allclose(steps["latency_us"], expected, rtol=1e-12)
    np.testing.assert_allclose(steps["io_wait_us"], READ_PAGE_US, rtol=1e-12)
    np.testing.assert_allclose(steps["dense_us"], DENSE_US)
    np.testing.assert_allclose(steps["scoring_us"], SCORING_US)
    assert steps["read_bytes"].tolist() == [4096, 4096]
    assert steps["useful_read_bytes"].tolist() == [64, 32]
    assert steps["read_commands"].tolist() == [1, 1]
    assert steps["write_bytes"].tolist() == [4096, 4096]  # one page per appended entry
    assert steps["misses"].tolist() == [4, 2] and steps["hits"].tolist() == [0, 0]
    assert result.io_sizes.to_dict("list") == {"size_bytes": [4096], "commands": [2]}
    # the run lengths in entries: [0-3] is one run of 4; {0, 8} two runs of 1
    assert result.run_lengths.to_dict("list") == {"run_entries": [1, 4], "runs": [2, 1]}


def test_cache_hits_skip_the_flash():
    result = simulate(_pass([[0, 1, 2, 3], [0, 1]]), _setup(capacity_bytes=1 << 20))
    steps = result.steps
    assert steps["hits"].tolist() == [0, 2] and steps["misses"].tolist() == [4, 0]
    assert steps["read_bytes"].tolist() == [4096, 0]
    assert steps["latency_us"][1] == pytest.approx(DENSE_US + SCORING_US + attention_us(3))
    # cached: 4 read at step 0 + its new token, then step 1's new token -> 6 entries of 16 B
    assert steps["dram_bytes"].tolist() == [5 * 16 + 1000 * 8, 6 * 16 + 1000 * 8]


def test_query_independent_reads_overlap_projection_and_scoring():
    result = simulate(_pass([[0, 1, 2, 3]], needs_query=False), _setup(capacity_bytes=0))
    wait = READ_PAGE_US - DENSE_PRE_US - SCORING_US
    assert result.steps["io_wait_us"][0] == pytest.approx(wait)
    assert result.steps["latency_us"][0] == pytest.approx(
        DENSE_US + SCORING_US + wait + attention_us(5))


def test_full_attention_reads_nothing_and_holds_the_whole_cache():
    result = simulate(_pass(None), _setup(capacity_bytes=0))
    steps = result.steps
    assert steps["read_bytes"].sum() == 0 and steps["write_bytes"].sum() == 0
    expected = [DENSE_US + attention_us(PROMPT + 1), DENSE_US + attention_us(PROMPT + 2)]
    np.testing.assert_allclose(steps["latency_us"], expected)
    assert steps["dram_bytes"].tolist() == [(PROMPT + 1) * 16, (PROMPT + 2) * 16]


def test_target_geometry_multiplies_heads_and_layers():
    # Simulating 2 layers x 3 KV heads from a 1 x 1 trace: every (layer, head) replays the trace's
    # one head, each in its own flash region -> 6 one-page commands per step.
    target = ModelGeometry("big", n_layers=2, n_q_heads=6, n_kv_heads=3, head_dim=4,
                           params_per_layer=1_000_000)
    result = simulate(_pass([[0, 1]]), _setup(capacity_bytes=0, model=target))
    assert result.steps["read_commands"][0] == 6
    assert result.steps["useful_read_bytes"][0] == 6 * 2 * 16


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    prompt=st.integers(4, 40),
    steps=st.integers(1, 6),
    capacity_entries=st.integers(0, 200),
    layout=st.sampled_from(["sequence", "cluster"]),
)
def test_accounting_invariants(data, prompt, steps, capacity_entries, layout):
    model = ModelGeometry("inv", n_layers=2, n_q_heads=2, n_kv_heads=2, head_dim=4,
                          params_per_layer=1000)
    per_head = []
    for _head in range(model.n_kv_heads):
        lists = []
        for step in range(steps):
            chosen = data.draw(st.sets(st.integers(0, prompt + step - 1), max_size=prompt))
            lists.append(np.array(sorted(chosen), dtype=np.int32))
        per_head.append(HeadSelections.from_lists(lists))
    groups = data.draw(st.lists(st.integers(0, 3), min_size=prompt, max_size=prompt))
    selection = LayerSelection(
        heads=per_head, index_vectors=np.zeros((2, steps), dtype=np.int64),
        prefill_groups=np.array([groups, groups[::-1]], dtype=np.int32),
        append_groups=np.zeros((2, steps), dtype=np.int32),
    )
    pp = PolicyPass(HandPolicy(), prompt, steps, model, [selection, selection], pd.DataFrame(), 0.0)
    setup = _setup(capacity_entries * 16 * model.n_layers, model=model, layout=layout)
    replay = Replay(pp, setup)
    replay.env.process(replay.decode(None))
    replay.env.run()
    records = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    selected = sum(len(h.positions) for h in per_head) * model.n_layers
    # every selected entry is either a hit or a miss, and every miss is read exactly once
    assert records["hits"].sum() + records["misses"].sum() == selected
    assert records["useful_read_bytes"].sum() == records["misses"].sum() * 16
    assert (replay.io.run_length_counts * np.arange(len(replay.io.run_length_counts))).sum() == \
        records["misses"].sum()
    # bytes counted once: the command size histogram, the per-step records and the device agree
    sizes = replay.io.io_size_counts
    histogram_bytes = (sizes * np.arange(len(sizes)) * 4096).sum()
    assert histogram_bytes == records["read_bytes"].sum() == replay.flash.read_bytes
    assert records["read_bytes"].sum() >= records["useful_read_bytes"].sum()
    # the DRAM budget is never exceeded
    for cache in replay.run.caches:
        assert cache.peak_resident_entries <= capacity_entries
    # no KV entry lost or duplicated: every position of every region has exactly one slot
    for row in replay.run.layouts:
        for layout_obj in row:
            slots = layout_obj.slots(np.arange(prompt + steps))
            assert len(np.unique(slots)) == prompt + steps
    # latency is the sum of its parts
    parts = records[["dense_us", "scoring_us", "io_wait_us", "attention_us"]].sum(axis=1)
    np.testing.assert_allclose(records["latency_us"], parts, rtol=1e-9)


def test_extra_reads_are_fetched_but_not_attended():
    # step 0 attends 0-1 and loads 4-5 (e.g. to split their cluster): one page read, 4 misses,
    # attention over 2 entries + the current token
    pp = _pass([[0, 1]])
    pp.selections[0].extra_reads = [HeadSelections.from_lists([np.array([4, 5], np.int32)])]
    steps = simulate(pp, _setup(capacity_bytes=0)).steps
    assert steps["misses"][0] == 4 and steps["extra_entries"][0] == 2
    assert steps["selected_misses"][0] == 2  # 0 and 1: the attended ones
    assert steps["selected_entries"][0] == 2
    assert steps["useful_read_bytes"][0] == 4 * 16 and steps["read_bytes"][0] == 4096
    assert steps["latency_us"][0] == pytest.approx(
        DENSE_US + SCORING_US + READ_PAGE_US + attention_us(3))


def test_relabels_reach_the_layout_and_relocations_are_written():
    from sim.kv.layouts import LAYOUTS
    from sim.kv.layouts.sequence import SequenceLayout

    moved_to = {}

    class Relocating(SequenceLayout):
        """Moves relabelled entries to slots 512+ (page 2 for 16-byte entries: not adjacent
        to page 0, where the new tokens go, so they cannot coalesce)."""

        def relabel(self, positions, group):
            moved_to[group] = positions.tolist()
            return 512 + np.arange(len(positions))

    LAYOUTS._members["test-relocating"] = Relocating
    try:
        pp = _pass([[0, 1], [0, 1]])
        pp.selections[0].relabels = [[Relabel(step=0, positions=np.array([2, 3]), group=7)]]
        setup = SimSetup(device=HAND_DEVICE, target=MODEL, kv_dtype="fp16", cache_capacity_bytes=0,
                         replacement={"type": "lru"}, layout={"type": "test-relocating"})
        steps = simulate(pp, setup).steps
    finally:
        del LAYOUTS._members["test-relocating"]
    assert moved_to == {7: [2, 3]}
    # step 0 writes the new token's page and the relocated entries' page; step 1 only its own
    assert steps["write_commands"].tolist() == [2, 1]
    assert steps["relocated_entries"].tolist() == [2, 0]


def _pipelined(stream_index=False, overlap_transfer=False) -> SimSetup:
    return SimSetup(device=HAND_DEVICE, target=MODEL, kv_dtype="fp16", cache_capacity_bytes=0,
                    replacement={"type": "lru"}, layout={"type": "sequence"},
                    pipeline=PipelineSpec(stream_index=stream_index,
                                          overlap_transfer=overlap_transfer))


def test_streamed_index_is_read_during_the_q_projection_and_delays_scoring():
    # 1000 representatives x 8 B = 8000 B -> two pages, one 8 KiB command: 50 + 8192/4096 us,
    # issued at the layer start; scoring waits for it, then the KV page read (51 us) follows.
    index_us = 50 + 8192 / 4096
    steps = simulate(_pass([[0, 1, 2, 3]]), _pipelined(stream_index=True)).steps
    assert steps["index_read_bytes"][0] == 8192
    assert steps["latency_us"][0] == pytest.approx(
        index_us + SCORING_US + READ_PAGE_US + attention_us(5) + DENSE_US - DENSE_PRE_US)
    assert steps["io_wait_us"][0] == pytest.approx(index_us - DENSE_PRE_US + READ_PAGE_US)
    # the index is not resident: DRAM holds one layer's (here the only layer's) 8000 B
    assert steps["dram_bytes"][0] == 8000  # the cache holds nothing (capacity 0)


def test_overlapped_transfer_hides_scoring_and_the_kv_projection():
    # Q projection (1/3 of the QKV share: 1 of 1 + 2 x 1 heads), then the read starts with
    # scoring; scoring and the K/V projection run during the 51 us read.
    q_us = DENSE_PRE_US / 3
    steps = simulate(_pass([[0, 1, 2, 3]]), _pipelined(overlap_transfer=True)).steps
    assert steps["latency_us"][0] == pytest.approx(
        q_us + READ_PAGE_US + attention_us(5) + DENSE_US - DENSE_PRE_US)
    kv_projection_us = DENSE_PRE_US - q_us
    assert steps["io_wait_us"][0] == pytest.approx(READ_PAGE_US - SCORING_US - kv_projection_us)
    assert steps["dense_us"][0] == pytest.approx(DENSE_US)
