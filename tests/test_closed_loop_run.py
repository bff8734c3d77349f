"""``kvsim run`` with a ``closed_loop:`` block (sim/experiment/closed_loop.py): strict
validation before anything is written, one run per policy and sweep point in the results
directory, numbers equal to the library's own decodes, resume, and a smoke run of SmolLM2.

All but the smoke test put a small randomly initialised Llama (tests/test_closed_loop.py) and a
character tokenizer in place of the model, so they run in seconds.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.result_files import CLOSED_LOOP_TABLE, CLOSED_LOOP_TOKENS, RUN_SETTINGS, RUN_SUMMARY

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sim.experiment import closed_loop  # noqa: E402  (after the importorskips)
from tests.test_closed_loop import tiny_llama  # noqa: E402


class CharTokenizer:
    """One token per character (code point modulo the tiny model's vocabulary), no BOS."""

    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) % 97 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


_CACHES = (closed_loop._IDS, closed_loop._PREFILLED, closed_loop._REFERENCES,
           closed_loop._SUITES)


@pytest.fixture
def tiny(monkeypatch):
    """The tiny model in place of every closed-loop model; the worker's reuse emptied."""
    model = tiny_llama()
    monkeypatch.setattr(closed_loop, "load", lambda name: (model, CharTokenizer()))
    for cache in _CACHES:
        cache.clear()
    previous = torch.get_num_threads()
    yield model
    torch.set_num_threads(previous)
    for cache in _CACHES:
        cache.clear()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _run(tmp_path: Path, text: str, *extra: str) -> Path:
    out = tmp_path / "out"
    code = main(["run", str(_write(tmp_path, text)), "--output", str(out), "--quiet", "-j", "1",
                 *extra])
    assert code == 0
    return out


def _runs(out: Path) -> dict[str, dict]:
    """run label + budget -> (summary row, settings, run directory)."""
    found = {}
    for run_dir in sorted((out / "runs").iterdir()):
        row = json.loads((run_dir / RUN_SUMMARY).read_text())
        settings = yaml.safe_load((run_dir / RUN_SETTINGS).read_text())
        found[f"{row['run']}@{settings['policy'].get('budget')}"] = {
            "row": row, "settings": settings, "dir": run_dir}
    return found


PERPLEXITY = """\
    name: cl
    closed_loop: {task: perplexity, model: smollm2-135m, text: pydoc, prompt_len: 40,
                  tokens: 12, bucket: 5}
    policies:
      - {type: full}
      - {type: token_topk, budget: 8}
      - {type: streaming_llm, budget: 8, sink_tokens: 2}
    sweep:
      grid:
        policy.budget: [8, 16]
    """


def _text_ids(n: int) -> list[int]:
    from sim.trace.sources import load_text

    return CharTokenizer()(load_text("pydoc").text[: n + 100])["input_ids"][:n]


def test_perplexity_runs_match_the_library_and_full_attention(tiny, tmp_path):
    """Each run's numbers are the library's teacher-forced decode of the same text without any
    reuse (fresh prefill per policy); full attention's are the reference's; per-bucket rows
    average, token-weighted, to the overall row; a sweep gives one run per budget."""
    from sim.closed_loop.perplexity import teacher_forced
    from sim.policies import POLICIES

    out = _run(tmp_path, PERPLEXITY)
    runs = _runs(out)
    assert set(runs) == {"full@None", "token_topk@8", "token_topk@16", "streaming_llm@8",
                         "streaming_llm@16"}
    ids = _text_ids(52)
    torch.set_num_threads(1)
    full = teacher_forced(tiny, ids, 40, 12, None, 0)
    for key, run in runs.items():
        row, settings = run["row"], run["settings"]
        policy = POLICIES.create(settings["policy"])
        fresh = teacher_forced(tiny, ids, 40, 12, policy, 0)
        assert row["mean_nll"] == pytest.approx(float(fresh.nll.mean()), rel=1e-6), key
        assert row["mean_nll_full"] == pytest.approx(float(full.nll.mean()), rel=1e-6)
        assert row["perplexity"] == pytest.approx(math.exp(row["mean_nll"]))
        assert row["ppl_ratio"] == pytest.approx(row["perplexity"] / row["perplexity_full"])
        table = pd.read_csv(run["dir"] / CLOSED_LOOP_TABLE)
        assert list(table["bucket"]) == ["40-44", "45-49", "50-51", "all"]
        parts = table.iloc[:-1]
        weighted = (parts["mean_nll"] * parts["tokens"]).sum() / parts["tokens"].sum()
        assert weighted == pytest.approx(table.iloc[-1]["mean_nll"])
        tokens = pd.read_parquet(run["dir"] / CLOSED_LOOP_TOKENS)
        assert list(tokens["token"]) == ids[40:52]
        assert list(tokens["position"]) == list(range(40, 52))
        np.testing.assert_allclose(tokens["nll"], fresh.nll, rtol=1e-6)
    # full attention through the hook is the model; a budget below the context changes it
    assert runs["full@None"]["row"]["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert runs["streaming_llm@8"]["row"]["ppl_ratio"] != pytest.approx(1.0, abs=1e-6)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 5 and "policy.budget" in summary
    assert {"mean_nll", "perplexity", "mean_nll_full", "perplexity_full",
            "ppl_ratio"} <= set(summary.columns)
    assert "latency_ms_mean" not in summary  # no replay columns in a closed-loop summary
    assert not list(out.glob("*.png"))  # no latency or recall to draw


NEEDLE = """\
    name: cl
    closed_loop: {task: needle, context_len: 120, depths: [0.2, 0.8]}
    policies:
      - {type: full}
      - {type: streaming_llm, budget: 16, sink_tokens: 2}
    sweep:
      grid:
        policy.budget: [16, 32]
    """


@pytest.mark.parametrize("experiment", [PERPLEXITY, NEEDLE], ids=["perplexity", "needle"])
def test_a_finished_run_is_not_recomputed(tiny, tmp_path, monkeypatch, experiment):
    out = _run(tmp_path, experiment)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}

    def refuse(*args, **kwargs):
        raise AssertionError("a complete run was run again")

    monkeypatch.setattr(closed_loop, "run_closed_loop_group", refuse)
    monkeypatch.setattr(closed_loop, "load", refuse)  # not even the model loads
    _run(tmp_path, experiment)
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert after == before


