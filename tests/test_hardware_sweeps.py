"""Every hardware sweep researchers need works out of the box, and moves latency the right way.

Each case sweeps one key over two values on the committed trace (one policy pass, replayed per
point) and checks the direction the device model must move: more of a resource never makes a
token slower, a larger KV dtype never reads fewer bytes.
"""

from __future__ import annotations

import pytest
import yaml

from sim.experiment.planning import plan
from sim.experiment.runner import execute

from .conftest import FIXTURE_TRACE

BASE = {
    "name": "hw",
    "trace": {"path": str(FIXTURE_TRACE)},
    "model": "llama-3.2-1b",
    "cache": {"capacity": 0.1},
    "policies": [{"type": "token_topk", "budget": 0.2}],
}

# key, (low, high) values, metric, direction of the metric from low to high ("down", "up")
CASES = [
    ("device.flash.read_bandwidth_mb_s", (1000, 4000), "latency_ms_mean", "down"),
    ("device.flash.read_command_latency_us", (20, 200), "latency_ms_mean", "up"),
    ("device.flash.queue_depth", (1, 32), "latency_ms_mean", "down"),
    ("device.flash.page_size_bytes", (4096, 16384), "read_mb_per_token", "up"),
    ("device.flash.max_io_bytes", (4096, 524288), "read_commands_per_token", "down"),
    ("cache.capacity", (0.02, 0.2), "hit_rate", "up"),
    ("kv_dtype", ("fp8", "fp16"), "read_mb_per_token", "up"),
    ("device", ("ufs31-phone", "ufs40-flagship"), "latency_ms_mean", "down"),
    # a command waiting at its drawn unit while others idle is never the faster on the whole
    ("device.flash.unit_choice", ("earliest_free", "random"), "latency_ms_mean", "up"),
]


@pytest.mark.parametrize("key, values, metric, direction", CASES, ids=[c[0] for c in CASES])
def test_hardware_axis(tmp_path, key, values, metric, direction):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output": str(tmp_path / "out"),
                                    "sweep": {"grid": {key: list(values)}}}))
    summary, report = execute(plan(path), jobs=1, progress=False, log=lambda _m: None)
    assert len(summary) == 2 and report.passes + report.cached_passes == 1
    low, high = summary[metric].tolist()
    assert (high > low) if direction == "up" else (high < low), (key, low, high)
    assert summary["attention_recall_mean"].nunique() == 1  # the policy pass is shared


def test_random_units_with_one_unit_replay_as_earliest_free(tmp_path):
    """With one unit there is nothing to choose: the same latency to the last bit, under a
    run id of its own; an earliest_free run's id does not depend on the unit keys (runs made
    before the choice existed keep their ids) but a random one's does."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        **BASE, "output": str(tmp_path / "out"),
        "device": {"preset": "ufs40-flagship", "flash": {"parallel_units": 1}},
        "sweep": {"grid": {"device.flash.unit_choice": ["earliest_free", "random"]}},
    }))
    experiment = plan(path)
    runs = experiment.runs
    assert "unit_choice" not in runs[0].device["flash"]  # what run_id hashes (identity())
    assert "unit_seed" not in runs[0].device["flash"]
    assert runs[1].device["flash"]["unit_choice"] == "random"
    assert runs[1].device["flash"]["unit_seed"] == 0
    assert runs[0].run_id != runs[1].run_id
    summary, _ = execute(experiment, jobs=1, progress=False, log=lambda _m: None)
    assert summary["latency_ms_mean"].tolist()[0] == summary["latency_ms_mean"].tolist()[1]
