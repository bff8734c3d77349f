"""Per-layer cache swapping (``pipeline.swap_layers``, DynaKV technique 3) against timelines and
byte counts worked out by hand, and the swap-off engine against figures frozen before it existed.

The swap device (below) has 16-byte pages, the size of one hand-model entry, so a command moves
exactly the bytes of the entries it carries and the swap figures are whole entries.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from sim.config import PipelineSpec
from sim.footprint import PARTS
from sim.hardware import DeviceParams, FlashParams
from sim.model import ModelGeometry
from sim.outputs import STEP_COLUMNS, PolicyPass
from sim.policies.base import HeadSelections, LayerSelection
from sim.replay import Replay, SimSetup, simulate

from . import engine_golden
from .conftest import HAND_DEVICE, HandPolicy

ENTRY = 16  # head_dim 4, K + V at fp16
# HAND_DEVICE's timings (read: 50 us + bytes / 4096; write: 100 us + bytes / 2048), 16-byte
# pages; commands of at most 64 bytes (four entries).
SWAP_FLASH = HAND_DEVICE.flash.model_copy(update={"page_size_bytes": 16, "max_io_bytes": 64})
SWAP_DEVICE = HAND_DEVICE.model_copy(update={"flash": SWAP_FLASH})
BIG_IO_DEVICE = HAND_DEVICE.model_copy(
    update={"flash": SWAP_FLASH.model_copy(update={"max_io_bytes": 8192})}
)
# 4e6 weights per block: dense 400 us per layer, of which the QKV share is 48 / 4e6
PARAMS = 4_000_000
DENSE_US = 400.0
DENSE_PRE_US = DENSE_US * 48 / PARAMS
SCORING_US = 0.8  # 1000 index vectors
PROMPT = 8
INDEX_BYTES = 1000 * 8  # 1000 vectors of head_dim 4 at fp16, per layer


def attention_us(entries: int) -> float:
    return max(4 * entries * 4 / 1e5, entries * 16 / 1e4)


def _model(n_layers: int) -> ModelGeometry:
    return ModelGeometry("hand", n_layers=n_layers, n_q_heads=1, n_kv_heads=1, head_dim=4,
                         params_per_layer=PARAMS)


def _pass(per_step: list[list[int]], n_layers: int) -> PolicyPass:
    heads = [HeadSelections.from_lists([np.array(p, dtype=np.int32) for p in per_step])]
    selection = LayerSelection(heads=heads, index_vectors=np.full((1, len(per_step)), 1000))
    return PolicyPass(HandPolicy(), PROMPT, len(per_step), _model(n_layers),
                      [selection] * n_layers, pd.DataFrame(), 0.0)


def _setup(device: DeviceParams, n_layers: int, swap: bool,
           capacity_entries: int = 1 << 16) -> SimSetup:
    return SimSetup(device=device, target=_model(n_layers), kv_dtype="fp16",
                    cache_capacity_bytes=capacity_entries * ENTRY * n_layers,
                    replacement={"type": "lru"}, layout={"type": "sequence"},
                    pipeline=PipelineSpec(swap_layers=swap))


def test_one_layer_swap_in_is_the_resident_image_and_stalls_the_lookup():
    # One layer: nothing earlier can prefetch its image, so it is read at each step's start.
    steps = simulate(_pass([[0, 1, 2, 3], [0, 4]], 1), _setup(SWAP_DEVICE, 1, swap=True)).steps
    # step 0: the cache starts empty -> no swap-in; reads 0-3 (one 64 B command); after the
    # layer, 0-3 and the appended token 8 are new -> 5 x 16 = 80 B written (64 + 16)
    step0 = DENSE_US + SCORING_US + (50 + 64 / 4096) + attention_us(5)
    assert steps["latency_us"][0] == pytest.approx(step0, rel=1e-12)
    assert steps["swap_read_bytes"][0] == 0 and steps["swap_write_bytes"][0] == 80
    # step 1 (flash idle again: step 0's writes took at most 200 us of its 400 us dense tail):
    # the image {0, 1, 2, 3, 8} = 80 B is read as 64 + 16 on two units, done at 50 + 80/4096;
    # the lookup then finds 0 and misses 4 (one 16 B read, 50 + 16/4096).
    swap_in_done = 50 + 80 / 4096
    reads_done = swap_in_done + 50 + 16 / 4096
    wait = reads_done - DENSE_PRE_US - SCORING_US
    assert steps["swap_read_bytes"][1] == 80
    assert steps["io_wait_us"][1] == pytest.approx(wait, rel=1e-12)
    assert steps["latency_us"][1] == pytest.approx(
        DENSE_US + SCORING_US + wait + attention_us(3), rel=1e-12)
    assert steps["hits"].tolist() == [0, 1] and steps["misses"].tolist() == [4, 1]
    # newly resident at step 1: 4 and the appended 9 -> 32 B
    assert steps["swap_write_bytes"][1] == 32
    # DRAM: one image (no other layer to swap in) + the index
    assert steps["dram_bytes"].tolist() == [5 * ENTRY + INDEX_BYTES, 7 * ENTRY + INDEX_BYTES]


SELECTIONS = [[0, 1, 2, 3], [0, 4], [1, 5]]


def test_prefetched_images_hide_behind_the_previous_layer():
    # Three layers, one-command images (max I/O 8 KiB): each image is read while the previous
    # layer computes (over 400 us), so swapping changes no latency.
    on = simulate(_pass(SELECTIONS, 3), _setup(BIG_IO_DEVICE, 3, swap=True)).steps
    off = simulate(_pass(SELECTIONS, 3), _setup(BIG_IO_DEVICE, 3, swap=False)).steps
    np.testing.assert_allclose(on["latency_us"], off["latency_us"], rtol=1e-12)
    np.testing.assert_allclose(on["io_wait_us"], off["io_wait_us"], rtol=1e-12)
    for column in ("hits", "misses", "read_bytes", "write_bytes"):
        assert on[column].tolist() == off[column].tolist()
    # resident per layer after step 0: 5 entries; after step 1: 7 (+ 4 and 9); step s reads
    # every layer's image of the end of step s - 1
    assert on["swap_read_bytes"].tolist() == [0, 3 * 5 * ENTRY, 3 * 7 * ENTRY]
    # newly resident per layer: step 0 {0-3, 8}; step 1 {4, 9}; step 2 {5, 10} (1 was a hit)
    assert on["swap_write_bytes"].tolist() == [3 * 5 * ENTRY, 3 * 2 * ENTRY, 3 * 2 * ENTRY]
    # DRAM (caches): the largest current-at-end + incoming pair of the step. Step 0: layer 2
    # ends with 5 while layer 0's image for step 1 (5) comes in -> 10. Step 1: layer 2 ends
    # with 7 while layer 0's (7) comes in -> 14. Step 2 (the last): layers 0 and 1 end with 9
    # while the next layer's image, still as after step 1 (7), comes in -> 16.
    index = 3 * INDEX_BYTES
    assert on["dram_bytes"].tolist() == [10 * ENTRY + index, 14 * ENTRY + index,
                                         16 * ENTRY + index]
    assert off["dram_bytes"].tolist() == [15 * ENTRY + index, 21 * ENTRY + index,
                                          27 * ENTRY + index]


def test_an_image_read_ahead_of_demand_reads_delays_them_in_the_fifo():
    # Two layers, images of 5 entries split into 64 + 16 B commands. Layer 1 of step 0 issues
    # layer 0's image for step 1 at its start; the image holds both flash units for 50 us, so
    # layer 1's own read (0-3, issued after projection and scoring) gets a unit at 50 and is
    # done at 100 + 64/4096 instead of 0.8048 + 50 + 64/4096. At step 1 the same happens to
    # layer 0 (behind layer 1's image): read of 4 done at 100 + 16/4096. Layer 1 of step 1
    # (the last step) prefetches nothing and its image landed long before: no change.
    on = simulate(_pass(SELECTIONS[:2], 2), _setup(SWAP_DEVICE, 2, swap=True)).steps
    off = simulate(_pass(SELECTIONS[:2], 2), _setup(SWAP_DEVICE, 2, swap=False)).steps
    issued = DENSE_PRE_US + SCORING_US
    assert off["io_wait_us"].tolist() == pytest.approx(
        [2 * (50 + 64 / 4096), 2 * (50 + 16 / 4096)], rel=1e-12)
    assert on["io_wait_us"].tolist() == pytest.approx(
        [(50 + 64 / 4096) + (100 + 64 / 4096 - issued),
         (100 + 16 / 4096 - issued) + (50 + 16 / 4096)], rel=1e-12)
    np.testing.assert_allclose(on["latency_us"] - off["latency_us"], 50 - issued, rtol=1e-9)
    assert on["swap_read_bytes"].tolist() == [0, 2 * 5 * ENTRY]


def test_swap_off_is_bit_identical_to_the_engine_before_swapping():
    golden = np.load(engine_golden.GOLDEN)
    scenarios = engine_golden.scenarios()
    assert len(golden.files) == 3 * len(scenarios)
    for name, (pp, setup) in scenarios.items():
        assert setup.pipeline.swap_layers is False
        result = simulate(pp, setup)
        steps = result.steps
        np.testing.assert_array_equal(
            steps[list(engine_golden.OLD_COLUMNS)].to_numpy(), golden[f"{name}/steps"],
            err_msg=name)
        np.testing.assert_array_equal(result.io_sizes.to_numpy(), golden[f"{name}/io_sizes"])
        np.testing.assert_array_equal(result.run_lengths.to_numpy(),
                                      golden[f"{name}/run_lengths"])
        # columns added since: swapping's (off here), held entries (the hand selections hold
        # nothing outside the cache), the selected entries' misses (the misses but for the
        # extra reads') and the footprint's parts, which add up to dram_bytes
        parts = [f"dram_{part}_bytes" for part in PARTS]
        later = set(STEP_COLUMNS) - set(engine_golden.OLD_COLUMNS) - {*parts, "selected_misses"}
        for column in later:
            assert not steps[column].any(), (name, column)
        assert (steps["selected_misses"] <= steps["misses"]).all()
        plain = steps["extra_entries"] == 0
        assert (steps["selected_misses"][plain] == steps["misses"][plain]).all()
        assert (steps["selected_misses"][~plain] < steps["misses"][~plain]).any()
        np.testing.assert_array_equal(steps[parts].sum(axis=1), steps["dram_bytes"], err_msg=name)
        assert not steps[["dram_window_bytes", "dram_buffer_bytes"]].to_numpy().any(), name


def _swapping(setup: SimSetup, **changes) -> SimSetup:
    pipeline = setup.pipeline.model_copy(update={"swap_layers": True})
    return dataclasses.replace(setup, pipeline=pipeline, **changes)


def test_a_free_flash_makes_swapping_free():
    # bandwidth 1e12 MB/s, 1e-9 us per command, deep queues: every swap read or write is
    # instantaneous, so with swapping on the latencies are those with it off
    instant = FlashParams(read_bandwidth_mb_s=1e12, write_bandwidth_mb_s=1e12, queue_depth=4096,
                          parallel_units=4096, read_command_latency_us=1e-9,
                          write_command_latency_us=1e-9, page_size_bytes=4096,
                          max_io_bytes=4096)
    device = HAND_DEVICE.model_copy(update={"flash": instant})
    for name, (pp, setup) in list(engine_golden.scenarios().items())[::5]:
        off = simulate(pp, dataclasses.replace(setup, device=device)).steps
        on = simulate(pp, _swapping(setup, device=device)).steps
        assert on["swap_read_bytes"].sum() > 0 and on["swap_write_bytes"].sum() > 0, name
        np.testing.assert_allclose(on["latency_us"], off["latency_us"], rtol=0, atol=1e-5,
                                   err_msg=name)
        assert (on["hits"] == off["hits"]).all() and (on["misses"] == off["misses"]).all()


@pytest.mark.parametrize("capacity_entries", [6, 25, 1000])
def test_swap_reads_each_image_as_left_and_dram_holds_two_images(capacity_entries):
    # Random selections on 3 cached layers x 2 KV heads, 16-byte pages (an entry a page): the
    # swap-in bytes of step s are every layer's resident entries after step s - 1, which the
    # swap-off run reports as its DRAM use (sequence layout: no write buffers) minus the index.
    rng = np.random.default_rng(5)
    prompt, n_steps, n_layers = 40, 8, 3
    model = ModelGeometry("r", n_layers=n_layers, n_q_heads=2, n_kv_heads=2, head_dim=4,
                          params_per_layer=PARAMS)
    selections = []
    for _layer in range(n_layers):
        heads = [HeadSelections.from_lists(
            [np.sort(rng.choice(prompt + s, size=int(rng.integers(1, 12)), replace=False))
             .astype(np.int32) for s in range(n_steps)]) for _head in range(2)]
        selections.append(LayerSelection(heads=heads,
                                         index_vectors=np.full((2, n_steps), 100)))
    pp = PolicyPass(HandPolicy(), prompt, n_steps, model, selections, pd.DataFrame(), 0.0)
    setups = {swap: SimSetup(device=SWAP_DEVICE, target=model, kv_dtype="fp16",
                             cache_capacity_bytes=capacity_entries * ENTRY * n_layers,
                             replacement={"type": "lru"}, layout={"type": "sequence"},
                             pipeline=PipelineSpec(swap_layers=swap))
              for swap in (False, True)}
    off = simulate(pp, setups[False]).steps
    replay = Replay(pp, setups[True])
    replay.env.process(replay.decode(None))
    replay.env.run()
    on = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    index = n_layers * 100 * 2 * 8
    resident_after = off["dram_bytes"].to_numpy() - index  # bytes, all layers
    assert on["swap_read_bytes"][0] == 0
    np.testing.assert_array_equal(on["swap_read_bytes"][1:], resident_after[:-1])
    # the cache itself is unchanged by swapping
    for column in ("hits", "misses", "streamed", "read_bytes", "useful_read_bytes"):
        assert on[column].tolist() == off[column].tolist(), column
    # every byte moved is counted once: KV reads + swap reads are what the flash read
    assert replay.flash.read_bytes == on["read_bytes"].sum() + on["swap_read_bytes"].sum()
    assert replay.flash.write_bytes == on["write_bytes"].sum() + on["swap_write_bytes"].sum()
    # DRAM: at most two layers' capacity plus the index, against up to three without swapping
    per_layer = capacity_entries * ENTRY
    assert (on["dram_bytes"] <= 2 * per_layer + index).all()
    if capacity_entries == 6:  # every cache full from step 1 on: two capacities against three
        assert (on["dram_bytes"][1:] == 2 * per_layer + index).all()
        assert (off["dram_bytes"][1:] == 3 * per_layer + index).all()
