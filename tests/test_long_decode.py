"""Long decodes: replaying a trace from an earlier split (``trace.decode_from``), accuracy on
every k-th step (``accuracy_every``), compact selections and progress inside a pass group.

Synthetic traces written with TraceWriter (as tests/test_trace_format.py makes them), so a
split view can be compared with a trace written with that split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cli import main
from sim.errors import ConfigError, KvsimError, TraceError
from sim.experiment.group_progress import GroupProgress, ProgressFile, describe, read_progress
from sim.experiment.pass_group import run_group
from sim.experiment.planning import plan
from sim.experiment.runner import execute
from sim.metrics import accuracy as accuracy_module
from sim.metrics.accuracy import layer_accuracy
from sim.policies import POLICIES
from sim.policies.base import HeadSelections, LayerSelection
from sim.policy_pass import run_policy_pass
from sim.trace.format import open_trace
from sim.trace.split import SplitTrace, split_trace
from sim.trace.writer import TraceWriter

from .conftest import FIXTURE_TRACE

MODEL = {
    "name": "toy", "source": "synthetic", "n_layers": 2, "n_q_heads": 4, "n_kv_heads": 2,
    "head_dim": 16, "params_per_layer": 50_000, "rope_theta": 10000.0, "sliding_window": None,
}
PROMPT, STEPS = 48, 24
N_POS = PROMPT + STEPS
TEXT = {"source": "synthetic", "name": "toy", "sha256": "0" * 64, "n_chars": 0}
POLICY_SPECS = [
    {"type": "token_topk", "budget": 0.25},
    {"type": "static_clusters", "budget": 0.3, "tokens_per_cluster": 6, "sink_tokens": 2,
     "recent_tokens": 4},
    {"type": "dynakv", "budget": 0.3, "tokens_per_cluster": 6, "sink_tokens": 2,
     "recent_tokens": 4, "buffer_max": 3},
    {"type": "quest", "budget": 0.3, "page_tokens": 4, "full_layers": 0},
    {"type": "h2o", "budget": 0.3},
]


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Keys drifting over positions (so clusters go stale and split), queries, speculative
    queries of every position."""
    rng = np.random.default_rng(seed)
    drift = np.linspace(0, 3, N_POS)[None, :, None]
    out = {"tokens": rng.integers(0, 1000, N_POS)}
    for layer in range(MODEL["n_layers"]):
        out[f"k{layer}"] = (rng.standard_normal((2, N_POS, 16)) + drift).astype(np.float32)
        out[f"v{layer}"] = rng.standard_normal((2, N_POS, 16)).astype(np.float32)
        out[f"q{layer}"] = rng.standard_normal((4, N_POS, 16)).astype(np.float32)
        out[f"s{layer}"] = rng.standard_normal((4, N_POS, 16)).astype(np.float32)
    return out


def _write(path: Path, prompt: int, query_start: int = 0, speculative: bool = False) -> Path:
    """The synthetic trace with ``prompt`` prompt positions (same data whatever the split)."""
    arrays = _arrays()
    with TraceWriter(path, MODEL, prompt, N_POS - prompt, query_start, TEXT, {"seed": 0}) as w:
        w.write_tokens(arrays["tokens"])
        for layer in range(MODEL["n_layers"]):
            spec = arrays[f"s{layer}"][:, prompt:] if speculative and layer else None
            w.write_layer(layer, arrays[f"k{layer}"], arrays[f"v{layer}"],
                          arrays[f"q{layer}"][:, query_start:], spec)
    return path


