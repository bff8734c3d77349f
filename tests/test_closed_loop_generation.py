"""Long generation in the loop (sim/closed_loop/generation.py, recall.py and the ``generation``
task of ``kvsim run``): attention recall measured inside the model against a softmax written out
by hand, exactly 1 when the policy attends everything; the full-attention NLL of a generated
text against one uncached forward pass; per-bucket aggregation against hand-computed values;
determinism; and the task run from an experiment file with a tiny random model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from sim.policies import POLICIES
from tests.test_online import ONLINE

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sim.closed_loop.generation import (  # noqa: E402  (after the importorskips)
    compare_long_generation,
    full_attention_nll,
    generate,
    generation_table,
)
from sim.closed_loop.recall import accuracy_frame, step_accuracy  # noqa: E402
from sim.experiment import closed_loop  # noqa: E402
from tests.test_closed_loop import (  # noqa: E402, F401  (_one_thread: an autouse fixture)
    _one_thread,
    everything,
    text,
    tiny_gemma3,
    tiny_llama,
)
from tests.test_closed_loop_run import tiny  # noqa: E402, F401  (a fixture)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def hand_recall(query, keys, selected):
    """Share of softmax(q . k / sqrt(d)) over all of ``keys`` (the last one the current
    token) that falls on ``selected`` and the current token, in float64."""
    q, k = np.asarray(query, np.float64), np.asarray(keys, np.float64)
    logits = k @ q / math.sqrt(q.shape[-1])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    chosen = np.zeros(len(k), bool)
    chosen[np.asarray(selected, np.int64)] = True
    chosen[-1] = True
    return float(p[chosen].sum())


# --------------------------------------------------------------------------------------------
# recall of one step
# --------------------------------------------------------------------------------------------


def test_step_accuracy_on_a_hand_built_selection():
    """Two KV heads of three query heads each, 9 stored positions + the current token: each
    query head's recall is its KV head's selected softmax mass, computed by hand."""
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((6, 8)).astype(np.float32) * 2
    keys = rng.standard_normal((2, 10, 8)).astype(np.float32)
    values = rng.standard_normal((2, 10, 8)).astype(np.float32)
    selection = [np.array([0, 3, 8], np.int32), np.array([5], np.int32)]
    got = step_accuracy(queries, keys, values, selection)
    for head in range(6):
        kv = head // 3
        assert got["attention_recall"][head] == pytest.approx(
            hand_recall(queries[head], keys[kv], selection[kv]), rel=1e-6)
    assert got["n_selected"].tolist() == [3, 3, 3, 1, 1, 1]
    # every stored position selected: recall 1 exactly; None (full attention): 1 as well
    everything_ = [np.arange(9, dtype=np.int32)] * 2
    assert (step_accuracy(queries, keys, values, everything_)["attention_recall"] == 1.0).all()
    assert (step_accuracy(queries, keys, values, None)["attention_recall"] == 1.0).all()
    # nothing selected: the current token's own mass
    nothing = [np.zeros(0, np.int32)] * 2
    alone = step_accuracy(queries, keys, values, nothing)["attention_recall"]
    assert alone[4] == pytest.approx(hand_recall(queries[4], keys[1], []), rel=1e-6)


def test_step_accuracy_refuses_a_selection_outside_the_stored_context():
    keys = np.zeros((1, 5, 4), np.float32)
    with pytest.raises(ValueError, match="outside its step's stored context"):
        step_accuracy(np.zeros((2, 4), np.float32), keys, keys, [np.array([4], np.int32)])
    with pytest.raises(ValueError, match="selection has 2 KV heads"):
        step_accuracy(np.zeros((2, 4), np.float32), keys, keys, [np.array([0])] * 2)


# --------------------------------------------------------------------------------------------
# recall in the loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ONLINE))
def test_recall_in_the_loop_is_exactly_one_when_the_policy_attends_everything(llama, name):
    run = generate(llama, text(60), 12, POLICIES.create(everything(name)), recall_every=1)
    frame = accuracy_frame(run.controller.accuracy, 60)
    assert len(frame) == 11 * 3 * 6  # every decode step, layer and query head
    assert (frame["attention_recall"] == 1.0).all()
    assert (frame["topk_recall"] == 1.0).all()


def test_recall_in_the_loop_is_the_softmax_mass_of_the_loop_s_own_selection(llama):
    """The loop's recorded queries, keys and selections (record=True), recall written out by
    hand: equal to the in-loop figure on every scored step, layer and query head."""
    from sim.closed_loop.driver import decode

    policy = POLICIES.create({"type": "token_topk", "budget": 10, "sink_tokens": 2})
    run = decode(llama, text(60), 14, policy, record=True, recall_every=4)
    controller = run.controller
    frame = accuracy_frame(controller.accuracy, 60)
    assert sorted(frame["step"].unique()) == [0, 4, 8, 12]
    for row in frame.itertuples():
        keys = np.concatenate(controller.recorded_keys[row.layer], axis=1)
        queries = np.concatenate(controller.recorded_queries[row.layer], axis=1)
        position = 60 + row.step
        kv = row.q_head // 3
        selected = controller.selections[row.step][row.layer][kv]
        assert len(selected) == 10 and row.n_selected == 10
        expected = hand_recall(queries[row.q_head, position], keys[kv, : position + 1],
                               selected)
        assert row.attention_recall == pytest.approx(expected, rel=1e-5)
    assert frame["attention_recall"].min() < 0.99  # a real selection misses mass
    assert controller.recall_s > 0


def test_only_global_layers_are_scored_in_a_model_with_sliding_windows():
    model = tiny_gemma3()
    run = generate(model, text(40), 10, POLICIES.create({"type": "token_topk", "budget": 8}),
                   recall_every=3)
    frame = accuracy_frame(run.controller.accuracy, 40)
    assert set(frame["layer"]) == {1}
    assert sorted(frame["step"].unique()) == [0, 3, 6]
    assert set(frame["q_head"]) == {0, 1, 2, 3}


def test_scoring_the_recall_changes_nothing_the_loop_computes(llama):
    from sim.closed_loop.driver import decode

    spec = {"type": "clusterkv", "budget": 12, "sink_tokens": 2, "tokens_per_cluster": 8,
            "update_interval": 6}
    plain = decode(llama, text(60), 20, POLICIES.create(spec), keep_logits=True)
    scored = decode(llama, text(60), 20, POLICIES.create(spec), keep_logits=True,
                    recall_every=1)
    np.testing.assert_array_equal(plain.logits, scored.logits)
    assert plain.controller.accuracy == [] and len(scored.controller.accuracy) == 19 * 3
    assert min(float(r[2]["attention_recall"].min()) for r in scored.controller.accuracy) < 1


def test_generation_is_deterministic(llama):
    spec = {"type": "dynakv", "budget": 0.2, "tokens_per_cluster": 8, "buffer_max": 2}
    first = generate(llama, text(60), 30, POLICIES.create(spec), seed=2, recall_every=2)
    again = generate(llama, text(60), 30, POLICIES.create(spec), seed=2, recall_every=2)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    pd.testing.assert_frame_equal(accuracy_frame(first.controller.accuracy, 60),
                                  accuracy_frame(again.controller.accuracy, 60))


# --------------------------------------------------------------------------------------------
# quality of the text
# --------------------------------------------------------------------------------------------


def test_full_attention_nll_is_one_uncached_forward_pass(llama):
    """Chunked through the cache (3 positions per pass) or not: the NLLs of one plain forward
    pass over prompt + tokens; and for full attention's own greedy text, the decode's own."""
    prompt = text(50)
    reference = generate(llama, prompt, 13, None)
    tokens = reference.tokens.tolist()
    with torch.inference_mode():
        logits = llama(input_ids=torch.tensor([prompt + tokens])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    expected = np.array([-logp[49 + i, t] for i, t in enumerate(tokens)])
    for chunk in (3, 512):
        got = full_attention_nll(llama, prompt, tokens, chunk=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(full_attention_nll(llama, prompt, tokens), reference.nll,
                               rtol=1e-5)
    other = [(t + 5) % 97 for t in tokens]  # any text is scored, not only the model's own
    np.testing.assert_allclose(
        full_attention_nll(llama, prompt, other, chunk=4),
        [-logp_other for logp_other in _plain_nll(llama, prompt, other)], rtol=1e-5)


def _plain_nll(model, prompt, tokens):
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    return [logp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)]


def test_full_attention_nll_refuses_what_does_not_fit(llama):
    from sim.closed_loop.driver import prefill

    shared = prefill(llama, text(20), 25)
    with pytest.raises(ValueError, match="exceeds the prefill's capacity of 25"):
        full_attention_nll(llama, text(20), list(range(6)), shared)
    with pytest.raises(ValueError, match="another prompt"):
        full_attention_nll(llama, text(20, seed=1), list(range(3)), shared)
    with pytest.raises(ValueError, match="no tokens"):
        full_attention_nll(llama, text(20), [], shared)


def test_generation_table_buckets_by_hand():
    """7 generated positions after a 10-token prompt in buckets of 3: positions 10-12, 13-15,
    16; recall rows at steps 0, 2, 4, 6 (positions 10, 12, 14, 16), two layers, one head."""
    tokens = np.array([1, 2, 3, 4, 5, 6, 7])
    full = np.array([1, 2, 0, 4, 0, 0, 7])
    nll = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    nll_full = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0])
    rows = []
    for step, (a, b) in zip((0, 2, 4, 6), ((0.9, 0.7), (0.5, 0.3), (0.6, 0.2), (0.1, 0.3)),
                            strict=True):
        for layer, recall in enumerate((a, b)):
            rows.append((step, layer, {"attention_recall": np.array([recall]),
                                       "topk_recall": np.array([recall / 2]),
                                       "output_rel_error": np.array([1 - recall]),
                                       "n_selected": np.array([3])}))
    accuracy = accuracy_frame(rows, 10)
    table = generation_table(tokens, full, nll, nll_full, accuracy, 10, 3)
    assert list(table["bucket"]) == ["10-12", "13-15", "16-16", "all"]
    assert list(table["tokens"]) == [3, 3, 1, 7]
    np.testing.assert_allclose(table["match_share"], [2 / 3, 1 / 3, 1.0, 4 / 7])
    np.testing.assert_allclose(table["mean_nll"], [2.0, 5.0, 7.0, 4.0])
    np.testing.assert_allclose(table["mean_nll_full"], [1.0, 2.0, 4.0, 13 / 7])
    np.testing.assert_allclose(table["ppl_ratio"], np.exp([1.0, 3.0, 3.0, 4 - 13 / 7]))
    # bucket 10-12: steps 0 and 2 (0.9, 0.7, 0.5, 0.3); 13-15: step 4; 16: step 6
    np.testing.assert_allclose(table["loop_recall"], [0.6, 0.4, 0.2, 0.45])
    np.testing.assert_allclose(table["loop_topk_recall"], [0.3, 0.2, 0.1, 0.225])
    np.testing.assert_allclose(table["loop_output_rel_error"], [0.4, 0.6, 0.8, 0.55])
    assert list(table["scored_steps"]) == [2, 1, 1, 4]
    # a bucket without a scored step has no recall
    sparse = generation_table(tokens, full, nll, nll_full, accuracy[accuracy["step"] != 4],
                              10, 3)
    assert math.isnan(sparse.loc[1, "loop_recall"]) and sparse.loc[1, "scored_steps"] == 0
    with pytest.raises(ValueError, match="bucket must be >= 1"):
        generation_table(tokens, full, nll, nll_full, accuracy, 10, 0)


def test_compare_long_generation_states_each_policy_against_full_attention(llama):
    policies = [POLICIES.create({"type": "token_topk", "budget": 1.0}),
                POLICIES.create({"type": "streaming_llm", "budget": 8, "sink_tokens": 2})]
    table = compare_long_generation(llama, text(40), 24, policies, bucket=8, recall_every=2)
    whole = table[table["bucket"] == "all"].set_index("policy")
    everything_ = whole.loc["token_topk(budget=1.0)"]
    assert everything_["match_share"] == 1.0 and everything_["ppl_ratio"] == 1.0
    assert everything_["loop_recall"] == 1.0 and everything_["scored_steps"] == 12
    window = whole.loc["streaming_llm(budget=8)"]
    assert window["loop_recall"] < 1.0
    assert window["mean_nll_full"] == everything_["mean_nll_full"]


# --------------------------------------------------------------------------------------------
# kvsim run with task: generation (tiny model, character tokenizer)
# --------------------------------------------------------------------------------------------

GENERATION = """\
    name: gen
    closed_loop: {task: generation, prompt_len: 40, tokens: 20, bucket: 8, recall_every: 3}
    policies:
      - {type: full}
      - {type: token_topk, budget: 8}
      - {type: streaming_llm, budget: 8, sink_tokens: 2}
    sweep:
      grid:
        policy.budget: [8, 12]
    """


def _kvsim_run(tmp_path, text_, *extra):
    """``kvsim run`` of ``text_`` into ``tmp_path/out`` (``-j 1`` unless ``extra`` says)."""
    from tests.test_closed_loop_run import _run

    tmp_path.mkdir(parents=True, exist_ok=True)
    return _run(tmp_path, text_, *extra)


@pytest.mark.usefixtures("tiny")
def test_the_generation_task_writes_per_bucket_records_equal_to_the_library(tmp_path):
    from sim.closed_loop.agreement import agreement
    from sim.result_files import CLOSED_LOOP_TABLE, CLOSED_LOOP_TOKENS, LOOP_ACCURACY
    from tests.test_closed_loop_run import _runs, _text_ids

    out = _kvsim_run(tmp_path, GENERATION, "-j", "1")
    model = closed_loop.load("smollm2-135m")[0]  # the tiny model in its place
    runs = _runs(out)
    assert set(runs) == {"full@None", "token_topk@8", "token_topk@12", "streaming_llm@8",
                         "streaming_llm@12"}
    prompt = _text_ids(40)
    reference = generate(model, prompt, 20, None)
    nll_full = full_attention_nll(model, prompt, reference.tokens)
    for key, run in runs.items():
        row = run["row"]
        policy = POLICIES.create(run["settings"]["policy"])
        fresh = generate(model, prompt, 20, policy, recall_every=3)  # no reuse, fresh prefill
        tokens = pd.read_parquet(run["dir"] / CLOSED_LOOP_TOKENS)
        assert tokens["token"].tolist() == fresh.tokens.tolist(), key
        assert tokens["token_full"].tolist() == reference.tokens.tolist()
        np.testing.assert_allclose(tokens["nll_full"], nll_full, rtol=1e-5)
        np.testing.assert_allclose(tokens["nll"], full_attention_nll(model, prompt,
                                                                     fresh.tokens), rtol=1e-5)
        assert (row["first_divergence"], row["match_share"]) == agreement(reference.tokens,
                                                                           fresh.tokens)
        accuracy = pd.read_parquet(run["dir"] / LOOP_ACCURACY)
        assert sorted(accuracy["step"].unique()) == [0, 3, 6, 9, 12, 15, 18]
        expected = accuracy_frame(fresh.controller.accuracy, 40)
        np.testing.assert_allclose(accuracy["attention_recall"], expected["attention_recall"],
                                   rtol=1e-5)
        assert row["loop_recall"] == pytest.approx(accuracy["attention_recall"].mean())
        table = pd.read_csv(run["dir"] / CLOSED_LOOP_TABLE)
        assert list(table["bucket"]) == ["40-47", "48-55", "56-59", "all"]
        assert row["loop_recall_last"] == pytest.approx(table.iloc[-2]["loop_recall"])
        parts = table.iloc[:-1]
        assert (parts["tokens"] * parts["mean_nll"]).sum() / 20 == pytest.approx(row["mean_nll"])
        assert row["ppl_ratio"] == pytest.approx(math.exp(row["mean_nll"] - row["mean_nll_full"]))
        assert row["recall_every"] == 3
    full = runs["full@None"]["row"]
    assert full["loop_recall"] == 1.0 and full["ppl_ratio"] == 1.0
    assert full["first_divergence"] == 20
    assert runs["streaming_llm@8"]["row"]["loop_recall"] < 1.0
    summary = pd.read_csv(out / "summary.csv")
    assert {"first_divergence", "match_share", "mean_nll", "mean_nll_full", "ppl_ratio",
            "loop_recall", "loop_recall_last", "loop_topk_recall", "recall_s"} <= set(summary)


@pytest.mark.usefixtures("tiny")
def test_the_generation_summary_is_byte_identical_with_one_or_two_workers(tmp_path):
    one = _kvsim_run(tmp_path / "a", GENERATION, "-j", "1")
    for cache in (closed_loop._PREFILLED, closed_loop._REFERENCES):  # the workers recompute
        cache.clear()
    two = _kvsim_run(tmp_path / "b", GENERATION, "-j", "2")
    timing = ["decode_s", "hook_s", "recall_s"]
    first = pd.read_csv(one / "summary.csv").drop(columns=timing)
    second = pd.read_csv(two / "summary.csv").drop(columns=timing)
    assert first.to_csv() == second.to_csv()
    for run_dir in (one / "runs").iterdir():
        for name in ("closed_loop.csv", "tokens.parquet", "loop_accuracy.parquet"):
            assert (run_dir / name).read_bytes() == (two / "runs" / run_dir.name
                                                     / name).read_bytes(), name


@pytest.mark.usefixtures("tiny")
def test_a_finished_generation_run_is_resumed_not_recomputed(tmp_path, monkeypatch):
    out = _kvsim_run(tmp_path, GENERATION, "-j", "1")
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    first = json.loads(next(iter(before)).read_text())
    monkeypatch.setattr(closed_loop, "run_closed_loop_group",
                        lambda *a, **k: pytest.fail("a complete run was run again"))
    _kvsim_run(tmp_path, GENERATION, "-j", "1")
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert json.loads(next(iter(before)).read_text()) == first


@pytest.mark.parametrize(("block", "expected"), [
    ("{task: generation, prompt_len: 40, tokens: 8200}",
     "closed_loop.tokens: prompt_len + tokens = 8240 exceeds smollm2-135m's 8192 positions"),
    ("{task: generation, prompt_len: 40, tokens: 8, recall_every: 0}",
     "closed_loop.recall_every: Input should be greater than or equal to 1"),
    ("{task: agreement, prompt_len: 40, tokens: 8, recall_every: 4}",
     "closed_loop: recall_every applies only to task generation"),
    ("{task: generation, prompt_len: 40, tokens: 8, bucket: 0}",
     "closed_loop.bucket: Input should be greater than or equal to 1"),
])
@pytest.mark.usefixtures("tiny")
def test_bad_generation_blocks_fail_in_one_line(tmp_path, capsys, block, expected):
    from tests.test_closed_loop_run import _bad

    line = _bad(tmp_path, capsys, f"name: gen\nclosed_loop: {block}\n"
                                  "policies: [{type: token_topk, budget: 8}]\n")
    assert expected in line


def test_the_example_experiment_plans_its_runs():
    """experiments/closed_loop_long_generation.yaml: valid, 2,048 generated tokens, the
    policies the long-decoding experiments compare plus token top-k, budgets of 5 and 10%."""
    from pathlib import Path

    from sim.experiment.planning import plan

    path = Path(__file__).resolve().parents[1] / "experiments" / \
        "closed_loop_long_generation.yaml"
    planned = plan(path, "/nonexistent/not-written")
    tasks = {json.dumps(r.closed_loop, sort_keys=True) for r in planned.runs}
    assert len(tasks) == 1
    task = planned.runs[0].closed_loop
    assert task["task"] == "generation" and task["tokens"] >= 2048
    assert {r.policy["type"] for r in planned.runs} == {"token_topk", "static_clusters",
                                                        "clusterkv", "dynakv"}
    assert {r.policy["budget"] for r in planned.runs} == {0.05, 0.1}
    assert not Path("/nonexistent/not-written").exists()


# --------------------------------------------------------------------------------------------
# the real model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_generation_smoke(tmp_path):
    """The example experiment on SmolLM2 at CI size (64-token prompt, 24 tokens): full
    attention's recall is 1 and its text is full attention's; DynaKV's recall is below 1."""
    from pathlib import Path

    import yaml

    from sim.cli import main
    from sim.errors import CaptureError
    from sim.trace.models import MODELS

    pytest.importorskip("gguf")
    try:
        MODELS["smollm2-135m"].locate(Path(tmp_path))
    except CaptureError as exc:
        pytest.skip(str(exc))
    example = Path(__file__).resolve().parents[1] / "experiments" / \
        "closed_loop_long_generation.yaml"
    config = yaml.safe_load(example.read_text())
    config["closed_loop"].update(prompt_len=64, tokens=24, bucket=8, recall_every=4)
    config["policies"] = [{"type": "full"}, {"type": "dynakv", "budget": 16, "sink_tokens": 4,
                                                   "recent_tokens": 4, "tokens_per_cluster": 4}]
    config.pop("sweep")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out), "--quiet", "-j", "1"]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("run")
    assert summary.loc["full", "loop_recall"] == 1.0
    assert summary.loc["full", "ppl_ratio"] == 1.0
    assert summary.loc["full", "first_divergence"] == 24
    assert 0 < summary.loc["dynakv", "loop_recall"] < 1.0
    assert np.isfinite(summary.loc["dynakv", "mean_nll"])
