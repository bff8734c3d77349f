"""Sweep expansion and planning: points, dotted keys, shared runs, one-line errors."""

from __future__ import annotations

import pytest
import yaml

from sim.cli import main
from sim.config import SweepSpec
from sim.errors import ConfigError
from sim.experiment.planning import plan
from sim.sweep import apply_point, expand

from .conftest import FIXTURE_TRACE

BASE = {
    "name": "sweep",
    "trace": {"path": str(FIXTURE_TRACE)},
    "model": "llama-3.2-1b",
    "cache": {"capacity": 0.25},
    "policies": [
        {"type": "full"},
        {"type": "token_topk", "budget": 0.1},
        {"type": "static_clusters", "budget": 0.1, "label": "static"},
    ],
}


def _write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**data, "output": str(tmp_path / "out")}))
    return path


def test_grid_is_a_product_in_written_order():
    points = expand(SweepSpec(grid={"a": [1, 2], "b": ["x", "y", "z"]}))
    assert len(points) == 6
    assert points[:3] == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}]
    assert points[-1] == {"a": 2, "b": "z"}


def test_zip_advances_together_and_multiplies_the_grid():
    points = expand(SweepSpec(grid={"g": [0, 1]}, zip={"a": [1, 2, 3], "b": [4, 5, 6]}))
    assert len(points) == 2 * 3
    assert points[0] == {"g": 0, "a": 1, "b": 4}
    assert points[2] == {"g": 0, "a": 3, "b": 6}
    assert expand(None) == [{}]


@pytest.mark.parametrize(
    "sweep, message",
    [
        (SweepSpec(), "empty sweep"),
        (SweepSpec(grid={"a": []}), "empty list"),
        (SweepSpec(zip={"a": [1, 2], "b": [1]}), "equal lengths"),
        (SweepSpec(grid={"a": [1]}, zip={"a": [2]}), "both a grid and a zip axis"),
        (SweepSpec(grid={"a..b": [1]}), "malformed key"),
    ],
)
def test_bad_sweeps_are_named(sweep, message):
    with pytest.raises(ConfigError, match=message):
        expand(sweep)


def test_policy_axis_sets_only_policies_that_have_the_parameter():
    data = apply_point(BASE, {"policy.budget": 0.2}, "x")
    budgets = [entry.get("budget") for entry in data["policies"]]
    assert budgets == [None, 0.2, 0.2]
    assert BASE["policies"][1]["budget"] == 0.1  # the base is not modified
    one = apply_point(BASE, {"policies.static.budget": 0.3}, "x")
    assert [entry.get("budget") for entry in one["policies"]] == [None, 0.1, 0.3]


def test_device_axis_turns_a_preset_into_overrides():
    data = apply_point(BASE, {"device.flash.queue_depth": 4}, "x")
    assert data["device"] == {"preset": "ufs40-flagship", "flash": {"queue_depth": 4}}
    assert apply_point(BASE, {"device": "ufs31-phone"}, "x")["device"] == "ufs31-phone"


def test_unchanged_runs_are_planned_once_and_hardware_sweeps_share_passes(tmp_path):
    data = {**BASE, "sweep": {"grid": {"policy.budget": [0.1, 0.2],
                                       "device.flash.read_bandwidth_mb_s": [2000, 4000]}}}
    planned = plan(_write(tmp_path, data))
    # full: 2 devices; token_topk and static: 2 budgets x 2 devices
    assert len(planned.unique_runs()) == 2 + 4 + 4
    # the budget axis does not apply to full: it is listed without it
    full_rows = [run for run in planned.runs if run.label == "full"]
    assert len(full_rows) == 2 and all("policy.budget" not in r.point for r in full_rows)
    # one policy pass per (policy spec): 1 + 2 + 2, each serving both devices
    groups = planned.groups(planned.unique_runs())
    assert len(groups) == 5
    assert all(len(g.runs) == 2 for g in groups)


def test_run_ids_hash_settings_not_names(tmp_path):
    first = plan(_write(tmp_path, BASE, "a.yaml"))
    renamed = {**BASE, "name": "other", "description": "same runs"}
    second = plan(_write(tmp_path, renamed, "b.yaml"))
    assert [r.run_id for r in first.runs] == [r.run_id for r in second.runs]
    changed = {**BASE, "seed": 1}
    third = plan(_write(tmp_path, changed, "c.yaml"))
    assert not {r.run_id for r in first.runs} & {r.run_id for r in third.runs}


@pytest.mark.parametrize(
    "sweep, fragment",
    [
        ({"grid": {"cache.capcity": [1]}}, "capcity"),
        ({"grid": {"device.flash.bogus": [1]}}, "bogus"),
        ({"grid": {"policy.tokens_per_clusterr": [8]}}, "tokens_per_clusterr"),
        ({"grid": {"policies.nobody.budget": [8]}}, "nobody"),
        ({"grid": {"policy.budget": [2.0]}}, "budget"),
        ({"grid": {}}, "empty sweep"),
        ({"grid": {"policy.budget": []}}, "empty list"),
        ({"grid": {"seed": [0, 0]}}, "listed twice"),
        ({"zip": {"seed": [0, 0], "kv_dtype": ["fp16", "fp16"]}}, "listed twice"),
        ({"grod": {"seed": [0]}}, "grod"),
        ({"grid": {"trace": [{"capture": {"text": "file:/nonexistent.txt"}}]}},
         "nonexistent.txt"),
        ({"grid": {"trace.capture.model": ["no-such-model"]}}, "no-such-model"),
    ],
)
def test_bad_sweeps_fail_before_any_run_with_one_line(tmp_path, capsys, sweep, fragment):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    path = _write(tmp_path, {**BASE, "sweep": sweep})
    code = main(["run", str(path), "--quiet", "--no-plot"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err and fragment in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written or removed


def test_a_policy_entry_can_carry_its_own_cache_and_pipeline(tmp_path):
    data = {**BASE, "policies": [
        {"type": "token_topk", "budget": 0.1},
        {"type": "dynakv", "budget": 0.1, "cache": {"replacement": "cluster_aligned"},
         "pipeline": {"stream_index": True}},
    ]}
    base_run, own = plan(_write(tmp_path, data)).runs
    assert base_run.cache == {"replacement": {"type": "lru"}, "capacity": 0.25}
    assert own.cache == {"replacement": {"type": "cluster_aligned"}, "capacity": 0.25}
    assert own.pipeline["stream_index"] and not base_run.pipeline["stream_index"]
    bad = {**data, "policies": [{"type": "dynakv", "cache": {"replacment": "lru"}}]}
    with pytest.raises(ConfigError, match=r"policies\[0\]\.cache.*replacment"):
        plan(_write(tmp_path, bad, "bad.yaml"))