def _same_selection(a: LayerSelection, b: LayerSelection) -> None:
    assert (a.heads is None) == (b.heads is None)
    for pair in (("heads",), ("extra_reads",)):
        x, y = getattr(a, pair[0]), getattr(b, pair[0])
        assert (x is None) == (y is None)
        for hx, hy in zip(x or [], y or [], strict=True):
            np.testing.assert_array_equal(hx.positions, hy.positions, strict=True)
            np.testing.assert_array_equal(hx.offsets, hy.offsets, strict=True)
    np.testing.assert_array_equal(a.index_vectors, b.index_vectors)
    for name in ("prefill_groups", "append_groups"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert len(a.relabels or []) == len(b.relabels or [])
    for rx, ry in zip(a.relabels or [], b.relabels or [], strict=True):
        assert [(e.step, e.group, e.positions.tolist()) for e in rx] == [
            (e.step, e.group, e.positions.tolist()) for e in ry]


def _same_pass(a, b) -> None:
    assert (a.prompt_len, a.decode_steps) == (b.prompt_len, b.decode_steps)
    for sa, sb in zip(a.selections, b.selections, strict=True):
        _same_selection(sa, sb)
    pd.testing.assert_frame_equal(a.accuracy, b.accuracy, check_exact=True)
    pd.testing.assert_frame_equal(a.clusters, b.clusters, check_exact=True)


# -- decode_from: the split view ----------------------------------------------------------------


def test_a_split_at_the_prompt_end_is_the_trace_itself(tmp_path):
    trace = open_trace(_write(tmp_path / "t", PROMPT, speculative=True))
    view = split_trace(trace, PROMPT)
    assert isinstance(view, SplitTrace)
    assert (view.prompt_len, view.decode_steps, view.n_positions, view.query_start) == (
        trace.prompt_len, trace.decode_steps, trace.n_positions, trace.query_start)
    for layer in range(MODEL["n_layers"]):
        np.testing.assert_array_equal(view.decode_queries(layer), trace.decode_queries(layer))
        spec, want = view.speculative_queries(layer), trace.speculative_queries(layer)
        assert (spec is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(spec, want)
    for spec in [*POLICY_SPECS, {"type": "infinigen", "budget": 0.3}]:
        policy = POLICIES.create(spec)
        _same_pass(run_policy_pass(view, policy, 3), run_policy_pass(trace, policy, 3))


@pytest.mark.parametrize("split", [20, 47, 60, 71])
def test_a_split_trace_passes_like_a_trace_written_with_that_split(tmp_path, split):
    stored = open_trace(_write(tmp_path / "stored", PROMPT, speculative=True))
    written = open_trace(_write(tmp_path / "written", split, speculative=split >= PROMPT))
    view = split_trace(stored, split)
    assert (view.prompt_len, view.decode_steps) == (split, N_POS - split)
    specs = list(POLICY_SPECS)
    if split >= PROMPT:  # the speculative queries are there for these decode steps
        specs.append({"type": "infinigen", "budget": 0.3})
    for spec in specs:
        if POLICIES.create(spec).min_context() > split:
            continue
        policy = POLICIES.create(spec)
        _same_pass(run_policy_pass(view, policy, 5), run_policy_pass(written, policy, 5))


def test_a_split_of_a_split_splits_the_stored_trace(tmp_path):
    stored = open_trace(_write(tmp_path / "t", PROMPT))
    again = split_trace(split_trace(stored, 30), 60)
    assert (again.prompt_len, again.source_prompt_len, again.decode_steps) == (60, PROMPT, 12)


@pytest.mark.parametrize(
    ("split", "query_start", "expected"),
    [(0, 0, "out of range"), (N_POS, 0, "out of range"), (-3, 0, "out of range"),
     (30, 40, "from position 40"), ("7", 0, "must be an integer")],
)
def test_impossible_splits_are_one_line_trace_errors(tmp_path, split, query_start, expected):
    trace = open_trace(_write(tmp_path / "t", PROMPT, query_start=query_start))
    with pytest.raises(TraceError) as info:
        split_trace(trace, split)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_speculative_queries_before_the_captured_prompt_end_are_refused(tmp_path):
    view = split_trace(open_trace(_write(tmp_path / "t", PROMPT, speculative=True)), 30)
    assert view.speculative_queries(1) is None and view.speculative_gap
    with pytest.raises(KvsimError, match="speculative queries") as info:
        run_policy_pass(view, POLICIES.create({"type": "infinigen", "budget": 0.3}), 0)
    assert "\n" not in str(info.value)
    # a policy that does not read them runs
    run_policy_pass(view, POLICIES.create({"type": "token_topk", "budget": 0.3}), 0)


# -- decode_from in experiments: plan-time errors, identity, summary -------------------------


def _experiment(trace: Path, **extra) -> dict:
    return {
        "name": "long", "trace": {"path": str(trace)}, "device": "ufs40-flagship",
        "cache": {"capacity": 0.2},
        "policies": [{"type": "token_topk", "budget": 0.25},
                     {"type": "static_clusters", "budget": 0.3, "tokens_per_cluster": 6,
                      "sink_tokens": 2, "recent_tokens": 4}],
        **extra,
    }


def _cli_error(tmp_path: Path, capsys, data: dict) -> str:
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(data))
    out_dir = tmp_path / "out"
    code = main(["run", str(config), "--output", str(out_dir), "--quiet", "--no-plot"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert not out_dir.exists(), "nothing may be written"
    return lines[0]


@pytest.mark.parametrize(
    ("decode_from", "query_start", "expected"),
    [(0, 0, "trace.decode_from 0 is out of range"),
     (N_POS, 0, f"trace.decode_from {N_POS} is out of range"),
     (30, PROMPT, f"stores them from position {PROMPT}"),
     ("x", 0, "decode_from")],
)
def test_bad_decode_from_is_one_config_line(tmp_path, capsys, decode_from, query_start, expected):
    trace = _write(tmp_path / "t", PROMPT, query_start=query_start)
    data = _experiment(trace)
    data["trace"]["decode_from"] = decode_from
    line = _cli_error(tmp_path, capsys, data)
    assert expected in line, line


def test_infinigen_on_a_split_before_the_prompt_end_is_refused_at_plan_time(tmp_path, capsys):
    trace = _write(tmp_path / "t", PROMPT, speculative=True)
    data = _experiment(trace, policies=[{"type": "infinigen", "budget": 0.3}])
    data["trace"]["decode_from"] = 30
    line = _cli_error(tmp_path, capsys, data)
    assert "policies[0]" in line and "speculative queries" in line, line


def test_a_capture_split_is_checked_against_its_settings(tmp_path):
    data = _experiment(Path("unused"))
    data["trace"] = {"capture": {"model": "smollm2-135m", "prompt_len": 64, "decode_steps": 8,
                                 "queries": "decode"}, "decode_from": 32}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="from position 64"):
        plan(config)
    data["trace"]["capture"]["queries"] = "all"
    config.write_text(yaml.safe_dump(data))
    runs = plan(config).runs
    assert all(run.trace.decode_from == 32 and run.trace.prompt_len == 32 for run in runs)
    assert runs[0].trace.name.endswith("/64+8@32")


def _plan(tmp_path: Path, data: dict, name: str):
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**data, "output": str(tmp_path / name)}))
    return plan(config)


