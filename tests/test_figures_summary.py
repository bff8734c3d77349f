"""Summary figures and tables (Figs. 10, 11, 14, 15, 17; Tables 5, 6) on real tiny sweeps.

Two 4-layer traces cut from the committed SmolLM2 fixture (different layers, so their numbers
differ) are replayed on a 2-layer simulated model, so a whole sweep takes a second or two.
Every number a table shows is recomputed here from summary.csv or the run records.
"""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.errors import ConfigError, KvsimError
from sim.experiment.planning import plan
from sim.experiment.runner import execute
from sim.figures import FIGURES, Results, draw_figures
from sim.figures.plots import plot_results
from sim.trace.format import open_trace
from sim.trace.writer import TraceWriter

from .conftest import FIXTURE_TRACE

QUIET = {"progress": False, "log": lambda _message: None}
LAYERS = {"early": (6, 12, 18, 24), "late": (9, 15, 21, 29)}
CLUSTER = {"tokens_per_cluster": 16}


def _cut_trace(source, layers, path):
    """A trace holding ``layers`` of ``source`` (real keys, values and queries)."""
    manifest = source.manifest
    model = {**manifest["model"], "n_layers": len(layers)}
    with TraceWriter(path, model, source.prompt_len, source.decode_steps, source.query_start,
                     manifest["text"], dict(manifest["capture"])) as writer:
        writer.write_tokens(np.load(source.path / "tokens.npy"))
        for i, layer in enumerate(layers):
            writer.write_layer(i, source.keys(layer), source.values(layer),
                               source.queries(layer))
    return str(path)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Results directories of four tiny experiments, each over both traces."""
    root = tmp_path_factory.mktemp("figures_summary")
    source = open_trace(FIXTURE_TRACE)
    traces = [_cut_trace(source, layers, root / f"fixture_{name}")
              for name, layers in LAYERS.items()]
    model = yaml.safe_load((FIXTURE_TRACE.parents[2] / "configs" / "models"
                            / "llama-3.2-1b.yaml").read_text())
    (root / "tiny.yaml").write_text(yaml.safe_dump({**model, "name": "tiny", "n_layers": 2}))
    base = {"trace": {"path": traces[0]}, "model": str(root / "tiny.yaml"),
            "cache": {"capacity": 0.25}, "plot": False}
    axis = {"trace.path": traces}
    experiments = {
        "overview": {
            "policies": [{"type": "full"}, {"type": "token_topk", "budget": 0.25},
                         {"type": "static_clusters", "budget": 0.25, **CLUSTER},
                         {"type": "clusterkv", "budget": 0.25, **CLUSTER},
                         {"type": "dynakv", "budget": 0.25, **CLUSTER}],
            "sweep": {"grid": {**axis, "device": ["ufs31-phone", "ufs40-flagship"]}},
            "figures": [{"type": "fig10_overview",
                         "points": {"default": {"device": "ufs40-flagship"}}},
                        "fig17_devices",
                        {"type": "table5_variance",
                         "runs": ["static_clusters", "clusterkv", "dynakv"]},
                        "table6_decode_length"],
        },
        "budget": {
            "policies": [{"type": "full"}, {"type": "token_topk", "budget": 0.2},
                         {"type": "dynakv", "budget": 0.2, **CLUSTER}],
            "sweep": {"grid": {**axis, "policy.budget": [0.2, 0.3]}},
            "figures": [{"type": "fig15_budget",
                         "metrics": ["latency_ms_mean", "attention_recall_mean"]}],
        },
        "cache": {
            "policies": [{"type": "dynakv", "budget": 0.25, **CLUSTER}],
            "sweep": {"grid": {**axis, "cache.capacity": [0.1, 0.3],
                               "cache.replacement": ["lru", "belady"]}},
            "figures": ["fig14_cache"],
        },
        "split": {
            "policies": [{"type": "dynakv", "budget": 0.25, "tau_quantile": 0.5, **CLUSTER}],
            "sweep": {"grid": {**axis, "policies.dynakv.buffer_max": [1, 16]}},
            "figures": ["fig11_split_buffer"],
        },
    }
    out = {}
    for name, data in experiments.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, **base, **data,
                                        "output": str(root / name)}))
        execute(plan(path), jobs=1, **QUIET)
        out[name] = Results.load(root / name)
    return out


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# -- every figure draws ---------------------------------------------------------------------


def test_kvsim_plot_draws_every_listed_figure(sweeps):
    for name, results in sweeps.items():
        written = plot_results(results.dir)
        for figure in results.experiment["figures"]:
            figure = FIGURES.create(figure)
            stem = getattr(figure, "stem", "") or figure.name
            suffixes = {"csv", "md"} if figure.name.startswith("table") else {
                "pdf", "png", "csv", "md"}
            for suffix in suffixes:
                path = results.out_dir / f"{stem}.{suffix}"
                assert path in written and path.stat().st_size > 0, (name, path)


def test_generic_lines_figure_on_any_axis(sweeps):
    results = sweeps["overview"]
    written = draw_figures(results, [{"type": "lines", "x": "device",
                                      "metrics": ["latency_ms_mean", "misses_per_token"]}])
    assert {p.suffix for p in written} == {".pdf", ".png", ".csv", ".md"}
    assert all(p.stat().st_size > 0 for p in written)
    table = pd.read_csv(results.out_dir / "lines_device.csv")
    assert set(table["line"]) == set(results.summary["run"])
    assert (table["n_traces"] == 2).all()


def test_lines_panels_give_each_value_of_an_axis_its_own_panel(sweeps):
    results = sweeps["cache"]
    figure = FIGURES.create({"type": "lines", "x": "cache.capacity", "panels": "replacement",
                             "metrics": ["latency_ms_mean", "hit_rate"], "stem": "panels"})
    written = figure.draw(results)
    assert {p.name for p in written} == {f"panels.{s}" for s in ("pdf", "png", "csv", "md")}
    table = pd.read_csv(results.out_dir / "panels.csv")
    # the panel axis leaves the line labels: one line (the run), a panel per replacement
    assert set(table["line"]) == {"dynakv"} and set(table["panel"]) == {"lru", "belady"}
    assert len(table) == 2 * 2 * 2  # panels x capacities x metrics
    summary = results.summary
    for (replacement, capacity), rows in summary.groupby(["cache.replacement",
                                                          "cache.capacity"]):
        for metric in ("latency_ms_mean", "hit_rate"):
            got = table[(table["panel"] == replacement) & np.isclose(table["x"], capacity)
                        & (table["metric"] == metric)]
            assert len(got) == 1
            assert got["mean"].iloc[0] == pytest.approx(rows[metric].mean())
            assert got["min"].iloc[0] == pytest.approx(rows[metric].min())
            assert got["n_traces"].iloc[0] == 2


def test_lines_panels_on_a_trace_axis_and_runs_it_does_not_apply_to(sweeps):
    results = sweeps["budget"]
    # panels per budget: full has no budget, so it is drawn in both panels
    table, _, _ = FIGURES.create({"type": "lines", "x": "trace.path",
                                  "panels": "policy.budget"}).table(results)
    assert set(table["panel"]) == {0.2, 0.3}
    summary = results.summary
    full = summary[summary["run"] == "full"].set_index("trace.path")["latency_ms_mean"]
    for budget in (0.2, 0.3):
        rows = table[(table["line"] == "full") & (table["panel"] == budget)]
        assert dict(zip(rows["x"], rows["mean"], strict=True)) == pytest.approx(full.to_dict())
        dynakv = summary[(summary["run"] == "dynakv") & (summary["policy.budget"] == budget)]
        got = table[(table["line"] == "dynakv") & (table["panel"] == budget)]
        assert dict(zip(got["x"], got["mean"], strict=True)) == pytest.approx(
            dynakv.set_index("trace.path")["latency_ms_mean"].to_dict())
    # a trace axis as panels: each panel holds one trace
    table, _, _ = FIGURES.create({"type": "lines", "x": "policy.budget",
                                  "panels": "trace.path"}).table(results)
    assert set(table["panel"]) == set(summary["trace.path"])
    assert (table["n_traces"] == 1).all()


def test_lines_panels_leave_axes_zipped_with_the_panel_axis_out_of_the_lines(tmp_path):
    """Precision as two zipped axes (KV dtype, weight bits), decode length on x: a panel per
    dtype, one line per policy (not per policy and weight bits); numbers by hand."""
    x, dtype, bits = "trace.capture.decode_steps", "kv_dtype", "device.compute.weight_bits"
    rows = []
    for steps, (kv, wb), trace, run in itertools.product(
            (1024, 7680), (("fp8", 8), ("fp16", 16)), ("pydoc", "docs"), ("static", "dynakv")):
        latency = steps / 1024 + wb + (run == "dynakv") * 0.5 + (trace == "docs") * 0.25
        rows.append({"run": run, "trace": f"{trace}/{steps}", x: steps, dtype: kv, bits: wb,
                     "latency_ms_mean": latency})
    summary = pd.DataFrame(rows).assign(run_id=[f"r{i}" for i in range(len(rows))])
    results = Results(tmp_path, summary, {"name": "precision", "sweep": {
        "grid": {x: [1024, 7680]}, "zip": {dtype: ["fp8", "fp16"], bits: [8, 16]}}})
    figure = FIGURES.create({"type": "lines", "x": "decode_steps", "panels": "kv_dtype"})
    table, _, keys = figure.table(results)
    assert keys == ["run"]
    assert set(table["line"]) == {"static", "dynakv"}
    got = table.set_index(["line", "panel", "x"])
    # dynakv, fp16 at 7680 steps: 7.5 + 16 + 0.5, plus 0.25 on docs: mean of the two traces
    assert got.loc[("dynakv", "fp16", 7680), "mean"] == pytest.approx(24.0 + 0.125)
    assert got.loc[("dynakv", "fp16", 7680), "min"] == pytest.approx(24.0)
    assert got.loc[("static", "fp8", 1024), "max"] == pytest.approx(9.25)
    assert (got["n_traces"] == 2).all()
    written = figure.draw(results)
    assert {p.name for p in written} == {f"lines_decode_steps.{s}"
                                         for s in ("pdf", "png", "csv", "md")}
    # without panels, the zipped axes split the lines (and precisions are not averaged)
    table, _, keys = FIGURES.create({"type": "lines", "x": "decode_steps"}).table(results)
    assert keys == ["run", dtype, bits]
    assert len(set(table["line"])) == 4


def test_lines_panels_errors(sweeps):
    with pytest.raises(ConfigError) as excinfo:
        FIGURES.create({"type": "lines", "x": "device", "panels": "device"})
    assert "panels and x are the same axis" in _one_line(excinfo)
    with pytest.raises(KvsimError) as excinfo:
        FIGURES.create({"type": "lines", "x": "cache.capacity", "panels": "buffer_max"}).draw(
            sweeps["cache"])
    assert "no sweep axis 'buffer_max'" in _one_line(excinfo)


# -- the numbers ----------------------------------------------------------------------------


def test_fig10_normalises_by_token_topk_on_the_same_trace(sweeps):
    results = sweeps["overview"]
    figure = FIGURES.create({"type": "fig10_overview",
                             "points": {"default": {"device": "ufs40-flagship"}}})
    table = figure.table(results).set_index(["run", "trace"])
    summary = results.summary[results.summary["device"] == "ufs40-flagship"]
    recall = ("retrieval_recall_mean" if "retrieval_recall_mean" in summary
              else "attention_recall_mean")
    assert recall in table
    topk = summary[summary["run"] == "token_topk"].set_index("trace")[recall]
    assert topk.nunique() == 2  # the two traces differ
    for row in summary.to_dict("records"):
        got = table.loc[(row["run"], row["trace"])]
        assert got["normalised_accuracy"] == pytest.approx(row[recall] / topk[row["trace"]])
        assert got["latency_ms_mean"] == pytest.approx(row["latency_ms_mean"])
    for run, rows in summary.groupby("run"):
        average = table.loc[(run, "average")]
        assert average["latency_ms_mean"] == pytest.approx(rows["latency_ms_mean"].mean())
        assert average["normalised_accuracy"] == pytest.approx(
            (rows.set_index("trace")[recall] / topk).mean())
    assert table.loc[("token_topk", "average"), "normalised_accuracy"] == pytest.approx(1.0)


def test_fig17_speedup_is_baseline_latency_over_latency(sweeps):
    results = sweeps["overview"]
    table, _ = FIGURES.create("fig17_devices").table(results)
    summary = results.summary
    topk = summary[summary["run"] == "token_topk"].set_index(["device", "trace"])
    for (run, device), rows in summary.groupby(["run", "device"]):
        speedups = [topk.loc[(device, r.trace), "latency_ms_mean"] / r.latency_ms_mean
                    for r in rows.itertuples()]
        got = table[(table["run"] == run) & (table["device"] == device)].iloc[0]
        assert got["speedup_vs_token_topk"] == pytest.approx(np.mean(speedups))
        assert got["speedup_min"] == pytest.approx(min(speedups))
        assert got["latency_max"] == pytest.approx(rows["latency_ms_mean"].max())
        parts = got[["dense_ms", "scoring_ms", "io_wait_ms", "attention_ms"]].sum()
        assert parts == pytest.approx(got["latency_ms_mean"], rel=1e-6)


def test_fig15_lines_hold_mean_and_range_over_traces(sweeps):
    results = sweeps["budget"]
    table, x, _ = FIGURES.create("fig15_budget").table(results)
    assert x == "policy.budget"
    summary = results.summary
    for (run, budget), rows in summary.dropna(subset=["policy.budget"]).groupby(
            ["run", "policy.budget"]):
        got = table[(table["line"] == run) & (table["x"] == budget)].iloc[0]
        assert got["mean"] == pytest.approx(rows["latency_ms_mean"].mean())
        assert got["min"] == pytest.approx(rows["latency_ms_mean"].min())
        assert got["max"] == pytest.approx(rows["latency_ms_mean"].max())
        assert got["n_traces"] == 2
    full = table[table["line"] == "full"]
    assert full["x"].isna().all()  # drawn as a reference: the budget does not apply


def test_fig14_misses_come_from_the_step_records(sweeps):
    results = sweeps["cache"]
    table, _, keys = FIGURES.create("fig14_cache").table(results)
    assert keys == ["cache.replacement"]
    assert set(table["line"]) == {"lru", "belady"}
    misses = table[table["metric"] == "misses_per_token"]
    groups = results.summary.groupby(["cache.replacement", "cache.capacity"])
    assert len(groups) == 4
    for (replacement, capacity), rows in groups:
        values = [results.records(r, "steps")["misses"].mean() for r in rows["run_id"]]
        got = misses[(misses["line"] == replacement)
                     & np.isclose(misses["x"].astype(float), capacity)]
        assert len(got) == 1
        assert got["mean"].iloc[0] == pytest.approx(np.mean(values))
        assert got["max"].iloc[0] == pytest.approx(max(values))


def test_fig11_forced_loads_and_volume_per_buffer_size(sweeps):
    results = sweeps["split"]
    table, x, _ = FIGURES.create("fig11_split_buffer").table(results)
    assert x == "policies.dynakv.buffer_max"
    for buffer_max, rows in results.summary.groupby(x):
        forced = [results.records(r, "steps")["extra_entries"].mean() for r in rows["run_id"]]
        got = table[(table["x"] == buffer_max)].set_index("metric")
        assert got.loc["forced_load_entries_per_token", "mean"] == pytest.approx(
            np.mean(forced))
        assert got.loc["read_mb_per_token", "mean"] == pytest.approx(
            rows["read_mb_per_token"].mean())


def test_table5_variance_from_cluster_records(sweeps):
    results = sweeps["overview"]
    table = FIGURES.create({"type": "table5_variance", "window": 0.25}).table(results)
    per_trace = table[table["trace"] != "average"]
    # one row per policy pass: the device axis does not change clustering
    assert len(per_trace) == 3 * 2
    assert set(per_trace["run"]) == {"static_clusters", "clusterkv", "dynakv"}
    summary = results.summary
    for row in per_trace.itertuples():
        match = summary[(summary["run"] == row.run) & (summary["trace"] == row.trace)]
        assert row.variance_mean == pytest.approx(match["intra_cluster_variance_mean"].iloc[0])
        clusters = results.records(match["run_id"].iloc[0], "clusters")
        early = clusters[clusters["step"] < 6]["intra_cluster_variance"].mean()  # 24 steps / 4
        late = clusters[clusters["step"] >= 18]["intra_cluster_variance"].mean()
        assert row.variance_early == pytest.approx(early)
        assert row.variance_late == pytest.approx(late)
    average = table[table["trace"] == "average"].set_index("run")
    assert average.loc["dynakv", "variance_mean"] == pytest.approx(
        per_trace[per_trace["run"] == "dynakv"]["variance_mean"].mean())


def test_table6_buckets_average_back_to_the_mean_latency(sweeps):
    results = sweeps["overview"]
    table = FIGURES.create("table6_decode_length").table(results)
    buckets = ["steps 0-5 (ms)", "steps 6-11 (ms)", "steps 12-17 (ms)", "steps 18-23 (ms)"]
    assert all(b in table for b in buckets)
    per_trace = table[table["trace"] != "average"]
    assert len(per_trace) == len(results.summary)
    for row in results.summary.itertuples():
        got = per_trace[(per_trace["run"] == row.run) & (per_trace["device"] == row.device)
                        & (per_trace["trace"] == row.trace)].iloc[0]
        steps = results.records(row.run_id, "steps")
        assert got[buckets[1]] == pytest.approx(steps["latency_us"][6:12].mean() / 1e3)
        # equal buckets: their mean is the run's mean latency
        assert got[buckets].mean() == pytest.approx(row.latency_ms_mean)


# -- missing inputs: one line each --------------------------------------------------------------


def _without(results, run):
    return Results(results.dir, results.summary[results.summary["run"] != run],
                   results.experiment)


@pytest.mark.parametrize("spec, where, fragment", [
    ({"type": "fig10_overview", "points": {"default": {"device": "ufs40-flagship"}}},
     "no_topk", "no token_topk run"),
    ("fig17_devices", "no_topk", "no token_topk run"),
    ("fig10_overview", "overview", "several results"),
    ("fig15_budget", "overview", "no sweep axis 'policy.budget'"),
    ("fig14_cache", "budget", "no sweep axis 'cache.capacity'"),
    ("fig11_split_buffer", "cache", "no sweep axis 'buffer_max'"),
    ("fig17_devices", "budget", "several results"),
    ({"type": "fig17_devices", "axis": "read_bandwidth_mb_s"}, "overview",
     "no sweep axis 'read_bandwidth_mb_s'"),
    ({"type": "table5_variance"}, "no_clusters", "no run has clusters.parquet"),
    ({"type": "table6_decode_length", "runs": ["nope"]}, "overview", "no run labelled nope"),
    ({"type": "fig10_overview", "points": {"default": {"device": "pixel"}}}, "overview",
     "has no result at"),
])
def test_missing_inputs_are_one_line_errors(sweeps, spec, where, fragment):
    if where == "no_topk":
        results = _without(sweeps["overview"], "token_topk")
    elif where == "no_clusters":
        results = sweeps["budget"]
        results = Results(results.dir, results.summary[results.summary["run"] != "dynakv"],
                          results.experiment)
    else:
        results = sweeps[where]
    with pytest.raises(KvsimError) as excinfo:
        FIGURES.create(spec).draw(results)
    assert fragment in _one_line(excinfo)


def test_normalisation_needs_the_same_budget(sweeps, tmp_path):
    results = sweeps["budget"]
    figure = FIGURES.create({"type": "fig10_overview", "points": {
        "default": {"policy.budget": 0.2}, "dynakv": {"policy.budget": 0.3}}})
    with pytest.raises(KvsimError) as excinfo:
        figure.table(results)
    assert "same budget" in _one_line(excinfo)


def test_bad_figure_options_fail_when_planned(sweeps, tmp_path):
    source = sweeps["split"].dir.parent / "split.yaml"
    data = yaml.safe_load(source.read_text())
    for figures, fragment in (([{"type": "lines"}], "give the sweep axis"),
                              ([{"type": "lines", "x": "device", "metrics": ["speed"]}],
                               "unknown metric 'speed'"),
                              ([{"type": "table6_decode_length", "buckets": 0}], "buckets")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**data, "figures": figures}))
        with pytest.raises(ConfigError) as excinfo:
            plan(path)
        assert fragment in _one_line(excinfo)


def test_results_without_summary_are_one_line(tmp_path):
    with pytest.raises(KvsimError) as excinfo:
        Results.load(tmp_path)
    assert "summary.csv" in _one_line(excinfo)


def test_a_copied_results_dir_redraws(sweeps, tmp_path):
    """Figures read only result files: a copy elsewhere redraws without the traces."""
    copy = tmp_path / "copy"
    shutil.copytree(sweeps["cache"].dir, copy)
    written = plot_results(copy)
    assert any(p.name == "fig14_cache.pdf" for p in written)


def test_where_and_points_treat_an_axis_a_run_lacks_as_any_value(sweeps):
    results = sweeps["budget"]
    figure = FIGURES.create({"type": "fig15_budget", "where": {"run": ["full", "dynakv"]}})
    table, _, _ = figure.table(results)
    assert set(table["line"]) == {"full", "dynakv"}
    # full has no budget: its one result stands for every budget a point pins
    overview = FIGURES.create({"type": "fig10_overview", "baseline": "token_topk",
                               "points": {"default": {"policy.budget": 0.3}}}).table(results)
    assert set(overview["run"]) == {"full", "token_topk", "dynakv"}


def test_line_labels_name_switches_only_when_on():
    from sim.figures.common import key_label

    columns = ["cache.replacement", "pipeline.swap_layers"]
    assert key_label(["lru", False], columns) == "lru"
    assert key_label(["lru", True], columns) == "lru + swap_layers"
    assert key_label(["dynakv", 0.1], ["run", "policy.budget"]) == "dynakv, budget=0.1"
