"""The dense compute model: roofline terms by hand, the LM head once per token in a replay, and
each model config's ``params_per_layer`` against the block formula of its own sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sim.config import load_model_geometry, model_names
from sim.errors import ConfigError
from sim.hardware import (
    ComputeParams,
    DeviceParams,
    DramParams,
    attention_us,
    dense_layer_us,
    lm_head_us,
    load_device,
    scoring_us,
)
from sim.model import ModelGeometry
from sim.outputs import PolicyPass
from sim.policies.base import LayerSelection
from sim.replay import SimSetup, simulate

from .conftest import FIXTURE_TRACE, HAND_DEVICE, HandPolicy

MODELS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

# --- the roofline by hand ----------------------------------------------------------------------

SLOW_CPU = ComputeParams(cpu_gflops=10, weight_bits=8, kernel_overhead_us=3)  # 1e4 FLOP/us
FAST_CPU = ComputeParams(cpu_gflops=1000, weight_bits=8)  # 1e6 FLOP/us
DRAM = DramParams(bandwidth_mb_s=10_000, kv_budget_bytes=1)  # 1e4 B/us peak


def test_dense_block_compute_bound_by_hand() -> None:
    # 1e6 weights: 2e6 FLOP / 1e4 = 200 us > 1e6 B / 1e4 = 100 us; + 3 us overhead.
    assert dense_layer_us(1_000_000, SLOW_CPU, DRAM) == pytest.approx(203.0, rel=1e-12)


def test_dense_block_memory_bound_at_the_sustained_bandwidth() -> None:
    # 2e6 FLOP / 1e6 = 2 us < 1e6 B at 1e4 x 0.4 = 4e3 B/us = 250 us.
    half = DRAM.model_copy(update={"sustained_fraction": 0.4})
    assert half.sustained_bandwidth_mb_s == pytest.approx(4000.0)
    assert dense_layer_us(1_000_000, FAST_CPU, half) == pytest.approx(250.0, rel=1e-12)
    # at the peak it is 100 us: the fraction is what the roofline streams at
    assert dense_layer_us(1_000_000, FAST_CPU, DRAM) == pytest.approx(100.0, rel=1e-12)


def test_lm_head_by_hand() -> None:
    q4 = ComputeParams(cpu_gflops=100, weight_bits=4.5, lm_head_min_bits=6.5625)
    assert q4.lm_head_bits == 6.5625  # Q4_0 blocks, Q6_K head (llama.cpp)
    # 1000 x 64 = 64,000 weights: 64,000 * 6.5625 / 8 = 52,500 B + the final norm's 64 F32
    # weights (256 B) = 52,756 B / 1e4 = 5.2756 us; FLOPs 128,000 + 4 * 64 = 128,256 / 1e5 =
    # 1.28256 us: memory-bound.
    assert lm_head_us(1000, 64, q4, DRAM) == pytest.approx(5.2756, rel=1e-12)
    # 8-bit weights stay above the Q6_K floor: 64,000 + 256 B = 6.4256 us
    fp8 = q4.model_copy(update={"weight_bits": 8.0})
    assert fp8.lm_head_bits == 8.0
    assert lm_head_us(1000, 64, fp8, DRAM) == pytest.approx(6.4256, rel=1e-12)
    # compute-bound: 10 GFLOP/s -> 128,256 / 1e4 = 12.8256 us, + the 3 us overhead
    assert lm_head_us(1000, 64, SLOW_CPU, DRAM) == pytest.approx(15.8256, rel=1e-12)


def test_no_vocabulary_no_lm_head() -> None:
    assert lm_head_us(0, 2048, SLOW_CPU, DRAM) == 0.0
    with pytest.raises(ValueError, match="vocab_size"):
        lm_head_us(-1, 64, SLOW_CPU, DRAM)


@settings(max_examples=50, deadline=None)
@given(
    vocab=st.integers(1, 300_000),
    hidden=st.integers(1, 8192),
    bits=st.sampled_from([4.5, 6.5625, 8.0, 8.5, 16.0]),
    gflops=st.floats(1, 1000),
)
def test_lm_head_is_a_vocab_by_hidden_matvec(vocab, hidden, bits, gflops) -> None:
    # the LM head costs what a block of vocab * hidden weights costs, plus the final norm
    compute = ComputeParams(cpu_gflops=gflops, weight_bits=bits)
    matvec = dense_layer_us(vocab * hidden, compute, DRAM)
    head = lm_head_us(vocab, hidden, compute, DRAM)
    norm_us = max(4 * hidden / (gflops * 1e3), 4 * hidden / 1e4)
    assert matvec <= head <= matvec + norm_us + 1e-9


def test_params_validate() -> None:
    with pytest.raises(ValidationError, match="sustained_fraction"):
        DramParams(bandwidth_mb_s=1, kv_budget_bytes=1, sustained_fraction=0)
    with pytest.raises(ValidationError, match="sustained_fraction"):
        DramParams(bandwidth_mb_s=1, kv_budget_bytes=1, sustained_fraction=1.5)
    with pytest.raises(ValidationError, match="lm_head_min_bits"):
        ComputeParams(cpu_gflops=1, weight_bits=4, lm_head_min_bits=-1)
    with pytest.raises(ConfigError) as info:
        load_device("ufs40-flagship", {"dram.sustained_fraction": 2})
    assert "device.dram.sustained_fraction" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelGeometry("bad", 1, 1, 1, 4, 10, vocab_size=-1)


# --- the attention rate ------------------------------------------------------------------------


def test_attention_at_its_own_rate_by_hand() -> None:
    slow = SLOW_CPU.model_copy(update={"attention_gflops": 2.5})  # 2.5e3 FLOP/us
    # 1000 entries, head_dim 128, 4 query heads: 4 * 1000 * 128 * 4 = 2.048e6 FLOP / 2.5e3 =
    # 819.2 us > 1000 * 512 B / 1e4 = 51.2 us; + 3 us overhead
    assert attention_us(1000, 128, 4, 512, slow, DRAM) == pytest.approx(822.2, rel=1e-12)
    # without it, cpu_gflops (1e4 FLOP/us): 204.8 us + 3
    assert attention_us(1000, 128, 4, 512, SLOW_CPU, DRAM) == pytest.approx(207.8, rel=1e-12)
    # a fast attention rate leaves it memory-bound: 51.2 us + 3
    fast = SLOW_CPU.model_copy(update={"attention_gflops": 1000.0})
    assert attention_us(1000, 128, 4, 512, fast, DRAM) == pytest.approx(54.2, rel=1e-12)
    # the matvecs and scoring keep cpu_gflops: 2 * 1000 * 128 * 4 / 1e4 = 102.4 us + 3
    assert scoring_us(1000, 128, 4, 256, slow, DRAM) == pytest.approx(105.4, rel=1e-12)
    assert dense_layer_us(1_000_000, slow, DRAM) == pytest.approx(203.0, rel=1e-12)
    with pytest.raises(ValidationError):
        ComputeParams(cpu_gflops=1, weight_bits=4, attention_gflops=0)


@given(gflops=st.floats(0.1, 1e4), n=st.integers(0, 10**6), d=st.sampled_from([64, 128]),
       g=st.integers(1, 8))
def test_attention_rate_unset_is_the_cpu_rate(gflops: float, n: int, d: int, g: int) -> None:
    base = ComputeParams(cpu_gflops=gflops, weight_bits=4.5, kernel_overhead_us=1.0)
    same = base.model_copy(update={"attention_gflops": gflops})
    assert attention_us(n, d, g, 2 * d, base, DRAM) == attention_us(n, d, g, 2 * d, same, DRAM)


def test_an_unset_attention_rate_keeps_the_dump_and_so_the_run_ids() -> None:
    # run ids hash device.model_dump(): a preset without the rate dumps as before it existed
    device = load_device("ufs40-flagship")
    assert device.compute.attention_gflops is None
    assert set(device.model_dump(mode="json")["compute"]) == {
        "cpu_gflops", "weight_bits", "lm_head_min_bits", "kernel_overhead_us"}
    rated = load_device(device, {"compute.attention_gflops": 12.5})
    assert rated.model_dump(mode="json")["compute"]["attention_gflops"] == 12.5
    # the dump loads back to the same device, with and without the rate
    assert load_device(device.model_dump()) == device
    assert load_device(rated.model_dump()) == rated


# --- the LM head in a replay -------------------------------------------------------------------


def _resident_run(model: ModelGeometry, steps: int = 3,
                  device: DeviceParams = HAND_DEVICE) -> pd.DataFrame:
    """Full attention on every layer (no cache, no flash) on the hand device."""
    selection = LayerSelection(heads=None, index_vectors=np.zeros((model.n_kv_heads, steps)))
    pp = PolicyPass(HandPolicy(), 8, steps, model, [selection] * model.n_layers,
                    pd.DataFrame(), 0.0)
    setup = SimSetup(device=device, target=model, kv_dtype="fp16", cache_capacity_bytes=0,
                     replacement={"type": "lru"}, layout={"type": "sequence"})
    return simulate(pp, setup).steps


def test_a_replay_charges_attention_at_the_attention_rate() -> None:
    toy = ModelGeometry("toy", n_layers=2, n_q_heads=2, n_kv_heads=1, head_dim=4,
                        params_per_layer=100_000, hidden_size=64)
    slow = HAND_DEVICE.model_copy(update={"compute": HAND_DEVICE.compute.model_copy(
        update={"attention_gflops": 0.001})})  # 1 FLOP/us
    base, rated = _resident_run(toy), _resident_run(toy, device=slow)
    # step s attends the 8 prompt entries and s + 1 new ones: 4 * N * 4 * 2 = 32 N FLOP = 32 N
    # us per layer (its 16 B fp16 entries take N * 16 / 1e4 us: far less), two layers
    entries = 8 + np.arange(1, 4)
    np.testing.assert_allclose(rated["attention_us"], 2 * 32.0 * entries, rtol=1e-12)
    # on the hand device (1e5 FLOP/us, 1e4 B/us): max(32 N / 1e5, 16 N / 1e4) per layer
    np.testing.assert_allclose(base["attention_us"], 2 * 16.0 * entries / 1e4, rtol=1e-12)
    np.testing.assert_allclose(rated["latency_us"] - base["latency_us"],
                               rated["attention_us"] - base["attention_us"], rtol=1e-9)
    for column in ("dense_us", "scoring_us", "io_wait_us", "dram_bytes"):
        np.testing.assert_array_equal(rated[column], base[column])


# HAND_DEVICE: 100 GFLOP/s (1e5 FLOP/us), 10,000 MB/s (1e4 B/us), 8-bit weights, no overhead.
# vocab 100,000 x hidden 64 = 6.4e6 weights: 6.4e6 B + 256 B of norm = 640.0256 us of memory
# against (12.8e6 + 256) / 1e5 = 128.00256 us of compute.
LM_HEAD_US = 640.0256


@pytest.mark.parametrize("n_layers", [2, 3])
def test_lm_head_charged_exactly_once_per_token(n_layers: int) -> None:
    toy = ModelGeometry("toy", n_layers=n_layers, n_q_heads=2, n_kv_heads=1, head_dim=4,
                        params_per_layer=100_000, hidden_size=64)
    without = _resident_run(toy)
    with_head = _resident_run(dataclasses.replace(toy, vocab_size=100_000))
    np.testing.assert_allclose(with_head["latency_us"] - without["latency_us"], LM_HEAD_US,
                               rtol=1e-12)
    np.testing.assert_allclose(with_head["dense_us"] - without["dense_us"], LM_HEAD_US,
                               rtol=1e-12)
    # everything else is as it was
    for column in ("attention_us", "scoring_us", "io_wait_us", "dram_bytes"):
        np.testing.assert_array_equal(with_head[column], without[column])


def test_trace_geometry_carries_its_vocabulary() -> None:
    from sim.trace.format import open_trace

    model = open_trace(FIXTURE_TRACE).model
    manifest = yaml.safe_load((FIXTURE_TRACE / "manifest.json").read_text())["model"]
    assert (model.vocab_size, model.hidden) == (manifest["vocab_size"], manifest["hidden_size"])
    assert model.vocab_size == 49152 and model.hidden == 576  # SmolLM2-135M config.json


# --- model configs -----------------------------------------------------------------------------


def block_formula(c: dict) -> int:
    """Weights of one Llama / Qwen2 block, from the config's own sizes."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    q_dim, kv_dim = c["n_q_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    attention = h * q_dim + 2 * h * kv_dim + q_dim * h  # q, k, v, o
    mlp = 3 * h * inter  # gate, up, down
    norms = 2 * h  # input and post-attention RMSNorm
    bias = q_dim + 2 * kv_dim if c.get("qkv_bias") else 0
    return attention + mlp + norms + bias