def test_agreement_counts_the_first_divergence(tiny, tmp_path):
    """Full attention agrees with itself on every token; a policy's row agrees with its own
    tokens file and with the library's greedy decode."""
    from sim.closed_loop.agreement import agreement
    from sim.closed_loop.driver import decode
    from sim.policies import POLICIES

    out = _run(tmp_path, """\
        name: cl
        closed_loop: {task: agreement, prompt_len: 40, tokens: 10}
        policies:
          - {type: full}
          - {type: streaming_llm, budget: 6, sink_tokens: 2}
        """)
    runs = _runs(out)
    assert runs["full@None"]["row"]["first_divergence"] == 10
    assert runs["full@None"]["row"]["match_share"] == 1.0
    run = runs["streaming_llm@6"]
    tokens = pd.read_parquet(run["dir"] / CLOSED_LOOP_TOKENS)
    first, share = agreement(tokens["token_full"].to_numpy(), tokens["token"].to_numpy())
    assert (run["row"]["first_divergence"], run["row"]["match_share"]) == (first, share)
    assert share == tokens["match"].mean()
    torch.set_num_threads(1)
    ids = _text_ids(40)
    fresh = decode(tiny, ids, 10, POLICIES.create(run["settings"]["policy"]), 0)
    assert list(tokens["token"]) == fresh.tokens.tolist()


SAVED = """\
    name: cl
    closed_loop: {task: perplexity, prompt_len: 40, tokens: 12, bucket: 6, save_trace: true}
    policies:
      - {type: full}
      - {type: token_topk, budget: 8}
      - {type: dynakv, budget: 12, tokens_per_cluster: 4, sink_tokens: 2, recent_tokens: 2,
         buffer_max: 2}
      - {type: streaming_llm, budget: 8, sink_tokens: 2}
    """


def _replay(tmp_path: Path, trace: Path, policies: list[dict], name: str) -> pd.DataFrame:
    """``kvsim run`` of ``policies`` on ``trace`` (a trace replay through the SimPy engine)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "trace": {"path": str(trace)},
                                    "policies": policies, "plot": False}))
    out = tmp_path / name
    assert main(["run", str(path), "--output", str(out), "--quiet", "-j", "1"]) == 0
    return pd.read_csv(out / "summary.csv")


def test_a_saved_trace_replays_with_kvsim_run_and_the_pass_makes_the_loop_s_selections(
    tiny, tmp_path
):
    """save_trace: each run's own decode as a trace (float32, the prompt and the 11 tokens fed)
    and its selections; the trace replay's pass over the trace makes exactly the selections
    the loop made (every step, layer, KV head), and ``kvsim run`` replays it through the
    engine with that very pass (its accuracy records are the pass's)."""
    from sim.policies import POLICIES
    from sim.policy_pass import run_policy_pass
    from sim.result_files import CLOSED_LOOP_SELECTIONS, CLOSED_LOOP_TRACE
    from sim.trace.format import open_trace

    out = _run(tmp_path, SAVED)
    ids = _text_ids(52)
    for key, run in _runs(out).items():
        assert run["settings"]["closed_loop"]["save_trace"] is True
        trace = open_trace(run["dir"] / CLOSED_LOOP_TRACE, verify=True)
        assert trace.manifest["dtype"] == "float32"
        assert (trace.prompt_len, trace.decode_steps) == (40, 11)
        assert trace.tokens().tolist() == ids[:51], key
        assert trace.manifest["capture"]["policy"] == run["settings"]["policy"]
        chosen = pd.read_parquet(run["dir"] / CLOSED_LOOP_SELECTIONS)
        assert len(chosen) == 11 * 3 * 2  # steps x global layers x KV heads
        passed = run_policy_pass(trace, POLICIES.create(run["settings"]["policy"]), 0)
        for row in chosen.itertuples():
            heads = passed.selections[row.layer].heads
            if heads is None:  # the policy attends everything
                assert row.positions is None, key
            else:
                np.testing.assert_array_equal(row.positions, heads[row.kv_head].at(row.step))
        if key.startswith("dynakv"):  # the replay of the run's own decode, same policy
            replayed = _replay(tmp_path, run["dir"] / CLOSED_LOOP_TRACE,
                               [run["settings"]["policy"]], "replay")
            assert np.isfinite(replayed.loc[0, "latency_ms_mean"])
            accuracy = pd.read_parquet(next((tmp_path / "replay" / "runs").iterdir())
                                       / "accuracy.parquet")
            pd.testing.assert_frame_equal(accuracy, passed.accuracy, check_dtype=False)
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]


