"""The replay's records, to the last bit, against those frozen before its speed-up
(:mod:`tests.replay_golden`: 72 scenarios, simulated KV heads sharing trace heads, every
layout kind, five replacement policies, the pipeline switches, swapping, the three read
timings)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.outputs import STEP_COLUMNS

from . import replay_golden

SCENARIOS = replay_golden.scenarios()


def test_golden_file_holds_every_scenario() -> None:
    golden = np.load(replay_golden.GOLDEN)
    assert sorted(golden.files) == sorted(
        f"{name}/{key}" for name in SCENARIOS
        for key in ("steps", "io_sizes", "run_lengths", "totals")
    )


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_replay_matches_the_frozen_records(name: str) -> None:
    golden = np.load(replay_golden.GOLDEN)
    got = replay_golden.records(*SCENARIOS[name])
    assert got["steps"].shape == (replay_golden.STEPS, 1 + len(STEP_COLUMNS))
    for key, value in got.items():
        np.testing.assert_array_equal(value, golden[f"{name}/{key}"], err_msg=f"{name}/{key}")
