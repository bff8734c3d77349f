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
     "closed_loop: bucket applies only to task perplexity"),
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
     "closed_loop: prompt_len applies to tasks perplexity and agreement"),
    ("{task: needle, tokens: 8}", "[{type: full}]", "closed_loop: tokens applies to tasks"),
    ("{task: needle, bucket: 8}", "[{type: full}]", "bucket applies only to task perplexity"),
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
