"""Policies that select one layer ahead (``selection_lead_layers = 1``, InfiniGen) in the engine.

The same hand-written selections replay with and without the lead: with it, layer ``l + 1``'s
scoring and reads move into layer ``l`` (right after its QKV projection), so its flash reads
overlap layer ``l``'s attention and dense compute. The lead can only hide I/O, never add time,
and with no I/O it changes nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.config import PipelineSpec
from sim.model import ModelGeometry
from sim.outputs import STEP_COLUMNS, PolicyPass
from sim.policies.base import HeadSelections, LayerSelection
from sim.replay import Replay, SimSetup, simulate

from .conftest import HAND_DEVICE, HandPolicy

PROMPT = 8
MODEL = ModelGeometry("hand", n_layers=3, n_q_heads=2, n_kv_heads=1, head_dim=4,
                      params_per_layer=1_000_000)
READ_PAGE_US = 50 + 4096 / 4096


def _pass(per_step: list[list[int]], lead: bool) -> PolicyPass:
    policy = HandPolicy()
    policy.selection_lead_layers = 1 if lead else 0
    heads = [HeadSelections.from_lists([np.array(p, dtype=np.int32) for p in per_step])]
    selection = LayerSelection(heads=heads, index_vectors=np.full((1, len(per_step)), 1000))
    return PolicyPass(policy, PROMPT, len(per_step), MODEL, [selection] * MODEL.n_layers,
                      pd.DataFrame(), 0.0)


def _setup(capacity_entries: int = 0, pipeline: PipelineSpec | None = None) -> SimSetup:
    return SimSetup(device=HAND_DEVICE, target=MODEL, kv_dtype="fp16",
                    cache_capacity_bytes=capacity_entries * 16 * MODEL.n_layers,
                    replacement={"type": "lru"}, layout={"type": "sequence"},
                    pipeline=pipeline or PipelineSpec())


SELECTIONS = [[0, 1, 2, 3], [0, 2, 8], [1, 5, 8, 9]]


def test_lead_hides_the_reads_of_every_layer_but_the_first() -> None:
    plain = simulate(_pass(SELECTIONS, lead=False), _setup()).steps
    lead = simulate(_pass(SELECTIONS, lead=True), _setup()).steps
    assert (lead["latency_us"] <= plain["latency_us"] + 1e-9).all()
    # the same work: scoring, reads, attention, dense compute are all still done
    for column in ("scoring_us", "attention_us", "dense_us", "read_bytes", "misses",
                   "read_commands", "selected_entries", "write_bytes"):
        np.testing.assert_allclose(lead[column], plain[column], err_msg=column)
    # each layer reads one cold page (51 us): without the lead every layer waits for it; with
    # it only layer 0 does (layers 1 and 2 read during the previous layer's ~100 us of compute),
    # and layer 0 scores layer 1 while its own read is in flight
    score_us = plain["scoring_us"][0] / 3
    np.testing.assert_allclose(plain["io_wait_us"], 3 * READ_PAGE_US)
    np.testing.assert_allclose(lead["io_wait_us"], READ_PAGE_US - score_us)
    np.testing.assert_allclose(
        lead["latency_us"], plain["latency_us"] - 2 * READ_PAGE_US - score_us
    )


def test_without_io_the_lead_changes_nothing() -> None:
    # every selection empty: no reads at all; scoring only moves from layer l + 1 into layer l
    empty = [[], [], []]
    plain = simulate(_pass(empty, lead=False), _setup()).steps
    lead = simulate(_pass(empty, lead=True), _setup()).steps
    assert plain["read_bytes"].sum() == 0
    np.testing.assert_allclose(lead["latency_us"], plain["latency_us"], rtol=1e-12)
    np.testing.assert_allclose(lead["scoring_us"], plain["scoring_us"], rtol=1e-12)
    # everything cached (a warm cache, a large capacity): the second visit reads nothing
    again = [[0, 1, 2, 3], [0, 1, 2, 3]]
    plain = simulate(_pass(again, lead=False), _setup(capacity_entries=64)).steps
    lead = simulate(_pass(again, lead=True), _setup(capacity_entries=64)).steps
    assert plain["read_bytes"][1] == 0
    assert lead["latency_us"][1] == pytest.approx(plain["latency_us"][1], rel=1e-12)


@pytest.mark.parametrize(
    "pipeline",
    [PipelineSpec(stream_index=True), PipelineSpec(overlap_transfer=True),
     PipelineSpec(swap_layers=True)],
    ids=["stream_index", "overlap_transfer", "swap_layers"],
)
def test_lead_with_the_pipeline_switches(pipeline: PipelineSpec) -> None:
    setup = _setup(capacity_entries=6, pipeline=pipeline)
    plain = simulate(_pass(SELECTIONS, lead=False), setup).steps
    replay = Replay(_pass(SELECTIONS, lead=True), setup)
    replay.env.process(replay.decode(None))
    replay.env.run()
    lead = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    # Per step the lead may lose a fraction of a microsecond under swap_layers (the next
    # layer's lookup waits for its swap-in at the speculation point, where the plain replay
    # would still be scoring), never over the run.
    assert lead["latency_us"].sum() < plain["latency_us"].sum()
    assert (lead["latency_us"] <= plain["latency_us"] + 1.0).all()
    assert lead["hits"].sum() + lead["misses"].sum() == lead["selected_entries"].sum()
    assert lead["useful_read_bytes"].sum() == lead["misses"].sum() * 16
    assert lead["read_bytes"].sum() + lead["index_read_bytes"].sum() + \
        lead.get("swap_read_bytes", pd.Series([0])).sum() == replay.flash.read_bytes
    assert not replay.lead  # every speculated read was consumed by its layer


def test_full_next_layer_is_not_speculated() -> None:
    pp = _pass(SELECTIONS, lead=True)
    # a dense middle layer: no cache, nothing to read ahead
    pp.selections = [pp.selections[0], LayerSelection(None, np.zeros((1, 3), np.int64)),
                     pp.selections[2]]
    steps = simulate(pp, _setup()).steps
    # layer 1 is dense (no reads); layer 2 is speculated during layer 1: only layer 0 waits
    np.testing.assert_allclose(steps["io_wait_us"], READ_PAGE_US)
    assert (steps["read_commands"] == 2).all()