def test_an_agreement_run_saves_the_decode_its_policy_produced(tiny, tmp_path):
    """Greedy under the policy: the saved trace holds the policy's own tokens (not full
    attention's), says so, and its pass makes the loop's selections."""
    from sim.policies import POLICIES
    from sim.policy_pass import run_policy_pass
    from sim.trace.format import open_trace

    out = _run(tmp_path, """\
        name: cl
        closed_loop: {task: agreement, prompt_len: 40, tokens: 10, save_trace: true}
        policies: [{type: streaming_llm, budget: 6, sink_tokens: 2}]
        """)
    (run,) = _runs(out).values()
    tokens = pd.read_parquet(run["dir"] / CLOSED_LOOP_TOKENS)
    assert not tokens["match"].all()  # the policy's text differs from full attention's
    trace = open_trace(run["dir"] / "trace", verify=True)
    assert trace.tokens().tolist() == _text_ids(40) + tokens["token"].tolist()[:-1]
    assert trace.manifest["capture"]["decode"]["sampling"]["method"] == "greedy"
    chosen = pd.read_parquet(run["dir"] / "selections.parquet")
    passed = run_policy_pass(trace, POLICIES.create(run["settings"]["policy"]), 0)
    for row in chosen.itertuples():
        np.testing.assert_array_equal(
            row.positions, passed.selections[row.layer].heads[row.kv_head].at(row.step))


def test_open_loop_recall_is_the_trace_replay_s_recall_on_the_reference(tiny, tmp_path):
    """Both views: each perplexity run's recall_open_loop equals the retrieval recall ``kvsim
    run`` reports replaying the same policy on full attention's decode of the same tokens
    (full's saved trace: the reference, bit for bit); quality = full / policy perplexity."""
    out = _run(tmp_path, SAVED)
    runs = _runs(out)
    full_trace = runs["full@None"]["dir"] / "trace"
    policies = [run["settings"]["policy"] for run in runs.values()]
    labels = [run["row"]["run"] for run in runs.values()]
    replayed = _replay(tmp_path, full_trace, [{**p, "label": label} for p, label in
                                              zip(policies, labels, strict=True)], "both")
    replayed = replayed.set_index("run")
    for run in runs.values():
        row = run["row"]
        assert row["recall_open_loop"] == pytest.approx(
            replayed.loc[row["run"], "retrieval_recall_mean"], rel=1e-12, abs=0)
        assert row["topk_recall_open_loop"] == pytest.approx(
            replayed.loc[row["run"], "topk_recall_mean"], rel=1e-12, abs=0)
        assert row["quality"] == pytest.approx(row["perplexity_full"] / row["perplexity"])
    assert runs["full@None"]["row"]["recall_open_loop"] == 1.0
    assert runs["streaming_llm@8"]["row"]["recall_open_loop"] < 1.0


def test_save_trace_into_a_directory(tiny, tmp_path):
    """A directory: each run's trace at <dir>/<run_id>, its selections in its run directory;
    without save_trace a run's settings (and id) are as before the option."""
    from sim.result_files import CLOSED_LOOP_SELECTIONS
    from sim.trace.format import open_trace

    keep = tmp_path / "traces"
    out = _run(tmp_path, SAVED.replace("save_trace: true", f"save_trace: {keep}"))
    for run in _runs(out).values():
        run_id = run["row"]["run_id"]
        assert open_trace(keep / run_id).decode_steps == 11
        assert (run["dir"] / CLOSED_LOOP_SELECTIONS).exists()
        assert not (run["dir"] / "trace").exists()
    (tmp_path / "plain").mkdir()
    for run in _runs(_run(tmp_path / "plain", PERPLEXITY)).values():
        assert "save_trace" not in run["settings"]["closed_loop"]
        assert not (run["dir"] / CLOSED_LOOP_SELECTIONS).exists()


def _needle_suite(context_len: int, depths: list[float], seed: int = 0):
    """The suite built here from the text and the seed, independently of the runner."""
    from sim.closed_loop.needle import build_suite, make_facts

    return build_suite(lambda text: CharTokenizer()(text)["input_ids"],
                       _text_ids(context_len), make_facts(len(depths), seed), depths,
                       context_len)


