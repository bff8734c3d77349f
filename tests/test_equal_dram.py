"""``cache.dram_total``: the config form, the checks before any run and after the policy pass,
and runs whose total DRAM is resolved to the target (on the committed fixture trace).

The fixture trace (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64) has 160 + 24 positions;
at fp16 an entry is 256 bytes and the full KV cache 184 x 30 x 3 x 256 = 4,239,360 bytes.
"""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.errors import ConfigError, KvsimError
from sim.experiment.planning import plan
from sim.experiment.runner import execute

from .conftest import FIXTURE_TRACE

QUIET = {"progress": False, "log": lambda _message: None}
ENTRY = 256


def _experiment(tmp_path, policies, cache=None, name="equal"):
    data = {
        "name": name,
        "trace": {"path": str(FIXTURE_TRACE)},
        "kv_dtype": "fp16",
        "cache": cache or {"dram_total": 0.6},
        "plot": False,
        "policies": policies,
        "output": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def _no_pass_cache(monkeypatch):
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")


def test_a_target_below_the_index_fails_before_any_pass(tmp_path):
    # token_topk's index is every stored key: at the last step 183 keys of 128 bytes per KV
    # head and layer, 30 x 3 x 183 x 128 = 2,108,160 bytes (0.4973 of the full KV cache)
    path = _experiment(tmp_path, [{"type": "token_topk", "budget": 16}], {"dram_total": 0.4})
    with pytest.raises(ConfigError) as info:
        plan(path)
    message = str(info.value)
    assert "\n" not in message and ": token_topk: cache.dram_total 1.696 MB" in message
    assert "token_topk holds in DRAM" in message
    assert "at least 2.108 MB, 0.4973 of the full KV cache" in message
    # streamed, one layer's keys are resident: 3 x 183 x 128 bytes fit
    streamed = [{"type": "token_topk", "budget": 16, "pipeline": {"stream_index": True}}]
    assert len(plan(_experiment(tmp_path, streamed, {"dram_total": 0.4})).runs) == 1


def test_the_cli_reports_it_in_one_line_with_exit_2(tmp_path, capsys):
    path = _experiment(tmp_path, [{"type": "full"}], {"dram_total": "4MB"})
    code = main(["run", str(path), "--quiet", "--no-plot"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "full holds in DRAM" in lines[0] and "at least 4.239 MB" in lines[0]
    assert not (tmp_path / "equal").exists()


def test_capacity_and_total_are_exclusive_and_an_entry_picks_its_own(tmp_path):
    both = _experiment(tmp_path, [{"type": "full"}], {"capacity": 0.1, "dram_total": 0.5})
    with pytest.raises(ConfigError, match="give either capacity or dram_total, not both"):
        plan(both)
    policies = [
        {"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16},
        {"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16, "label": "equal",
         "cache": {"dram_total": 0.6}},
    ]
    mixed = plan(_experiment(tmp_path, policies, {"capacity": 0.1}, name="mixed"))
    sized, equal = mixed.runs
    assert sized.cache == {"replacement": {"type": "lru"}, "capacity": 0.1}
    assert equal.cache == {"replacement": {"type": "lru"}, "dram_total": 0.6}
    # a run sized by capacity keeps the id it had before dram_total existed
    alone = plan(_experiment(tmp_path, policies[:1], {"capacity": 0.1}, name="alone"))
    assert alone.runs[0].run_id == sized.run_id


def test_runs_at_equal_total_dram(tmp_path):
    # Both runs get the cache that the target leaves over their index, window and buffers at
    # their peak: whole entries per layer, so the bound sits within one entry per layer of it.
    policies = [
        {"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16},
        {"type": "token_topk", "budget": 16, "pipeline": {"stream_index": True}},
    ]
    the_plan = plan(_experiment(tmp_path, policies, {"dram_total": 0.6}))
    summary, _ = execute(the_plan, **QUIET)
    target = int(0.6 * 184 * (30 * 3 * 256))  # fraction x positions x bytes per token
    for row in summary.itertuples():
        assert row.dram_target_mb == target / 1e6
        assert row.peak_dram_mb <= row.dram_target_mb
        steps = pd.read_parquet(the_plan.runs_dir / row.run_id / "steps.parquet")
        rest = (steps["dram_bytes"] - steps["dram_cache_bytes"]).max()
        per_layer = round(row.cache_capacity_mb * 1e6) // (ENTRY * 30)
        assert rest + per_layer * ENTRY * 30 <= target < rest + (per_layer + 1) * ENTRY * 30
        settings = yaml.safe_load((the_plan.runs_dir / row.run_id / "run.yaml").read_text())
        assert settings["cache"]["dram_total_bytes"] == target
        assert settings["cache"]["capacity_bytes"] == round(row.cache_capacity_mb * 1e6)
    parts = [f"dram_{part}_mb" for part in ("cache", "index", "buffer", "window", "dense")]
    for row in summary.to_dict("records"):
        assert sum(row[p] for p in parts) == pytest.approx(row["mean_dram_mb"], rel=1e-12)


def test_a_target_below_the_exact_minimum_fails_after_the_pass(tmp_path):
    # static_clusters holds 16 sinks + 32 recent tokens + the new one per KV head and layer,
    # 30 x 3 x 49 x 256 = 1,128,960 bytes, checked before the pass; its index (about 9
    # clusters per head) only shows after it, so 1.13 MB passes the plan and fails the run.
    policies = [{"type": "static_clusters", "budget": 64, "tokens_per_cluster": 16}]
    the_plan = plan(_experiment(tmp_path, policies, {"dram_total": "1130000B"}))
    with pytest.raises(KvsimError) as info:
        execute(the_plan, **QUIET)
    message = str(info.value)
    assert "\n" not in message and "static_clusters holds in DRAM" in message
    assert "at its peak" in message


def test_dram_total_is_a_sweep_axis(tmp_path):
    text = textwrap.dedent(f"""
        name: axis
        trace: {{path: {FIXTURE_TRACE}}}
        cache: {{dram_total: 0.5}}
        plot: false
        policies:
          - {{type: static_clusters, budget: 64, tokens_per_cluster: 16}}
        sweep:
          grid:
            cache.dram_total: [0.5, 0.7]
    """)
    path = tmp_path / "axis.yaml"
    path.write_text(text)
    runs = plan(path).runs
    assert [run.cache["dram_total"] for run in runs] == [0.5, 0.7]
    assert len({run.pass_id for run in runs}) == 1  # one policy pass serves every target
