"""Figures drawn from per-run records: Fig. 3b (flash bandwidth), Fig. 4 (cluster PCA), Fig. 7
(co-retrieval), Fig. 12 (contiguous access lengths), Table 2 (update -> retrieval).

Real runs, small: the committed sample trace plus a 4-layer trace derived from it that also
stores prompt queries (the sample stores decode queries only, and the co-retrieval matrix of
Fig. 7 is measured on prompt queries; the derived prompt queries are the sample's decode
queries, cycled). Both traces feed one sweep, so the one-trace figures must pick one and the
others must show both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.errors import KvsimError
from sim.experiment.planning import plan
from sim.experiment.runner import execute
from sim.figures import FIGURES, Results, draw_figures
from sim.hardware import load_device
from sim.trace.format import open_trace
from sim.trace.writer import TraceWriter

from .conftest import FIXTURE_TRACE

QUIET = {"progress": False, "log": lambda _message: None}
DERIVED_LAYERS = (0, 10, 20, 29)  # layers of the sample kept in the derived trace
KNOBS = {"budget": 0.3, "tokens_per_cluster": 8, "sink_tokens": 4}
LAYOUTS = ("sequence", "cluster", "intra_inter", "dual_head")
HORIZON = 8


def _derived_trace(path):
    src = open_trace(FIXTURE_TRACE)
    model = {**src.manifest["model"], "n_layers": len(DERIVED_LAYERS)}
    with TraceWriter(path, model, src.prompt_len, src.decode_steps, 0, src.manifest["text"],
                     {"derived": "prompt queries = the sample's decode queries, cycled"}) as w:
        w.write_tokens(src.tokens())
        for out, layer in enumerate(DERIVED_LAYERS):
            decode = np.asarray(src.decode_queries(layer))
            cycled = decode[:, np.arange(src.prompt_len) % decode.shape[1]]
            w.write_layer(out, np.asarray(src.keys(layer)), np.asarray(src.values(layer)),
                          np.concatenate([cycled, decode], axis=1))
    return path


def _run(tmp, data):
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump({**data, "output": str(tmp / data["name"])}))
    planned = plan(path)
    execute(planned, jobs=1, **QUIET)
    return Results.load(planned.output_dir)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """static update, local update and DynaKV with each layout, on two traces, with every
    cluster record."""
    tmp = tmp_path_factory.mktemp("records")
    derived = _derived_trace(tmp / "derived_allq")
    policies = [
        {"type": "static_clusters", **KNOBS, "recent_tokens": 8},
        {"type": "clusterkv", **KNOBS, "update_interval": 8},
        *({"type": "dynakv", **KNOBS, "recent_tokens": 8, "label": f"dynakv-{layout}",
           "layout": layout} for layout in LAYOUTS),
    ]
    return _run(tmp, {
        "name": "records",
        "trace": {"path": str(FIXTURE_TRACE)},
        "cache": {"capacity": 0.25},
        "policies": policies,
        "record": {"cluster_layer": 3, "cluster_steps": [-1, 11, 23],
                   "update_horizon": HORIZON},
        "sweep": {"grid": {"trace.path": [str(FIXTURE_TRACE), str(derived)]}},
        "plot": False,
    })


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """Full attention only (no flash reads, no records) on two presets x two queue depths."""
    return _run(tmp_path_factory.mktemp("devices"), {
        "name": "devices",
        "trace": {"path": str(FIXTURE_TRACE)},
        "model": "llama-3.2-1b",
        "policies": [{"type": "full"}],
        "sweep": {"grid": {"device": ["ufs31-phone", "ufs40-flagship"],
                           "device.flash.queue_depth": [32, 8]}},
        "plot": False,
    })


def _draw(results, spec):
    paths = draw_figures(results, [spec])
    for ext in ("pdf", "png"):
        files = [p for p in paths if p.suffix == f".{ext}"]
        if files:
            assert files[0].stat().st_size > 1000, files[0]
    return paths


# -- Fig. 3b --------------------------------------------------------------------------------


def test_fig3b_curve_follows_the_preset_numbers(devices):
    paths = _draw(devices, "fig3b_read_bandwidth")
    assert {p.suffix for p in paths} == {".pdf", ".png", ".csv", ".md"}
    table = pd.read_csv(devices.out_dir / "fig3b_read_bandwidth.csv")
    # the presets (queue depth 32) under their own names, the overrides labelled as such
    assert set(table["device"]) == {"ufs31-phone", "ufs40-flagship",
                                    "ufs31-phone (queue_depth=8)",
                                    "ufs40-flagship (queue_depth=8)"}
    for name in ("ufs31-phone", "ufs40-flagship"):
        flash = load_device(name).flash
        curve = table[table["device"] == name].set_index("io_bytes")["read_mb_s"]
        iops = flash.parallel_units / flash.read_command_latency_us * 1e6  # commands/s
        knee = flash.read_bandwidth_mb_s * 1e6 / iops  # bytes
        for size, mb_s in curve.items():
            if size <= knee / 2:  # IOPS-bound: bandwidth = IOPS x size
                assert mb_s == pytest.approx(iops * size / 1e6, rel=0.01), (name, size)
            if size >= 2 * knee:  # bandwidth-bound: the plateau is the link bandwidth
                assert mb_s == pytest.approx(flash.read_bandwidth_mb_s, rel=0.01), (name, size)
        assert curve.iloc[-1] == pytest.approx(flash.read_bandwidth_mb_s, rel=0.002)
        assert curve.is_monotonic_increasing


def test_fig3b_sizes_option_and_bad_options(devices):
    figure = FIGURES.create({"type": "fig3b_read_bandwidth", "sizes_kib": [4, 1024]})
    figure.draw(devices)
    table = pd.read_csv(devices.out_dir / "fig3b_read_bandwidth.csv")
    assert set(table["io_kib"]) == {4}  # 1 MiB exceeds max_io_bytes (512 KiB): skipped
    with pytest.raises(KvsimError, match="sizes_kib"):
        FIGURES.create({"type": "fig3b_read_bandwidth", "sizes_kib": []})


# -- records missing ------------------------------------------------------------------------


@pytest.mark.parametrize(("figure", "key"), [
    ("fig4_cluster_pca", "cluster_layer"),
    ("fig7_coretrieval", "cluster_layer"),
    ("table2_update_retrieval", "update_horizon"),
    ("fig12_run_lengths", "read from flash"),
])
def test_missing_records_give_one_line(devices, figure, key):
    with pytest.raises(KvsimError) as info:
        FIGURES.create(figure).draw(devices)
    message = str(info.value)
    assert key in message and "\n" not in message and message.startswith(figure)


# -- Fig. 4 ---------------------------------------------------------------------------------


def test_fig4_draws_one_trace_of_two(records):
    paths = _draw(records, "fig4_cluster_pca")
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    _draw(records, {"type": "fig4_cluster_pca", "trace": "derived", "max_colored": 3,
                    "highlight": "largest", "runs": ["dynakv-cluster"]})
    with pytest.raises(KvsimError, match="trace='nope' matches 0"):
        FIGURES.create({"type": "fig4_cluster_pca", "trace": "nope"}).draw(records)
    with pytest.raises(KvsimError, match="runs names full"):
        FIGURES.create({"type": "fig4_cluster_pca", "runs": ["full"]}).draw(records)


def test_cluster_labels_hold_every_position_of_each_step(records):
    row = records.summary[records.summary["run"] == "dynakv-cluster"].iloc[0]
    labels = pd.read_parquet(records.run_dir(row["run_id"]) / "cluster_labels.parquet")
    prompt = open_trace(FIXTURE_TRACE).prompt_len
    for step, at in labels.groupby("step"):
        assert len(at) == prompt + max(step, -1) + 1


# -- Fig. 7 ---------------------------------------------------------------------------------


def test_fig7_uses_the_trace_with_prompt_queries(records):
    paths = _draw(records, "fig7_coretrieval")
    assert {p.suffix for p in paths} == {".pdf", ".png", ".csv", ".md"}
    table = pd.read_csv(records.out_dir / "fig7_coretrieval.csv")
    assert set(table["trace"]) == {"derived_allq"}  # the sample measures no co-retrieval
    for row in table.itertuples():
        run = records.summary[(records.summary["run"] == row.run)
                              & (records.summary["trace"] == "derived_allq")].iloc[0]
        counts = np.load(records.run_dir(run["run_id"]) / "coretrieval.npy")
        assert row.clusters == counts.shape[0]
        assert row.mean_retrieved_per_query == pytest.approx(np.trace(counts) / row.queries)
        assert 0 <= row.adjacent_share_chain_order <= 1
    # the DynaKV runs share one pass: one matrix for all four layouts
    assert table[table["run"].str.startswith("dynakv")]["adjacent_share_chain_order"].nunique() == 1
    with pytest.raises(KvsimError, match="no run of"):
        FIGURES.create({"type": "fig7_coretrieval", "trace": "pydoc_p160"}).draw(records)


def test_fig7_chain_order_is_the_layout_order():
    from sim.figures.cluster_records import adjacent_share, coretrieval_orders

    # clusters 0-3, co-retrieved pairs (0, 2) and (1, 3): the chain puts each pair side by side
    counts = np.array([[5, 0, 4, 0], [0, 5, 0, 3], [4, 0, 5, 0], [0, 3, 0, 5]])
    orders = coretrieval_orders(counts, np.array([0, 0, 1, 1, 2, 3]))
    assert orders["position"].tolist() == [0, 1, 2, 3]
    assert orders["chain"].tolist() == [0, 2, 1, 3]
    assert adjacent_share(counts, orders["position"]) == 0
    assert adjacent_share(counts, orders["chain"]) == 1


# -- Fig. 12 --------------------------------------------------------------------------------


def test_fig12_means_equal_the_hand_computed_ones(records):
    paths = _draw(records, "fig12_run_lengths")
    assert {p.suffix for p in paths} == {".pdf", ".png", ".csv", ".md"}
    table = pd.read_csv(records.out_dir / "fig12_run_lengths.csv")
    pooled: dict[str, list[float]] = {}
    for _, run in records.summary.iterrows():
        lengths = pd.read_csv(records.run_dir(run["run_id"]) / "run_lengths.csv")
        entries = float((lengths["run_entries"] * lengths["runs"]).sum())
        runs = float(lengths["runs"].sum())
        trace = run["trace"]
        row = table[(table["run"] == run["run"]) & (table["trace"] == trace)]
        assert row["mean_run_entries"].item() == pytest.approx(entries / runs)
        total = pooled.setdefault(run["run"], [0.0, 0.0])
        total[0] += entries
        total[1] += runs
    for label, (entries, runs) in pooled.items():
        row = table[(table["run"] == label) & (table["trace"] == "pooled")]
        assert row["mean_run_entries"].item() == pytest.approx(entries / runs)
    layouts = table.drop_duplicates("run").set_index("run")["layout"]
    assert [layouts[f"dynakv-{name}"] for name in LAYOUTS] == list(LAYOUTS)


# -- Table 2 --------------------------------------------------------------------------------


def test_table2_matches_update_retrieval_csv(records):
    paths = _draw(records, "table2_update_retrieval")
    assert {p.suffix for p in paths} == {".csv", ".md"}
    table = pd.read_csv(records.out_dir / "table2_update_retrieval.csv")
    assert [c for c in table.columns if c.startswith("t=")] == ["t=1", "t=2", "t=4", "t=8"]
    per_trace = table[~table["trace"].str.startswith("mean")]
    assert len(per_trace) == len(records.summary)  # 6 runs x 2 traces, every one with groups
    for _, run in records.summary.iterrows():
        data = pd.read_csv(records.run_dir(run["run_id"]) / "update_retrieval.csv")
        trace = run["trace"]
        row = per_trace[(per_trace["method"] == run["run"]) & (per_trace["trace"] == trace)]
        assert row["updates"].item() == data["updates"].iloc[0]
        for t in (1, 2, 4, 8):
            assert row[f"t={t}"].item() == pytest.approx(data["probability"].iloc[t - 1])
    means = table[table["trace"] == "mean of 2"].set_index("method")
    for method, rows in per_trace.groupby("method"):
        assert means.loc[method, "t=1"] == pytest.approx(rows["t=1"].mean())
    with pytest.raises(KvsimError, match="exceeds record.update_horizon"):
        FIGURES.create({"type": "table2_update_retrieval", "steps": [16]}).draw(records)
    FIGURES.create({"type": "table2_update_retrieval", "steps": []}).draw(records)
    table = pd.read_csv(records.out_dir / "table2_update_retrieval.csv")
    assert [c for c in table.columns if c.startswith("t=")] == [f"t={t}"
                                                               for t in range(1, HORIZON + 1)]


def test_a_layout_axis_names_each_run_of_fig12(tmp_path):
    """A ``policy.layout`` axis keeps its value in each run's point (the figure's series)."""
    path = tmp_path / "layouts.yaml"
    path.write_text(yaml.safe_dump({
        "name": "layouts", "trace": {"path": str(FIXTURE_TRACE)},
        "policies": [{"type": "full"}, {"type": "dynakv", **KNOBS}],
        "sweep": {"grid": {"policy.layout": ["sequence", "cluster"]}},
    }))
    points = {(run.label, run.layout["type"] if run.layout else None): run.point
              for run in plan(path).runs}
    assert points[("dynakv", "cluster")] == {"policy.layout": "cluster"}
    assert points[("dynakv", "sequence")] == {"policy.layout": "sequence"}