def test_needle_runs_match_the_library_and_full_attention(tiny, tmp_path, monkeypatch):
    """Each run's answers are the library's, each from its own fresh prefill of the context
    built from the text and the seed; full attention's are the reference's; accuracy is the
    share of exact matches; the context is prefilled once for all runs of the worker."""
    from sim.closed_loop import driver
    from sim.closed_loop.needle import answer_needles
    from sim.policies import POLICIES

    prefills = []
    real_prefill = driver.prefill
    monkeypatch.setattr(driver, "prefill",
                        lambda *a, **k: prefills.append(a[1]) or real_prefill(*a, **k))
    out = _run(tmp_path, NEEDLE)
    assert len(prefills) == 1
    runs = _runs(out)
    assert set(runs) == {"full@None", "streaming_llm@16", "streaming_llm@32"}
    suite = _needle_suite(120, [0.2, 0.8])
    assert tuple(prefills[0]) == suite.context
    torch.set_num_threads(1)
    full = answer_needles(tiny, suite.context, suite.needles, None, 0)
    for key, run in runs.items():
        row = run["row"]
        fresh = answer_needles(tiny, suite.context, suite.needles,
                               POLICIES.create(run["settings"]["policy"]), 0)
        table = pd.read_csv(run["dir"] / CLOSED_LOOP_TABLE, dtype={"expected": str},
                            keep_default_na=False)
        assert table["depth"].tolist() == [0.2, 0.8]
        lengths = [len(f.text) for f in suite.facts]  # one token per character
        assert table["position"].tolist() == list(suite.starts) == [
            round(0.2 * (120 - lengths[0])), round(0.8 * (120 - lengths[1]))]
        assert table["fact"].tolist() == [f.text.strip() for f in suite.facts]
        assert table["expected"].tolist() == [f.code for f in suite.facts]
        for which, decoded in (("answer", fresh), ("answer_full", full)):
            assert table[which].tolist() == [CharTokenizer().decode(a.tolist()).strip()
                                             for a in decoded.answers], key
        assert table["correct"].tolist() == fresh.correct
        assert table["correct_full"].tolist() == full.correct
        assert row["accuracy"] == fresh.accuracy and row["accuracy_full"] == full.accuracy
        assert row["context_len"] == 120 and row["needles"] == 2 and "tokens" not in row
        # no ratio (NaN, null in JSON) when full attention answers nothing
        assert row["accuracy_ratio"] == (row["accuracy"] / full.accuracy if full.accuracy
                                         else None)
        assert not (run["dir"] / CLOSED_LOOP_TOKENS).exists()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns[-8:]) == ["task", "context_len", "needles", "accuracy",
                                          "accuracy_full", "accuracy_ratio", "decode_s",
                                          "hook_s"]
    assert (summary["task"] == "needle").all()


def test_needle_facts_and_answers_are_deterministic_for_a_seed(tiny, tmp_path):
    """The same seed gives the same facts and answers (one worker or two, the timings
    aside); another seed other facts."""
    for name in "abc":
        (tmp_path / name).mkdir()
    first = _run(tmp_path / "a", NEEDLE)
    again = _run(tmp_path / "b", NEEDLE, "-j", "2")
    other = _run(tmp_path / "c", "seed: 1\n" + textwrap.dedent(NEEDLE))
    timing = ["decode_s", "hook_s"]
    one, two = (pd.read_csv(out / "summary.csv").drop(columns=timing) for out in (first, again))
    pd.testing.assert_frame_equal(one, two)
    for run_id in one["run_id"]:
        assert ((first / "runs" / run_id / CLOSED_LOOP_TABLE).read_bytes()
                == (again / "runs" / run_id / CLOSED_LOOP_TABLE).read_bytes())
    facts = {out: pd.read_csv(next((out / "runs").glob("*")) / CLOSED_LOOP_TABLE)["fact"]
             .tolist() for out in (first, other)}
    assert facts[first] != facts[other]


def test_runs_sharing_a_needle_context_run_together(tiny, tmp_path, monkeypatch):
    """A sweep listing the budget before the context: the runner still sends the runs of one
    context one after another, so one worker prefills each context once."""
    from sim.closed_loop import driver

    prefills = []
    real_prefill = driver.prefill
    monkeypatch.setattr(driver, "prefill",
                        lambda *a, **k: prefills.append(len(a[1])) or real_prefill(*a, **k))
    out = _run(tmp_path, """\
        name: cl
        closed_loop: {task: needle, context_len: 120, depths: [0.2, 0.8]}
        policies:
          - {type: streaming_llm, budget: 16, sink_tokens: 2}
        sweep:
          grid:
            policy.budget: [16, 32]
            closed_loop.context_len: [100, 120]
        """)
    assert prefills == [100, 120]
    summary = pd.read_csv(out / "summary.csv")
    assert summary["closed_loop.context_len"].tolist() == [100, 120, 100, 120]  # plan order
    assert summary["context_len"].tolist() == [100, 120, 100, 120]


