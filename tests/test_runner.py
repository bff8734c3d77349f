"""Running sweeps: resume after a crash or a kill, --force, policy-pass reuse, workers, Dask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from sim.errors import KvsimError
from sim.experiment.planning import plan
from sim.experiment.runner import execute

from .conftest import FIXTURE_TRACE

QUIET = {"progress": False, "log": lambda _message: None}

SWEEP = {
    "name": "runner",
    "trace": {"path": str(FIXTURE_TRACE)},
    "model": "llama-3.2-1b",
    "cache": {"capacity": 0.25},
    "policies": [
        {"type": "token_topk", "budget": 0.1},
        {"type": "static_clusters", "budget": 0.1, "tokens_per_cluster": 16},
    ],
    "sweep": {"grid": {"device.flash.read_bandwidth_mb_s": [1000, 2000, 4000]}},
}


@pytest.fixture(autouse=True)
def _no_pass_cache(monkeypatch):
    """Pass counts below are per experiment; the cross-experiment pass cache has its own test."""
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")


def _plan(tmp_path, data=SWEEP, out="out"):
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({**data, "output": str(tmp_path / out)}))
    return plan(path)


def _sorted(summary: pd.DataFrame) -> pd.DataFrame:
    return summary.sort_values("run_id").reset_index(drop=True)


def test_hardware_sweep_computes_each_policy_pass_once(tmp_path):
    summary, report = execute(_plan(tmp_path), jobs=1, **QUIET)
    assert len(summary) == 6 and report.completed == 6
    assert report.passes == 2  # one per policy, shared by the three bandwidths
    assert report.reuse_saved_s > 0
    # the pass is device-independent: accuracy is identical across the bandwidth axis
    for _label, rows in summary.groupby("run"):
        assert rows["attention_recall_mean"].nunique() == 1
        assert rows["latency_ms_mean"].is_monotonic_decreasing  # faster flash, lower latency


def test_a_run_in_a_sweep_equals_the_same_run_alone(tmp_path):
    swept, _ = execute(_plan(tmp_path), jobs=1, **QUIET)
    alone = {**SWEEP, "device": {"preset": "ufs40-flagship",
                                 "flash": {"read_bandwidth_mb_s": 2000}}}
    alone.pop("sweep")
    single_plan = _plan(tmp_path, alone, "alone")
    single, _ = execute(single_plan, jobs=1, **QUIET)
    for run in single_plan.runs:
        match = swept[swept["run_id"] == run.run_id]
        assert len(match) == 1  # same settings, same id
        a = pd.read_parquet(single_plan.run_dir(run) / "steps.parquet")
        b = pd.read_parquet(tmp_path / "out" / "runs" / run.run_id / "steps.parquet")
        pd.testing.assert_frame_equal(a, b)


def test_rerun_skips_complete_runs_and_force_reruns(tmp_path):
    planned = _plan(tmp_path)
    first, _ = execute(planned, jobs=1, **QUIET)
    again, report = execute(planned, jobs=1, **QUIET)
    assert report.completed == 0 and report.skipped == 6 and report.passes == 0
    pd.testing.assert_frame_equal(first, again)
    forced, report = execute(planned, jobs=1, force=True, **QUIET)
    assert report.completed == 6
    pd.testing.assert_frame_equal(first, forced)


def test_pass_cache_serves_another_experiment_with_identical_results(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIM_PASS_CACHE", str(tmp_path / "passes"))
    first, report = execute(_plan(tmp_path, out="first"), jobs=1, **QUIET)
    assert report.passes == 2 and report.cached_passes == 0
    assert len(list((tmp_path / "passes").glob("*.pkl"))) == 2
    second, report = execute(_plan(tmp_path, out="second"), jobs=1, **QUIET)
    assert report.passes == 0 and report.cached_passes == 2 and report.completed == 6
    pd.testing.assert_frame_equal(first, second)
    # a corrupt entry is recomputed, not trusted
    for entry in (tmp_path / "passes").glob("*.pkl"):
        entry.write_bytes(b"not a pickle")
    third, report = execute(_plan(tmp_path, out="third"), jobs=1, **QUIET)
    assert report.passes == 2
    pd.testing.assert_frame_equal(first, third)


def test_reused_runs_from_other_code_are_flagged(tmp_path):
    planned = _plan(tmp_path)
    execute(planned, jobs=1, **QUIET)
    run = planned.runs[0]
    settings_path = planned.run_dir(run) / "run.yaml"
    settings = yaml.safe_load(settings_path.read_text())
    settings["code"] = "0" * 12  # as if made by an older kvsim
    settings_path.write_text(yaml.safe_dump(settings))
    lines = []
    _summary, report = execute(planned, jobs=1, progress=False, log=lines.append)
    assert report.completed == 0
    assert any("1 of the 6 complete runs were made by different kvsim code" in line
               for line in lines)


def test_crash_mid_sweep_keeps_completed_runs_and_resumes(tmp_path, monkeypatch):
    planned = _plan(tmp_path)
    import sim.replay as engine  # the worker imports the replay lazily: patch it there

    calls = {"n": 0}
    original = engine.simulate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "simulate", flaky)
    with pytest.raises(KvsimError, match="simulated crash"):
        execute(planned, jobs=1, **QUIET)
    done = [run for run in planned.runs if planned.is_complete(run)]
    # token_topk's group (3 runs) finished, static's first run too; its second crashed
    assert len(done) == 4
    partial = pd.read_csv(planned.output_dir / "summary.csv")
    assert len(partial) == 4
    monkeypatch.setattr(engine, "simulate", original)
    summary, report = execute(planned, jobs=1, **QUIET)
    assert report.skipped == 4 and report.completed == 2
    assert len(summary) == 6 and summary["run_id"].is_unique
    assert not list(planned.runs_dir.glob(".*"))  # no temporaries left


def test_parallel_workers_give_identical_results(tmp_path):
    one, _ = execute(_plan(tmp_path, out="one"), jobs=1, **QUIET)
    two, report = execute(_plan(tmp_path, out="two"), jobs=2, **QUIET)
    assert report.workers == 2
    pd.testing.assert_frame_equal(_sorted(one), _sorted(two))


def test_killed_sweep_resumes_with_nothing_lost_or_duplicated(tmp_path):
    data = {**SWEEP, "sweep": {"grid": {"device.flash.read_bandwidth_mb_s": [1000, 2000, 4000],
                                        "policy.budget": [0.05, 0.1, 0.2]}}}
    planned = _plan(tmp_path, data)
    config = tmp_path / "out.yaml"
    process = subprocess.Popen(
        [sys.executable, "-m", "sim", "run", str(config), "--quiet", "--no-plot", "-j", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if any(planned.is_complete(run) for run in planned.runs):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the sweep finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up: a crash or power loss
    process.wait()
    done_before = {run.run_id for run in planned.runs if planned.is_complete(run)}
    assert 0 < len(done_before) < len(planned.unique_runs())
    summary, report = execute(planned, jobs=2, **QUIET)
    assert report.skipped == len(done_before)
    assert report.completed == len(planned.unique_runs()) - len(done_before)
    assert summary["run_id"].is_unique and len(summary) == len(planned.runs)
    assert not list(planned.runs_dir.glob(".*"))


def test_ctrl_c_stops_cleanly_with_one_line(tmp_path):
    data = {**SWEEP, "sweep": {"grid": {"device.flash.read_bandwidth_mb_s": [1000, 2000, 4000],
                                        "policy.budget": [0.05, 0.1, 0.2]}}}
    planned = _plan(tmp_path, data)
    process = subprocess.Popen(
        [sys.executable, "-m", "sim", "run", str(tmp_path / "out.yaml"), "--quiet",
         "--no-plot", "-j", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(planned.is_complete(r) for r in planned.runs):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    assert not list(planned.runs_dir.glob(".*"))


def test_dask_local_cluster_runs_the_sweep(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        summary, report = execute(
            _plan(tmp_path, out="dask"), scheduler=cluster.scheduler_address, **QUIET
        )
    assert report.backend == "dask" and report.workers == 2 and report.completed == 6
    local, _ = execute(_plan(tmp_path, out="local"), jobs=1, **QUIET)
    pd.testing.assert_frame_equal(_sorted(summary), _sorted(local))


def test_unreachable_scheduler_is_one_error(tmp_path):
    pytest.importorskip("dask.distributed")
    with pytest.raises(KvsimError, match="Dask scheduler"):
        execute(_plan(tmp_path), scheduler="tcp://127.0.0.1:1", **QUIET)


def test_a_worker_loads_no_plotting_library():
    # what a worker imports to run a pass group: its entry module and, lazily, the engine and
    # the summary metrics; figures (and matplotlib) belong to the coordinating process only
    code = (
        "import sys\n"
        "import sim.experiment.pass_group, sim.policy_pass, sim.replay, sim.metrics.records\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'"
        " or m.startswith('sim.figures')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