def test_the_split_and_accuracy_every_are_part_of_the_identity(tmp_path):
    trace = _write(tmp_path / "t", PROMPT)
    base = _plan(tmp_path, _experiment(trace), "base")
    explicit = _experiment(trace, accuracy_every=1)
    explicit["trace"]["decode_from"] = None
    same = _plan(tmp_path, explicit, "same")
    assert [r.run_id for r in base.runs] == [r.run_id for r in same.runs]
    assert [r.pass_id for r in base.runs] == [r.pass_id for r in same.runs]
    split = _experiment(trace)
    split["trace"]["decode_from"] = 30
    every = _experiment(trace, accuracy_every=4)
    ids = {tuple(r.run_id for r in p.runs) for p in
           (base, _plan(tmp_path, split, "split"), _plan(tmp_path, every, "every"))}
    passes = {tuple(r.pass_id for r in p.runs) for p in
              (base, _plan(tmp_path, split, "split2"), _plan(tmp_path, every, "every2"))}
    assert len(ids) == 3 and len(passes) == 3


def test_a_split_run_with_sampled_accuracy_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")
    trace = _write(tmp_path / "t", PROMPT)
    data = _experiment(trace, accuracy_every=3)
    data["trace"]["decode_from"] = 30
    planned = _plan(tmp_path, data, "run")
    summary, report = execute(planned, jobs=1, progress=False, log=lambda _m: None)
    assert report.completed == 2
    assert (summary["trace"] == "t@30").all()
    assert (summary["accuracy_every"] == 3).all()
    for run in planned.runs:
        accuracy = pd.read_parquet(planned.run_dir(run) / "accuracy.parquet")
        steps = pd.read_parquet(planned.run_dir(run) / "steps.parquet")
        assert sorted(accuracy["step"].unique()) == list(range(0, N_POS - 30, 3))
        assert len(steps) == N_POS - 30
        settings_ = yaml.safe_load((planned.run_dir(run) / "run.yaml").read_text())
        assert settings_["decode_from"] == 30 and settings_["accuracy_every"] == 3
    # the same runs on a trace written with that split give the same accuracy figures
    written = _write(tmp_path / "w", 30)
    other = _experiment(written, accuracy_every=3)
    again, _ = execute(_plan(tmp_path, other, "written"), jobs=1, progress=False,
                       log=lambda _m: None)
    metrics = ["attention_recall_mean", "topk_recall_mean", "latency_ms_mean", "hit_rate"]
    pd.testing.assert_frame_equal(summary[metrics].reset_index(drop=True),
                                  again[metrics].reset_index(drop=True), check_exact=True)