def _bad(tmp_path: Path, capsys, text: str) -> str:
    out = tmp_path / "out"
    code = main(["run", str(_write(tmp_path, text)), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists(), "a failed config must not leave results behind"
    return lines[0]


@pytest.mark.parametrize(("block", "policies", "expected"), [
    ("{task: perplexity, prompt_len: 40, tokens: 8, colour: red}", "[{type: full}]",
     "closed_loop.colour: unknown key (valid: task, model"),
    ("{task: needles}", "[{type: full}]", "closed_loop.task: Input should be"),
    ("{task: perplexity, prompt_len: 8000, tokens: 193}", "[{type: full}]",
     "closed_loop.tokens: prompt_len + tokens = 8193 exceeds smollm2-135m's 8192 positions"),
    ("{task: perplexity, model: gpt-9}", "[{type: full}]", "closed_loop.model: unknown model"),
    ("{task: agreement, text: nowhere}", "[{type: full}]", "closed_loop.text: unknown text"),
    ("{task: agreement, bucket: 8}", "[{type: full}]",
     "closed_loop: bucket applies only to tasks perplexity and generation"),
    ("{task: perplexity, prompt_len: 40, tokens: 8}", "[{type: token_topk, budget: 41}]",
     "policies[0].budget: 41 tokens exceeds the prompt (40 tokens)"),
    ("{task: perplexity, prompt_len: 40, tokens: 8}", "[{type: full, layout: sequence}]",
     "policies[0].layout: applies to trace replays, not to closed_loop"),
    ("{task: perplexity, prompt_len: 40, tokens: 8}", "[{type: nope}]", "policies[0]"),
    # the needle task
    ("{task: needle, depths: [0.5, 1.5]}", "[{type: full}]",
     "closed_loop.depths: a needle depth must be in [0, 1], got 1.5"),
    ("{task: needle, depths: [-0.1]}", "[{type: full}]", "a needle depth must be in [0, 1]"),
    ("{task: needle, depths: [0.5, .nan]}", "[{type: full}]",
     "line 2, column 43: .nan is not a finite number"),
    ("{task: needle, depths: [.inf]}", "[{type: full}]", ".inf is not a finite number"),
    ("{task: needle, depths: [0.5, 'nan']}", "[{type: full}]",
     "closed_loop.depths.1: Input should be a finite number"),
    ("{task: needle, depths: [0.5, 0.5]}", "[{type: full}]", "depths must be distinct"),
    ("{task: needle, depths: []}", "[{type: full}]", "closed_loop.depths: List should have"),
    ("{task: needle, depths: [" + ", ".join(str(i / 25) for i in range(25)) + "]}",
     "[{type: full}]", "closed_loop.depths: 25 needles; at most 24 (one fact per name)"),
    ("{task: needle, context_len: 8193}", "[{type: full}]",
     "closed_loop.context_len: 8193 exceeds smollm2-135m's 8192 positions"),
    ("{task: needle, model: gemma3-270m, context_len: 40000}", "[{type: full}]",
     "closed_loop.context_len: 40000 exceeds gemma3-270m's 32768 positions"),
    ("{task: needle, context_len: 8190}", "[{type: full}]",
     "closed_loop.context_len: 8190 tokens and"),
    ("{task: needle, context_len: 100, depths: [0.5, 0.51]}", "[{type: full}]",
     "closed_loop.depths: needles at depths 0.5 and 0.51 overlap in 100 tokens"),
    ("{task: needle, context_len: 100}", "[{type: token_topk, budget: 101}]",
     "policies[0].budget: 101 tokens exceeds the prompt (100 tokens)"),
    ("{task: needle, prompt_len: 64}", "[{type: full}]",
     "closed_loop: prompt_len applies to tasks perplexity, agreement and generation"),
    ("{task: needle, tokens: 8}", "[{type: full}]", "closed_loop: tokens applies to tasks"),
    ("{task: needle, bucket: 8}", "[{type: full}]",
     "bucket applies only to tasks perplexity and generation"),
    ("{task: agreement, context_len: 64}", "[{type: full}]",
     "closed_loop: context_len applies only to task needle"),
    ("{task: perplexity, depths: [0.5]}", "[{type: full}]",
     "closed_loop: depths applies only to task needle"),
    ("{task: needle, context_length: 64}", "[{type: full}]",
     "closed_loop.context_length: unknown key (valid: task, model"),
])
def test_bad_closed_loop_blocks_fail_in_one_line(tiny, tmp_path, capsys, block, policies,
                                                 expected):
    line = _bad(tmp_path, capsys, f"name: cl\nclosed_loop: {block}\npolicies: {policies}\n")
    assert expected in line


def test_an_unwritable_save_trace_fails_in_one_line(tiny, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = _bad(tmp_path, capsys, f"""\
        name: cl
        closed_loop: {{task: perplexity, prompt_len: 40, tokens: 8,
                      save_trace: "{tmp_path / 'afile' / 'traces'}"}}
        policies: [{{type: full}}]
        """)
    assert "closed_loop.save_trace: cannot write" in line and "is a file" in line
    line = _bad(tmp_path, capsys, """\
        name: cl
        closed_loop: {task: perplexity, prompt_len: 40, tokens: 8, save_trace: " "}
        policies: [{type: full}]
        """)
    assert "closed_loop.save_trace: give true or a directory" in line
    line = _bad(tmp_path, capsys, """\
        name: cl
        closed_loop: {task: perplexity, prompt_len: 40, tokens: 1, save_trace: true}
        policies: [{type: full}]
        """)
    assert "closed_loop.save_trace: a trace needs a decode step; give tokens >= 2" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "exp.yaml"]


def test_a_sweep_point_over_the_context_fails_before_any_run(tiny, tmp_path, capsys):
    line = _bad(tmp_path, capsys, """\
        name: cl
        closed_loop: {task: agreement, prompt_len: 40, tokens: 8}
        policies: [{type: token_topk, budget: 8}]
        sweep: {grid: {policy.budget: [8, 64]}}
        """)
    assert "[policy.budget=64]: policies[0].budget: 64 tokens exceeds the prompt" in line


@pytest.mark.parametrize(("extra", "expected"), [
    ("trace: {path: somewhere}", "closed_loop: give either trace: or closed_loop:, not both"),
    ("record_io: {every: 1}", "record_io: applies to trace replays, not to closed_loop"),
    ("model: llama-3.2-1b", "model: applies to trace replays"),
])
def test_trace_settings_beside_closed_loop_are_refused(tiny, tmp_path, capsys, extra, expected):
    line = _bad(tmp_path, capsys, f"name: cl\nclosed_loop: {{task: agreement}}\n{extra}\n"
                                  "policies: [{type: full}]\n")
    assert expected in line


def test_neither_trace_nor_closed_loop_is_refused(tmp_path, capsys):
    line = _bad(tmp_path, capsys, "name: cl\npolicies: [{type: full}]\n")
    assert "trace: missing (give a trace: to replay, or a closed_loop: block)" in line


def test_a_text_too_short_fails_before_anything_is_written(tiny, tmp_path, capsys):
    """The text's length is known once tokenised: checked before the results directory is
    made (here 30 characters are 30 tokens)."""
    short = tmp_path / "short.txt"
    short.write_text("x" * 30)
    line = _bad(tmp_path, capsys, f"""\
        name: cl
        closed_loop: {{task: perplexity, text: "file:{short}", prompt_len: 24, tokens: 8}}
        policies: [{{type: full}}]
        """)
    assert "closed_loop.text:" in line and "fewer than prompt_len + tokens = 32 tokens" in line


def test_a_text_too_short_for_the_needle_context_fails_before_anything_is_written(
        tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("x" * 90)
    line = _bad(tmp_path, capsys, f"""\
        name: cl
        closed_loop: {{task: needle, text: "file:{short}", context_len: 100, depths: [0.5]}}
        policies: [{{type: full}}]
        """)
    assert "closed_loop.text:" in line and "fewer than context_len = 100 tokens" in line


def test_without_the_capture_extra_the_error_names_it(tmp_path, capsys, monkeypatch):
    """A closed-loop experiment on a machine without torch/transformers: one line saying which
    extra to install, nothing written."""
    from sim.errors import CaptureError
    from sim.trace import models

    def missing():
        raise CaptureError(models.INSTALL_HINT)

    monkeypatch.setattr(models, "_LOADED", {})
    monkeypatch.setattr(models, "import_capture_deps", missing)
    closed_loop._IDS.clear()
    line = _bad(tmp_path, capsys, """\
        name: cl
        closed_loop: {task: agreement, prompt_len: 40, tokens: 8}
        policies: [{type: full}]
        """)
    assert "closed-loop runs need the capture extra: pip install -e '.[capture]'" in line


def test_core_imports_without_torch():
    """Planning and the summary need neither torch nor transformers (checked in a fresh
    interpreter: this one has imported them)."""
    import subprocess
    import sys

    code = ("import sys; import sim.experiment.closed_loop, sim.experiment.planning, "
            "sim.experiment.runner; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the real model ---------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "experiments" / "closed_loop_perplexity.yaml"


def _smollm2_config(tmp_path: Path, example: Path, task: dict, policies: list[dict]) -> Path:
    """``example`` on SmolLM2 at CI size: its closed_loop block updated by ``task``, the
    policies replaced, no sweep; skipped without the model."""
    pytest.importorskip("gguf")
    from sim.errors import CaptureError
    from sim.trace.models import MODELS

    try:
        MODELS["smollm2-135m"].locate(Path(tmp_path))
    except CaptureError as exc:
        pytest.skip(str(exc))
    config = yaml.safe_load(example.read_text())
    config["closed_loop"].update(task)
    config["policies"] = policies
    config.pop("sweep")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_smoke_smollm2_perplexity(tmp_path):
    """CI size: the example experiment on SmolLM2 with a 64-token prompt and 8 tokens, two
    policies and the full-attention reference (the model's load dominates: ~20-40 s)."""
    path = _smollm2_config(tmp_path, EXAMPLE, {"prompt_len": 64, "tokens": 8, "bucket": 4}, [
        {"type": "full"},
        {"type": "dynakv", "budget": 16, "sink_tokens": 4, "recent_tokens": 4,
         "tokens_per_cluster": 4},
    ])
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out), "--quiet", "-j", "1"]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary.loc["full", "ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert summary.loc["full", "perplexity"] == pytest.approx(summary.loc["full",
                                                                          "perplexity_full"])
    assert np.isfinite(summary.loc["dynakv", "perplexity"])
    assert (summary["perplexity_full"] == summary["perplexity_full"].iloc[0]).all()
    # both views: full attention recalls everything open loop, 16 of 64 tokens less
    assert summary.loc["full", "recall_open_loop"] == 1.0
    assert 0 < summary.loc["dynakv", "recall_open_loop"] < 1
    assert summary.loc["dynakv", "quality"] == pytest.approx(
        1 / summary.loc["dynakv", "ppl_ratio"])
    assert (out / "figures" / "closed_vs_open.png").exists()


# -- both views: the figure and the rank-correlation table -------------------------------------


def test_spearman_table_by_hand():
    """Ranks without ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); budget 0.1: d = 0, -1, 1, 0
    -> 0.8; budget 0.2: d = 1, -1, 0 -> 0.5; all seven: sum d^2 = 16 -> 5/7; a budget of two
    runs and full attention's run (no budget) get no rho."""
    from scipy.stats import t

    from sim.figures.closed_loop import spearman_table

    points = pd.DataFrame({
        "budget": [0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, float("nan")],
        "recall_open_loop": [0.5, 0.6, 0.7, 0.8, 0.9, 0.85, 0.95, 0.4, 0.45, 1.0],
        "quality": [0.7, 0.9, 0.8, 1.0, 0.95, 0.97, 0.99, 0.5, 0.4, 1.0],
    })
    table = spearman_table(points[points["budget"] != 0.3]).set_index("scope")
    assert table["n"].to_dict() == {"all": 7, "budget=0.1": 4, "budget=0.2": 3}
    assert table.loc["budget=0.1", "spearman_rho"] == pytest.approx(0.8)
    assert table.loc["budget=0.2", "spearman_rho"] == pytest.approx(0.5)
    rho = table.loc["all", "spearman_rho"]
    assert rho == pytest.approx(5 / 7)
    t_stat = rho * math.sqrt(5 / (1 - rho**2))  # the t approximation with n - 2 = 5
    assert table.loc["all", "p_value"] == pytest.approx(2 * t.sf(t_stat, 5))
    two = spearman_table(points).set_index("scope").loc["budget=0.3"]
    assert two["n"] == 2 and math.isnan(two["spearman_rho"]) and math.isnan(two["p_value"])


def test_closed_vs_open_figure_from_a_perplexity_sweep(tiny, tmp_path):
    """The figure and its two tables from a run: one point per run with the run's budget, its
    summary recall and quality; the correlation over the budgeted runs recomputed from the
    ranks by hand (no ties among four runs)."""
    out = _run(tmp_path, PERPLEXITY.rstrip(" ") + "    figures: [closed_vs_open]\n")
    figures = out / "figures"
    assert {p.name for p in figures.iterdir()} == {
        f"closed_vs_open{ext}" for ext in (".png", ".pdf", ".csv", ".md")} | {
        f"closed_vs_open_spearman{ext}" for ext in (".csv", ".md")}
    points = pd.read_csv(figures / "closed_vs_open.csv")
    summary = pd.read_csv(out / "summary.csv")
    np.testing.assert_array_equal(points["recall_open_loop"], summary["recall_open_loop"])
    np.testing.assert_array_equal(points["quality"], summary["quality"])
    np.testing.assert_array_equal(points["budget"].fillna(-1),
                                  summary["policy.budget"].fillna(-1))
    table = pd.read_csv(figures / "closed_vs_open_spearman.csv").set_index("scope")
    assert table["n"].to_dict() == {"all": 4, "budget=8": 2, "budget=16": 2}
    budgeted = points[points["budget"].notna()]
    x = budgeted["recall_open_loop"].rank().to_numpy()
    y = budgeted["quality"].rank().to_numpy()
    assert len(set(x)) == len(set(y)) == 4  # no ties: the formula holds
    assert table.loc["all", "spearman_rho"] == pytest.approx(
        1 - 6 * ((x - y) ** 2).sum() / (4 * 15))
    assert table["spearman_rho"].isna().tolist() == [False, True, True]


@pytest.mark.parametrize(("block", "figure", "expected"), [
    ("{task: agreement, prompt_len: 40, tokens: 8}", "closed_vs_open",
     "figures[0] (closed_vs_open) is not drawn from closed_loop task agreement (only "
     "perplexity)"),
    ("{task: perplexity, prompt_len: 40, tokens: 8}", "table5_variance",
     "figures[0] (table5_variance) is not drawn from closed_loop task perplexity results"),
])
def test_a_figure_of_the_other_kind_of_results_is_refused(tiny, tmp_path, capsys, block,
                                                          figure, expected):
    line = _bad(tmp_path, capsys, f"name: cl\nclosed_loop: {block}\n"
                                  f"policies: [{{type: full}}]\nfigures: [{figure}]\n")
    assert expected in line


def test_closed_vs_open_in_a_trace_replay_is_refused(tmp_path, capsys):
    from tests.conftest import FIXTURE_TRACE

    line = _bad(tmp_path, capsys, f"name: r\ntrace: {{path: {FIXTURE_TRACE}}}\n"
                                  "policies: [{type: full}]\nfigures: [closed_vs_open]\n")
    assert "figures[0] (closed_vs_open) is drawn from closed_loop results (task perplexity)" \
        in line


def test_one_teacher_forced_token_has_no_open_loop_recall(tiny, tmp_path):
    """One token is predicted by the prefill alone: no decode step, so no trace to recall on
    (NaN), and the run is otherwise as before."""
    out = _run(tmp_path, """\
        name: cl
        closed_loop: {task: perplexity, prompt_len: 40, tokens: 1}
        policies: [{type: token_topk, budget: 8}]
        """)
    summary = pd.read_csv(out / "summary.csv")
    assert summary["ppl_ratio"].iloc[0] == pytest.approx(1.0)  # the prefill's prediction
    assert summary["recall_open_loop"].isna().all()


def test_the_reference_trace_is_kvsim_capture_s_teacher_forced_trace(tmp_path):
    """The open-loop recall's trace (full attention's decode in the loop, one token per pass)
    is what ``kvsim capture --mode teacher_forced`` records for the same model, text, prompt
    and decode steps (chunked prefill, float16): the same tokens, and keys, values and
    queries equal within float16 rounding (SmolLM2, 64 + 8 positions)."""
    pytest.importorskip("gguf")
    from sim.closed_loop.perplexity import teacher_forced
    from sim.errors import CaptureError
    from sim.trace.capture import CaptureSettings, capture
    from sim.trace.format import open_trace
    from sim.trace.models import MODELS

    try:
        MODELS["smollm2-135m"].locate(Path(tmp_path))
    except CaptureError as exc:
        pytest.skip(str(exc))
    closed_loop._IDS.clear()
    task = {"task": "perplexity", "model": "smollm2-135m", "text": "pydoc", "prompt_len": 64,
            "tokens": 9, "bucket": 4}
    model, _tokenizer = closed_loop.load(task["model"])
    ids = closed_loop.text_ids(task)
    teacher_forced(model, ids, 64, 9, None, 0,
                   trace=closed_loop.trace_out(model, task, tmp_path / "ref", {"seed": 0}))
    captured = open_trace(capture(
        CaptureSettings(prompt_len=64, decode_steps=8, mode="teacher_forced", queries="all"),
        tmp_path / "cap", progress=False))
    reference = open_trace(tmp_path / "ref", verify=True)
    assert reference.tokens().tolist() == captured.tokens().tolist()
    for layer in (1, 14, 29):  # layer 0 has no speculative queries
        for kind in ("keys", "values", "queries", "speculative_queries"):
            ours, theirs = getattr(reference, kind)(layer), getattr(captured, kind)(layer)
            np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=2e-3, err_msg=kind)


