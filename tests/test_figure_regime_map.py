"""The regime map pairs target and baseline on the same trace and point; numbers by hand."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from sim.errors import KvsimError
from sim.figures import FIGURES, Results

X, Y = "trace.decode_from", "cache.capacity"


def _results(tmp_path, rows):
    summary = pd.DataFrame(rows)
    summary["run_id"] = [f"r{i}" for i in range(len(summary))]
    experiment = {"name": "regime", "sweep": {"grid": {X: [1024, 4096], Y: [0.02, 0.1]}}}
    return Results(tmp_path, summary, experiment)


def _row(run, trace, x, y, latency, recall):
    return {"run": run, "policy": run, "trace": trace, X: x, Y: y,
            "latency_ms_mean": latency, "retrieval_recall_mean": recall}


@pytest.fixture
def grid(tmp_path):
    """Two traces; dynakv's latency is 10 ms everywhere, the baselines' differ per cell."""
    rows = []
    for (x, y), trace in itertools.product(itertools.product((1024, 4096), (0.02, 0.1)),
                                           ("pydoc", "docs")):
        slower = 1.0 + (x == 4096) * 0.5 + (y == 0.02) * 0.25 + (trace == "docs") * 0.1
        rows.append(_row("dynakv", trace, x, y, 10.0, 0.8))
        rows.append(_row("static_clusters", trace, x, y, 10.0 * slower, 0.7))
        rows.append(_row("clusterkv", trace, x, y, 10.0, 0.85 if trace == "pydoc" else 0.75))
    return _results(tmp_path, rows)


def test_speedup_and_accuracy_difference_per_cell(grid):
    figure = FIGURES.create({"type": "regime_map", "x": "decode_from", "y": "capacity"})
    table = figure.table(grid).set_index(["baseline", "x", "y"])
    # static at (4096, 0.02): latency 17.5 ms (pydoc) and 18.5 ms (docs) against 10 ms
    cell = table.loc[("static_clusters", 4096, 0.02)]
    assert cell["speedup_mean"] == pytest.approx((1.75 + 1.85) / 2)
    assert cell["speedup_min"] == pytest.approx(1.75)
    assert cell["speedup_max"] == pytest.approx(1.85)
    assert cell["accuracy_diff_mean"] == pytest.approx(0.1)
    assert cell["n_traces"] == 2
    cell = table.loc[("static_clusters", 1024, 0.1)]
    assert cell["speedup_mean"] == pytest.approx((1.0 + 1.1) / 2)
    # clusterkv: equal latency, recall +0.05 on one trace and -0.05 on the other
    cell = table.loc[("clusterkv", 1024, 0.02)]
    assert cell["speedup_mean"] == pytest.approx(1.0)
    assert cell["accuracy_diff_min"] == pytest.approx(-0.05)
    assert cell["accuracy_diff_max"] == pytest.approx(0.05)
    assert len(table) == 2 * 4


def test_draws_figure_and_table(grid):
    figure = FIGURES.create({"type": "regime_map", "x": X, "y": Y, "y_percent": True})
    paths = figure.draw(grid)
    assert sorted(p.suffix for p in paths) == [".csv", ".md", ".pdf", ".png"]
    written = pd.read_csv(grid.out_dir / "regime_map.csv")
    assert len(written) == 8


def test_axes_given_by_their_last_part_are_labelled_as_their_sweep_axis(grid, monkeypatch):
    import sim.figures.regime_map as regime_map

    drawn = []
    monkeypatch.setattr(regime_map, "save_figure", lambda fig, stem: drawn.append(fig) or [])
    FIGURES.create({"type": "regime_map", "x": "decode_from", "y": "capacity",
                    "y_percent": True}).draw(grid)
    axes = drawn[0].axes
    assert "prompt length: decode starts at position" in {ax.get_xlabel() for ax in axes}
    assert any(ax.get_ylabel().endswith("cache ratio (% of the full KV cache)") for ax in axes)


def test_cells_pair_only_the_same_trace(tmp_path):
    rows = [_row("dynakv", "pydoc", 1024, 0.1, 10.0, 0.8),
            _row("static_clusters", "docs", 1024, 0.1, 20.0, 0.7)]
    figure = FIGURES.create({"type": "regime_map", "x": X, "y": Y,
                             "baselines": ["static_clusters"]})
    with pytest.raises(KvsimError, match="share no"):
        figure.table(_results(tmp_path, rows))


@pytest.mark.parametrize("spec, message", [
    ({"x": X}, "give the sweep axis y"),
    ({"x": X, "y": X}, "same axis"),
    ({"x": X, "y": Y, "baselines": []}, "baselines is empty"),
    ({"x": X, "y": Y, "target": "clusterkv"}, "also a baseline"),
    ({"x": X, "y": Y, "latency": "nonsense"}, "unknown metric"),
])
def test_bad_options_fail_when_built(spec, message):
    with pytest.raises(Exception, match=message):
        FIGURES.create({"type": "regime_map", **spec})