# -- accuracy on every k-th step --------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(every=st.integers(1, 40), spec=st.sampled_from(POLICY_SPECS[:4]))
def test_sampled_accuracy_equals_every_step_accuracy_on_its_steps(every, spec):
    # the real fixture (H2O is left out: it needs prompt queries, which the fixture lacks)
    trace = open_trace(FIXTURE_TRACE)
    policy = POLICIES.create(spec)
    full = _cached_full_pass(trace, policy)
    sampled = run_policy_pass(trace, policy, 0, accuracy_every=every)
    want = full.accuracy[full.accuracy["step"] % every == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(sampled.accuracy, want, check_exact=True)
    assert sampled.accuracy_every == every
    for a, b in zip(sampled.selections, full.selections, strict=True):
        _same_selection(a, b)


_FULL: dict[str, object] = {}


def _cached_full_pass(trace, policy):
    key = repr(policy)
    if key not in _FULL:
        _FULL[key] = run_policy_pass(trace, policy, 0)
    return _FULL[key]


@pytest.mark.parametrize("every", [3, 8, 32])
def test_sampled_accuracy_is_bit_identical_on_both_sides_of_the_small_product_limit(every):
    # width ~3000 x 3 query heads per KV head x 64: a chunk's 11 (every=3) or 4 (every=8)
    # sampled rows are above SMALL_PRODUCT (their products alone), 1 (every=32) is below
    # (the whole chunk's product)
    rng = np.random.default_rng(1)
    prompt, steps, n_kv, q_per_kv, dim = 3000, 70, 2, 3, 64
    keys = rng.standard_normal((n_kv, prompt + steps, dim)).astype(np.float32)
    values = rng.standard_normal((n_kv, prompt + steps, dim)).astype(np.float32)
    queries = (2 * rng.standard_normal((n_kv * q_per_kv, steps, dim))).astype(np.float32)
    heads = [HeadSelections.from_lists([
        np.sort(rng.choice(prompt + s, 150, replace=False)) for s in range(steps)
    ]) for _ in range(n_kv)]
    selection = LayerSelection(heads, np.zeros((n_kv, steps), np.int64))
    rows_alone = q_per_kv * -(-32 // every) * (prompt + 32) * dim
    assert (rows_alone > accuracy_module.SMALL_PRODUCT) == (every <= 8)
    full = layer_accuracy(queries, keys, values, prompt, selection)
    sampled = layer_accuracy(queries, keys, values, prompt, selection, every=every)
    for column, got in sampled.items():
        np.testing.assert_array_equal(got, full[column][:, ::every], strict=True)


def test_accuracy_every_must_be_a_positive_integer(tmp_path, capsys):
    trace = _write(tmp_path / "t", PROMPT)
    line = _cli_error(tmp_path, capsys, _experiment(trace, accuracy_every=0))
    assert "accuracy_every" in line


# -- compact selections -----------------------------------------------------------------------


def test_selections_are_compacted_without_changing_a_position():
    heads = HeadSelections.from_lists([np.array([0, 5, 65535]), np.array([7])])
    small = heads.compacted(65536)
    assert small.positions.dtype == np.uint16 and small.offsets is heads.offsets
    assert heads.compacted(65537) is heads  # uint32 is no smaller than int32
    for step in range(2):
        assert small.at(step).dtype == np.int32
        np.testing.assert_array_equal(small.at(step), heads.at(step), strict=True)
    pp = run_policy_pass(open_trace(FIXTURE_TRACE),
                         POLICIES.create({"type": "token_topk", "budget": 0.3}), 0)
    assert all(h.positions.dtype == np.uint8 or h.positions.dtype == np.uint16
               for sel in pp.selections for h in sel.heads)


# -- progress inside a pass group -------------------------------------------------------------


def test_group_progress_reports_phase_changes_and_at_most_once_per_interval():
    now = [0.0]
    seen: list[dict] = []
    tracker = GroupProgress(seen.append, interval_s=1.0, clock=lambda: now[0])
    tracker.start("dynakv", "policy pass", 30, "layer")
    for _ in range(10):
        now[0] += 0.25
        tracker.advance()
    assert [s["done"] for s in seen] == [0, 4, 8]
    tracker.start("dynakv", "replay", 100, "step")
    assert seen[-1] == {"run": "dynakv", "phase": "replay", "done": 0, "total": 100,
                        "unit": "step"}
    assert describe(seen[-1]) == "dynakv: replay 0/100 step"


def test_a_pass_group_reports_layers_then_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")
    trace = _write(tmp_path / "t", PROMPT)
    planned = _plan(tmp_path, _experiment(trace), "progress")
    group = planned.groups(planned.runs)[0]
    states: list[dict] = []
    run_group(group.runs, str(trace), str(planned.runs_dir), on_progress=states.append)
    phases = [(s["phase"], s["total"]) for s in states]
    assert phases[0] == ("policy pass", MODEL["n_layers"])
    assert ("replay", STEPS) in phases
    progress_file = tmp_path / "p.json"
    run_group(group.runs, str(trace), str(tmp_path / "again"), progress_file=str(progress_file))
    assert read_progress(progress_file)["phase"] == "replay"
    assert read_progress(tmp_path / "missing.json") is None
    ProgressFile(tmp_path / "no-such-dir" / "p.json")({"run": "x"})  # swallowed


def test_the_coordinator_shows_a_groups_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")
    postfixes: list[str] = []

    class Recorder:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s="", refresh=True):
            postfixes.append(s)

        def close(self):
            pass

    monkeypatch.setattr("sim.experiment.runner.progress_bar", lambda *a, **k: Recorder())
    trace = _write(tmp_path / "t", PROMPT)
    execute(_plan(tmp_path, _experiment(trace), "one"), jobs=1, log=lambda _m: None)
    assert any("policy pass" in p for p in postfixes)
    assert any("replay" in p for p in postfixes)
    planned = _plan(tmp_path, _experiment(trace), "two")
    execute(planned, jobs=2, log=lambda _m: None)
    assert not (planned.output_dir / ".progress").exists()