def test_save_trace_is_refused_for_a_task_that_cannot_save_one():
    """Only the decodes of perplexity and agreement are written as traces (a task added later
    is refused before any run until it can)."""
    from sim.errors import ConfigError
    from sim.experiment.planning import _save_trace_setting

    task = {"task": "needle", "tokens": 8, "save_trace": True}
    with pytest.raises(ConfigError, match="save_trace: applies to task perplexity or "
                                          "agreement, not needle"):
        _save_trace_setting(task, "x")
    assert _save_trace_setting({**task, "task": "agreement"}, "x")["save_trace"] is True
    assert "save_trace" not in _save_trace_setting({**task, "save_trace": False}, "x")




NEEDLE_EXAMPLE = EXAMPLE.parent / "closed_loop_needle.yaml"


def _smollm2_needle_config(tmp_path: Path, policies: list[dict]) -> Path:
    """The needle example at CI size: a 256-token context, two facts, ``policies``."""
    return _smollm2_config(tmp_path, NEEDLE_EXAMPLE,
                           {"context_len": 256, "depths": [0.25, 0.75]}, policies)


def test_smoke_smollm2_needle(tmp_path):
    """CI size: the whole `kvsim run` needle path on SmolLM2, a 256-token pydoc context with
    two facts, one policy and full attention's reference (CPU time measured: 26 s to load the
    model, ~10 s for the two sets of answers). The facts sit at their token depths of the real
    tokenised context; SmolLM2 answers both under full attention at this length (measured:
    the reference the policy is scored against)."""
    from sim.closed_loop.needle import make_facts

    path = _smollm2_needle_config(tmp_path, [
        {"type": "dynakv", "budget": 32, "sink_tokens": 4, "recent_tokens": 4,
         "tokens_per_cluster": 4},
    ])
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out), "--quiet", "-j", "1"]) == 0
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert (row["task"], row["context_len"], row["needles"]) == ("needle", 256, 2)
    assert row["accuracy_full"] == 1.0
    assert row["accuracy_ratio"] == row["accuracy"]
    facts = make_facts(2, 0)
    suite = closed_loop.needle_suite(yaml.safe_load(
        next((out / "runs").glob("*/run.yaml")).read_text())["closed_loop"], 0)
    tokenizer = closed_loop.load("smollm2-135m")[1]
    for fact, depth, start, needle in zip(facts, [0.25, 0.75], suite.starts, suite.needles,
                                          strict=True):
        keep = suite.context[0] == tokenizer.bos_token_id
        assert start == keep + round(depth * (256 - keep - len(needle.fact)))
        assert tokenizer.decode(suite.context[start : start + len(needle.fact)]) == fact.text
    for run_dir in (out / "runs").iterdir():
        table = pd.read_csv(run_dir / CLOSED_LOOP_TABLE, dtype={"expected": str,
                                                                "answer": str})
        assert table["expected"].tolist() == [f.code for f in facts]
        assert table["correct"].tolist() == (table["answer"] == table["expected"]).tolist()