#: total parameters as the model cards state them (embedding counted once: tied)
CARD_TOTALS = {
    "llama-3.2-1b": 1.23e9,
    "llama-3.2-3b": 3.21e9,
    "qwen2.5-1.5b": 1.54e9,
    "smollm2-135m": 135e6,
}


@pytest.mark.parametrize("name", sorted(CARD_TOTALS))
def test_params_per_layer_is_the_block_formula(name: str) -> None:
    raw = yaml.safe_load((MODELS_DIR / f"{name}.yaml").read_text())
    assert raw["params_per_layer"] == block_formula(raw)
    assert raw["hidden_size"] == raw["n_q_heads"] * raw["head_dim"]
    geometry = load_model_geometry(name)
    total = (geometry.n_layers * geometry.params_per_layer
             + geometry.vocab_size * geometry.hidden + geometry.hidden)
    assert total == pytest.approx(CARD_TOTALS[name], rel=0.005)


def test_every_model_config_is_checked_and_has_a_vocabulary() -> None:
    assert set(model_names()) == set(CARD_TOTALS)
    for name in model_names():
        assert load_model_geometry(name).vocab_size > 0


def test_smollm2_config_matches_the_captured_model() -> None:
    # the manifest's params_per_layer was counted from the loaded model's first block
    manifest = yaml.safe_load((FIXTURE_TRACE / "manifest.json").read_text())["model"]
    geometry = load_model_geometry("smollm2-135m")
    assert geometry.params_per_layer == manifest["params_per_layer"]
    assert (geometry.vocab_size, geometry.hidden_size) == (
        manifest["vocab_size"], manifest["hidden_size"])


# --- presets: precision and regime -------------------------------------------------------------


def test_weight_precision_is_an_experiment_knob() -> None:
    base = load_device("ufs40-flagship")
    assert base.compute.weight_bits == 18 * 8 / 32  # Q4_0
    assert base.compute.lm_head_bits == 210 * 8 / 256  # Q6_K
    fp8 = load_device({"preset": "ufs40-flagship", "compute": {"weight_bits": 8}})
    assert fp8.compute.weight_bits == 8 and fp8.compute.lm_head_bits == 8
    assert load_device(base, {"compute.weight_bits": 8.5}).compute.lm_head_bits == 8.5


@pytest.mark.parametrize("preset", ["ufs40-flagship", "ufs31-phone"])
def test_8_bit_blocks_are_memory_bound_on_the_presets(preset: str) -> None:
    device = load_device(preset, {"compute.weight_bits": 8})
    params = load_model_geometry("llama-3.2-1b").params_per_layer
    memory_us = params / device.dram.sustained_bandwidth_mb_s
    assert memory_us > 2 * params / (device.compute.cpu_gflops * 1e3)
    expected = memory_us + device.compute.kernel_overhead_us
    assert dense_layer_us(params, device.compute, device.dram) == pytest.approx(expected)
