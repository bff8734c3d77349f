"""The CLI's contract with users: one-line errors, exit code 2, nothing half-written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest

from sim.cli import main

from .conftest import FIXTURE_TRACE

GOOD = f"""
name: tiny
trace:
  path: {FIXTURE_TRACE}
device: ufs40-flagship
cache:
  capacity: 0.2
policies:
  - type: full
  - type: static_clusters
    budget: 64
    tokens_per_cluster: 16
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _run_bad(tmp_path: Path, capsys, text: str) -> str:
    config = _write(tmp_path, text)
    out_dir = tmp_path / "out"
    code = main(["run", str(config), "--output", str(out_dir), "--quiet", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not out_dir.exists(), "a failed config must not leave results behind"
    return lines[0]


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ("name: tiny", "name: tiny\nbogus: 1", "bogus: unknown key"),
        ("device: ufs40-flagship", "device: {preset: ufs40-flagship, flash: "
         "{read_bandwidth_mb_s: -5}}", "read_bandwidth_mb_s"),
        ("device: ufs40-flagship", "device: no-such-phone", "no-such-phone"),
        ("budget: 64", "budget: 5000", "policies[1].budget"),
        ("type: static_clusters", "type: no_such_policy", "unknown policy 'no_such_policy'"),
        ("tokens_per_cluster: 16", "tokens_per_clusterz: 16", "tokens_per_clusterz"),
        ("capacity: 0.2", "capacity: -3", "cache.capacity"),
        ("capacity: 0.2", "capacity: lots", "cache.capacity"),
        (f"path: {FIXTURE_TRACE}", "path: /nonexistent/trace", "/nonexistent/trace"),
        ("name: tiny", "name: tiny\nkv_dtype: fp7", "kv_dtype"),
        ("name: tiny", "name: tiny\nmodel: llama-99b", "llama-99b"),
        ("name: tiny", "name: tiny\nseed: abc", "seed"),
        ("name: tiny", "name: tiny\npipeline: {stream_index: true, bogus: 1}", "pipeline.bogus"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, replace, by, expected):
    assert replace in GOOD
    line = _run_bad(tmp_path, capsys, GOOD.replace(replace, by))
    assert expected in line, line
    assert "exp.yaml" in line or "device" in line


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    line = _run_bad(tmp_path, capsys, GOOD + "\npolicies: [unclosed\n")
    assert "exp.yaml" in line and "invalid YAML" in line and "line" in line


def test_missing_config_file(tmp_path, capsys):
    code = main(["run", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "nope.yaml" in err


def test_corrupt_trace_is_one_line(tmp_path, capsys):
    import shutil

    broken = tmp_path / "trace"
    shutil.copytree(FIXTURE_TRACE, broken)
    victim = sorted(broken.glob("layer_*.keys.npy"))[3]
    victim.write_bytes(victim.read_bytes()[:-100])
    line = _run_bad(tmp_path, capsys, GOOD.replace(str(FIXTURE_TRACE), str(broken)))
    assert victim.name in line


def test_unknown_subcommand_and_flag(capsys):
    assert main(["explode"]) == 2
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_list_names_the_registered_parts(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "token_topk", "static_clusters", "sequence", "cluster", "lru",
                 "ufs40-flagship", "ufs31-phone", "llama-3.2-3b", "pydoc"):
        assert name in out


def test_trace_info_and_verify(capsys):
    assert main(["trace", "verify", str(FIXTURE_TRACE)]) == 0
    assert "checksums OK" in capsys.readouterr().out


def test_run_writes_table_results_and_plot(tmp_path, capsys):
    config = _write(tmp_path, GOOD)
    out_dir = tmp_path / "out"
    assert main(["run", str(config), "--output", str(out_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "static_clusters" in out and "recall" in out
    for name in ("summary.csv", "summary.md", "accuracy_vs_latency.png",
                 "accuracy_vs_latency.pdf"):
        assert (out_dir / name).stat().st_size > 0
    summary = pd.read_csv(out_dir / "summary.csv")
    assert list(summary["run"]) == ["full", "static_clusters"]
    for run_id in summary["run_id"]:
        for name in ("accuracy.parquet", "steps.parquet", "io_sizes.csv", "run.yaml",
                     "summary.json"):
            assert (out_dir / "runs" / run_id / name).exists()
    assert not list(out_dir.rglob("*.tmp-*")), "temporary files left behind"
    assert main(["plot", str(out_dir)]) == 0


def test_sinks_filling_the_prompt_are_caught_before_running(tmp_path, capsys):
    # 160 sink tokens leave nothing to cluster in the fixture's 160-token prompt
    text = GOOD.replace("tokens_per_cluster: 16", "tokens_per_cluster: 16\n    sink_tokens: 160")
    text = text.replace("budget: 64", "budget: 0.99")
    config = _write(tmp_path, text)
    code = main(["run", str(config), "--output", str(tmp_path / "out"), "--quiet", "--no-plot"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "policies[1]" in err and "160 tokens" in err
    assert not (tmp_path / "out").exists()


def test_results_find_a_run_by_label_and_sweep_point(tmp_path):
    from sim.errors import KvsimError
    from sim.figures import Results

    text = GOOD + "sweep:\n  grid:\n    policy.budget: [64, 96]\n"
    config = _write(tmp_path, text)
    out_dir = tmp_path / "out"
    assert main(["run", str(config), "--output", str(out_dir), "--quiet", "--no-plot"]) == 0
    results = Results.load(out_dir)
    run_id = results.run_id("static_clusters", policy__budget=96)
    settings = results.settings(run_id)
    assert settings["policy"]["budget"] == 96 and settings["run"] == "static_clusters"
    with pytest.raises(KvsimError, match="2 runs match"):
        results.run_id("static_clusters")
