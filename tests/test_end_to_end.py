"""Whole runs on the committed real trace: determinism and properties that must hold exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.experiment.planning import plan
from sim.experiment.runner import execute
from sim.hardware import load_device
from sim.policies import POLICIES
from sim.policy_pass import run_policy_pass
from sim.replay import SimSetup, simulate

from .conftest import FIXTURE_TRACE


def _config(tmp_path, name: str):
    return {
        "name": name,
        "trace": {"path": str(FIXTURE_TRACE)},
        "model": "llama-3.2-1b",
        "cache": {"capacity": 0.25},
        "policies": [
            {"type": "full"},
            {"type": "token_topk", "budget": 64},
            {"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16},
        ],
        "output": str(tmp_path / name),
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    summaries = []
    plans = []
    for name in ("a", "b"):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_config(tmp, name)))
        plans.append(plan(path))
        summary, _report = execute(plans[-1], progress=False, log=lambda _m: None)
        summaries.append(summary)
    return plans, summaries


def test_runs_are_deterministic_for_a_seed(two_runs):
    (plan_a, plan_b), (first, second) = two_runs
    pd.testing.assert_frame_equal(first, second)
    for run_a, run_b in zip(plan_a.runs, plan_b.runs, strict=True):
        assert run_a.run_id == run_b.run_id  # named by settings, not by experiment
        a = pd.read_parquet(plan_a.run_dir(run_a) / "steps.parquet")
        b = pd.read_parquet(plan_b.run_dir(run_b) / "steps.parquet")
        pd.testing.assert_frame_equal(a, b)


def test_reference_and_upper_bound(two_runs):
    _tmp, (summary, _) = two_runs
    rows = summary.set_index("run")
    assert rows.loc["full", "attention_recall_mean"] == pytest.approx(1.0)
    assert rows.loc["full", "output_rel_error_mean"] == pytest.approx(0.0, abs=1e-6)
    assert rows.loc["full", "read_mb_per_token"] == 0
    # token-level top-k maximises each KV head group's attention mass at the budget, so no
    # policy attending the same number of tokens can capture more on average
    assert rows.loc["token_topk", "attention_recall_mean"] >= \
        rows.loc["static_clusters", "attention_recall_mean"]
    for run in ("token_topk", "static_clusters"):
        assert 0.0 < rows.loc[run, "attention_recall_mean"] < 1.0
        assert rows.loc[run, "read_amplification"] >= 1.0
        assert 0.0 <= rows.loc[run, "hit_rate"] <= 1.0


def test_io_records_add_up_and_budget_holds(fixture_trace):
    device = load_device("ufs40-flagship")
    target = fixture_trace.model
    capacity = 300_000  # bytes: far below the trace's 184-position KV cache (4.2 MB)
    policy = POLICIES.create({"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16})
    pp = run_policy_pass(fixture_trace, policy, seed=3)
    sim = simulate(pp, SimSetup(device, target, "fp16", capacity, {"type": "lru"},
                                {"type": "cluster"}))
    assert sim.totals["peak_cache_bytes"] <= capacity
    steps = sim.steps
    histogram_bytes = (sim.io_sizes["size_bytes"] * sim.io_sizes["commands"]).sum()
    assert histogram_bytes == steps["read_bytes"].sum()
    assert sim.io_sizes["commands"].sum() == steps["read_commands"].sum()
    entry = target.entry_bytes("fp16")
    assert steps["useful_read_bytes"].sum() == steps["misses"].sum() * entry
    # every selected entry of every (step, layer, KV head) was looked up exactly once, or
    # attended from the policy's DRAM window (16 sinks and 32 recent tokens per KV head:
    # all selected, the budget of 64 holding them)
    selected = sum(int(h.counts().sum()) for sel in pp.selections for h in sel.heads)
    assert steps["hits"].sum() + steps["misses"].sum() + steps["held_entries"].sum() == selected
    heads = target.n_layers * target.n_kv_heads
    assert (steps["held_entries"] == (16 + 32) * heads).all()
    assert np.all(steps["latency_us"] > 0)


# -- every experiment file in the repository plans ---------------------------------------------

EXPERIMENTS = sorted((FIXTURE_TRACE.parents[2] / "experiments").glob("*.yaml"))


def _with_generated_preset(path, tmp_path):
    """``path``, or, if its ``device:`` is a preset file that is not there (a machine's own,
    written by ``kvsim calibrate`` and never committed), a copy of it beside a generated preset
    of that name (the built-in UFS 4.0 preset written as a file)."""
    from sim.hardware.device import is_device_file

    device = yaml.safe_load(path.read_text()).get("device")
    repo = FIXTURE_TRACE.parents[2]
    if not isinstance(device, str) or not is_device_file(device) or (repo / device).exists():
        return path
    copy = tmp_path / "experiments" / path.name
    (copy.parent / device).parent.mkdir(parents=True)
    preset = load_device("ufs40-flagship").model_dump(mode="json")
    (copy.parent / device).write_text(yaml.safe_dump({**preset, "name": "generated"}))
    copy.write_text(path.read_text())
    return copy


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_plans(path, tmp_path):
    """Each experiments/*.yaml validates with every sweep point and figure (planning needs no
    trace, so this covers the long-decode files without their captures); nothing is written.
    A long_* file states its run count in its header ("Size: N runs"), checked here. A file
    whose device is this machine's calibrated preset plans with a generated one."""
    planned = plan(_with_generated_preset(path, tmp_path), output=tmp_path / "out")
    runs = planned.unique_runs()
    assert runs and planned.groups(runs)
    assert not (tmp_path / "out").exists()
    if path.stem.startswith("long_"):
        header = " ".join(line.lstrip("#").strip() for line in path.read_text().splitlines()
                          if line.startswith("#"))
        assert f"Size: {len(runs)} runs" in header, path.name


def test_the_experiment_files_are_found():
    names = {p.stem for p in EXPERIMENTS}
    assert {"quickstart", "long_regime_map", "long_table6_decode_length"} <= names