@pytest.mark.slow
def test_smollm2_needle_on_two_workers_and_dask_equals_one_worker(tmp_path):
    """-j 2 and a 2-worker Dask cluster give the summary of one worker (the timings aside)
    and byte-identical per-needle tables (each run uses one torch thread)."""
    distributed = pytest.importorskip("dask.distributed")
    from sim.experiment.planning import plan
    from sim.experiment.runner import execute

    path = _smollm2_needle_config(tmp_path, [
        {"type": "token_topk", "budget": 32},
        {"type": "streaming_llm", "budget": 32, "sink_tokens": 4},
    ])
    summaries, dirs = [], []
    for name, options in (("one", {"jobs": 1}), ("two", {"jobs": 2}), ("dask", None)):
        planned = plan(path, tmp_path / name)
        if options is None:
            with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                          dashboard_address=None) as cluster:
                summary, _ = execute(planned, scheduler=cluster.scheduler_address,
                                     progress=False, log=lambda message: None)
        else:
            summary, _ = execute(planned, progress=False, log=lambda message: None, **options)
        summaries.append(summary.drop(columns=["decode_s", "hook_s"]))
        dirs.append(planned.runs_dir)
    for summary in summaries[1:]:
        pd.testing.assert_frame_equal(summaries[0], summary)
    for run_id in summaries[0]["run_id"]:
        tables = {(d / run_id / CLOSED_LOOP_TABLE).read_bytes() for d in dirs}
        assert len(tables) == 1
