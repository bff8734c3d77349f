"""A policy inside the model's attention (sim/closed_loop): the hook changes nothing when the
policy attends everything, masks exactly the positions selected otherwise, leaves
sliding-window layers alone, and is deterministic for a seed.

Small randomly initialised transformers models (Llama with grouped-query attention, Gemma 3
with sliding-window layers) stand in for the real ones, so these run in seconds; one slow test
runs SmolLM2-135M itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from sim.policies import POLICIES
from tests.test_online import ONLINE, NoOnlineForm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sim.closed_loop.attention import (  # noqa: E402  (after the importorskips)
    PolicyController,
    model_sliding_windows,
    policy_attention,
    restricted_attention,
)
from sim.closed_loop.perplexity import (  # noqa: E402
    compare_perplexity,
    perplexity_table,
    teacher_forced,
)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_llama(seed: int = 0):
    """3 layers, 6 query heads on 2 KV heads (GQA), head_dim 8, random weights."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gemma3(seed: int = 0):
    """Gemma 3 layout: sliding-window (16) layers around one global layer."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        sliding_window=16, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return transformers.Gemma3ForCausalLM(config).eval()


def text(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 97, n).tolist()


def everything(name: str) -> dict:
    """``name`` attending everything: a budget of the whole context, small clusters."""
    spec: dict = {"type": name}
    if name != "full":
        spec["budget"] = 1.0
    if name in ("static_clusters", "clusterkv", "dynakv"):
        spec["tokens_per_cluster"] = 8
    if name == "clusterkv":
        spec["update_interval"] = 6  # local updates happen within the run
    return spec


# --------------------------------------------------------------------------------------------
# The restricted attention against a masked softmax written out by hand
# --------------------------------------------------------------------------------------------


def reference_attention(query, key, value, selection, scale):
    """Per query head q (KV head q // G): softmax over the selected positions and the last
    (current) one, in float64."""
    q, k, v = (np.asarray(t[0], np.float64) for t in (query, key, value))
    n_q, n_kv = q.shape[0], k.shape[0]
    out = np.empty((n_q, v.shape[-1]))
    for head in range(n_q):
        h = head // (n_q // n_kv)
        allowed = np.zeros(k.shape[1], bool)
        allowed[selection[h]] = True
        allowed[-1] = True
        logits = np.where(allowed, k[h] @ q[head, 0] * scale, -np.inf)
        weights = np.exp(logits - logits.max())
        out[head] = (weights / weights.sum()) @ v[h]
    return out


class _Attn:
    layer_idx = 0
    num_key_value_groups = 3


@pytest.mark.parametrize("selection", [
    [np.array([0, 3, 4]), np.array([1, 2, 6])],  # equal sizes: gathered
    [np.array([5]), np.array([0, 1, 2, 3, 4, 5, 6])],  # unequal: a boolean mask
    [np.array([], np.int64), np.array([], np.int64)],  # the current token alone
])
def test_restricted_attention_attends_exactly_the_selection_and_the_current_token(selection):
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(1, 6, 1, 4, generator=gen)
    key = torch.randn(1, 2, 8, 4, generator=gen)  # 7 stored positions + the current one
    value = torch.randn(1, 2, 8, 4, generator=gen)
    out, weights = restricted_attention(_Attn(), query, key, value, selection, 0.5)
    assert weights is None and out.shape == (1, 1, 6, 4)
    np.testing.assert_allclose(out[0, 0].numpy(), reference_attention(query, key, value,
                                                                        selection, 0.5),
                               rtol=1e-5, atol=1e-6)


def test_a_selected_position_changes_the_output_and_an_unselected_one_does_not():
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(1, 2, 1, 4, generator=gen)
    key = torch.randn(1, 1, 6, 4, generator=gen)
    value = torch.randn(1, 1, 6, 4, generator=gen)
    selection = [np.array([1, 3])]
    base, _ = restricted_attention(_Attn(), query, key, value, selection, None)
    for position, matters in [(0, False), (1, True), (2, False), (3, True), (5, True)]:
        changed = value.clone()
        changed[0, 0, position] += 10.0
        out, _ = restricted_attention(_Attn(), query, key, changed, selection, None)
        assert (not torch.equal(out, base)) == matters, position


# --------------------------------------------------------------------------------------------
# In a model: budget = everything changes nothing; sliding layers keep their window
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_reference(llama):
    return teacher_forced(llama, text(120), 80, 30, None, keep_logits=True)


@pytest.mark.parametrize("name", sorted(ONLINE))
def test_every_online_policy_attending_everything_reproduces_the_models_logits(
    llama, llama_reference, name
):
    run = teacher_forced(llama, text(120), 80, 30, POLICIES.create(everything(name)),
                         keep_logits=True, record=True)
    np.testing.assert_allclose(run.logits, llama_reference.logits, rtol=0, atol=2e-5)
    assert len(run.controller.selections) == 29  # every decode step, every layer selected
    assert all(sorted(step) == [0, 1, 2] for step in run.controller.selections)


def test_the_hook_without_a_policy_is_the_models_own_sdpa(llama, llama_reference):
    ids = text(120)
    with torch.inference_mode():
        logits = llama(input_ids=torch.tensor([ids[:110]])).logits[0, 79:109].numpy()
    # the stock model over the whole text at once: the same predictions, up to float error
    np.testing.assert_allclose(llama_reference.logits, logits, rtol=0, atol=2e-5)


def test_a_small_budget_changes_the_predictions_and_is_deterministic(llama, llama_reference):
    spec = {"type": "dynakv", "budget": 0.1, "tokens_per_cluster": 8, "buffer_max": 2}
    first = teacher_forced(llama, text(120), 80, 30, POLICIES.create(spec), seed=3,
                           keep_logits=True)
    again = teacher_forced(llama, text(120), 80, 30, POLICIES.create(spec), seed=3,
                           keep_logits=True)
    np.testing.assert_array_equal(first.logits, again.logits)
    np.testing.assert_array_equal(first.nll, again.nll)
    assert np.abs(first.logits - llama_reference.logits).max() > 1e-3
    np.testing.assert_array_equal(first.logits[0], llama_reference.logits[0])  # the prefill's


def test_the_selections_in_the_loop_hold_the_budget(llama):
    policy = POLICIES.create({"type": "token_topk", "budget": 12, "sink_tokens": 2})
    run = teacher_forced(llama, text(120), 80, 10, policy, record=True)
    for step, layers in enumerate(run.controller.selections):
        for selection in layers.values():
            assert len(selection) == 2  # KV heads
            for positions in selection:
                assert len(positions) == 12 and positions[:2].tolist() == [0, 1]
                assert positions.max() < 80 + step and np.all(np.diff(positions) > 0)


def test_sliding_window_layers_keep_their_window():
    model = tiny_gemma3()
    assert model_sliding_windows(model) == [16, None, 16]
    ids = text(90)
    reference = teacher_forced(model, ids, 40, 30, None, keep_logits=True)
    run = teacher_forced(model, ids, 40, 30, POLICIES.create(everything("dynakv")),
                         keep_logits=True, record=True)
    np.testing.assert_allclose(run.logits, reference.logits, rtol=0, atol=2e-5)
    assert sorted(run.controller.layers) == [1]  # only the global layer has a policy
    small = teacher_forced(model, ids, 40, 30, POLICIES.create({"type": "token_topk",
                                                                 "budget": 0.2}),
                           record=True)
    assert all(list(step) == [1] for step in small.controller.selections)
    assert not np.allclose(small.nll, reference.nll)


# --------------------------------------------------------------------------------------------
# Perplexity tables and bad input
# --------------------------------------------------------------------------------------------


def test_perplexity_table_buckets_by_position():
    nll = np.array([1.0, 3.0, 2.0, 2.0, 0.5])
    table = perplexity_table(nll, 100, 2)
    assert table["bucket"].tolist() == ["100-101", "102-103", "104-104", "all"]
    assert table["tokens"].tolist() == [2, 2, 1, 5]
    np.testing.assert_allclose(table["mean_nll"], [2.0, 2.0, 0.5, 1.7])
    np.testing.assert_allclose(table["perplexity"], np.exp([2.0, 2.0, 0.5, 1.7]))


def test_compare_perplexity_states_each_policy_against_full_attention(llama):
    policies = [POLICIES.create(everything("token_topk")),
                POLICIES.create({"type": "streaming_llm", "budget": 8})]
    table = compare_perplexity(llama, text(120), 80, 30, policies, bucket=10)
    assert table["policy"].unique().tolist() == [
        "full (model)", "token_topk(budget=1.0)", "streaming_llm(budget=8)"]
    topk = table[table["policy"] == "token_topk(budget=1.0)"]
    np.testing.assert_allclose(topk["delta_nll"], 0.0, atol=1e-5)
    streaming = table[table["policy"] == "streaming_llm(budget=8)"]
    assert streaming["bucket"].tolist() == ["80-89", "90-99", "100-109", "all"]
    np.testing.assert_allclose(streaming["ppl_ratio"], np.exp(streaming["delta_nll"]))
    assert streaming["delta_nll"].abs().max() > 1e-4


@pytest.mark.parametrize("n_ids, prompt, tokens, message", [
    (50, 40, 20, "the text has 50 tokens, fewer than the prompt and continuation"),
    (400, 200, 100, "prompt \\+ continuation = 300 exceeds the model's 256 positions"),
    (50, 1, 5, "need a prompt of >= 2 tokens"),
])
def test_lengths_that_do_not_fit_are_refused_before_any_forward_pass(
    llama, n_ids, prompt, tokens, message
):
    with pytest.raises(ValueError, match=message):
        teacher_forced(llama, text(n_ids), prompt, tokens, None)


def test_a_policy_without_an_online_form_is_refused(llama):
    with pytest.raises(NotImplementedError, match="no online"):
        teacher_forced(llama, text(60), 40, 5, NoOnlineForm())


def test_one_controller_at_a_time():
    controller = PolicyController(POLICIES.create({"type": "full"}), [None], 10)
    with policy_attention(controller), pytest.raises(RuntimeError, match="already active"):
        with policy_attention(controller):
            pass
    with pytest.raises(ValueError, match="no global attention layer"):
        with policy_attention(PolicyController(POLICIES.create({"type": "full"}), [4], 10)):
            pass


# --------------------------------------------------------------------------------------------
# The real model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_with_every_cluster_policy_attending_everything_is_the_model():
    from sim.trace.models import load_model

    try:
        loaded = load_model("smollm2-135m", progress=False)
    except Exception as exc:  # noqa: BLE001 - the model package is optional
        pytest.skip(f"SmolLM2-135M unavailable: {exc}")
    ids = loaded.tokenizer("def main():\n    " * 40)["input_ids"]
    reference = teacher_forced(loaded.model, ids, 96, 8, None, keep_logits=True)
    for name in ("clusterkv", "dynakv", "static_clusters"):
        spec = everything(name)
        run = teacher_forced(loaded.model, ids, 96, 8, POLICIES.create(spec), keep_logits=True)
        np.testing.assert_allclose(run.logits, reference.logits, rtol=0, atol=1e-3)
        np.testing.assert_allclose(run.nll, reference.nll, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Generation agreement
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference, tokens, first, share", [
    ([1, 2, 3, 4], [1, 2, 5, 4], 2, 0.75),
    ([1, 2, 3, 4], [1, 2, 3, 4], 4, 1.0),
    ([1, 2, 3, 4], [9, 2, 3, 9], 0, 0.5),
])
def test_agreement_counts_tokens_before_the_first_divergence_and_matching_positions(
    reference, tokens, first, share
):
    from sim.closed_loop.agreement import agreement

    assert agreement(np.array(reference), np.array(tokens)) == (first, share)


def test_agreement_refuses_sequences_of_different_lengths():
    from sim.closed_loop.agreement import agreement

    with pytest.raises(ValueError, match="one length"):
        agreement(np.array([1, 2]), np.array([1]))


def test_greedy_decode_without_a_policy_is_transformers_greedy_generation(llama):
    from sim.closed_loop.driver import decode

    prompt = text(60)
    run = decode(llama, prompt, 12)
    with torch.inference_mode():
        generated = llama.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   min_new_tokens=12)
    np.testing.assert_array_equal(run.tokens, generated[0, 60:].numpy())


def test_generation_agreement_of_full_budget_and_small_budget_policies(llama):
    from sim.closed_loop.agreement import compare_generation

    policies = [POLICIES.create(everything("clusterkv")),
                POLICIES.create({"type": "streaming_llm", "budget": 4, "sink_tokens": 1})]
    table = compare_generation(llama, text(80), 20, policies)
    assert table["policy"].tolist() == ["full (model)", "clusterkv(budget=1.0)",
                                        "streaming_llm(budget=4)"]
    assert table["first_divergence"].tolist()[:2] == [20, 20]
    assert table["match_share"].tolist()[:2] == [1.0, 1.0]
    again = compare_generation(llama, text(80), 20, policies[1:])
    assert again.iloc[1].to_dict() == table.iloc[2].to_dict()  # deterministic
    assert table.iloc[2]["first_divergence"] < 20  # 4 tokens of 80+ change the greedy text


def test_infinigen_in_the_loop_selects_from_queries_speculated_from_the_previous_layer(llama):
    """alpha = 0 fetches about one token per step: each global layer >= 1 needs its
    speculated query (the hook projects the previous layer's input), layer 0 its own."""
    policy = POLICIES.create({"type": "infinigen", "budget": 1.0, "alpha": 0.0,
                              "partial_ratio": 0.5})
    run = teacher_forced(llama, text(120), 80, 12, policy, record=True)
    for step, layers in enumerate(run.controller.selections):
        assert sorted(layers) == [0, 1, 2]
        for selection in layers.values():
            assert all(1 <= len(p) < 80 + step for p in selection)
    assert run.controller.speculative == {}  # every speculated query was used

    from sim.policies.online import online_layer

    layer = online_layer(policy, 1, 2, 20, np.random.default_rng(0))
    layer.prefill(np.ones((2, 4, 8), np.float32), np.ones((6, 4, 8), np.float32))
    with pytest.raises(ValueError, match="speculative queries"):
        layer.select(np.ones((6, 8)), np.ones((2, 8)))


#: policies whose open-loop pass is compared with the loop's selections
LOOP_SPECS = [
    {"type": "dynakv", "budget": 0.15, "tokens_per_cluster": 8, "buffer_max": 2,
     "tau_quantile": 0.3},
    {"type": "clusterkv", "budget": 0.2, "tokens_per_cluster": 8, "update_interval": 5,
     "full_layers": 1},
    {"type": "token_topk", "budget": 0.1},
    {"type": "h2o", "budget": 0.2},
    {"type": "quest", "budget": 0.2, "page_tokens": 4, "full_layers": 0},
]


def assert_the_loop_s_selections(controller, selected) -> None:
    """``selected(layer)`` (the open-loop pass's LayerSelection of a global layer) makes the
    selections the loop made at every decode step and KV head."""
    for layer in sorted(controller.layers):
        want = selected(layer)
        for step, layers in enumerate(controller.selections):
            if want.heads is None:
                assert layers[layer] is None
                continue
            for h, positions in enumerate(layers[layer]):
                np.testing.assert_array_equal(positions, want.heads[h].at(step))


@pytest.mark.parametrize("spec", LOOP_SPECS)
def test_the_open_loop_pass_over_the_loop_s_own_trace_makes_the_loop_s_selections(llama, spec):
    """One policy, two drivers: the keys and queries the model produced under the policy,
    handed to the vectorised pass as a trace layer, give the selections made in the loop."""
    policy = POLICIES.create(spec)
    run = teacher_forced(llama, text(120), 80, 25, policy, seed=4, record=True)
    controller = run.controller
    for layer in sorted(controller.layers):
        ctx = controller.layer_context(layer)
        assert ctx.keys.shape[1] == 80 + 24 and ctx.decode_steps == 24
    assert_the_loop_s_selections(
        controller, lambda layer: policy.select_layer(controller.layer_context(layer)))


@pytest.mark.slow
def test_gemma3_with_policies_attending_everything_is_the_model_and_sliding_layers_stay():
    from sim.trace.models import load_model

    try:
        loaded = load_model("gemma3-270m", progress=False)
    except Exception as exc:  # noqa: BLE001 - the gemma extra is optional
        pytest.skip(f"Gemma 3 270M unavailable: {exc}")
    windows = model_sliding_windows(loaded.model)
    assert windows.count(None) == 3 and len(windows) == 18  # 5 local : 1 global
    ids = loaded.tokenizer("import os\nprint(os.getcwd())\n" * 80)["input_ids"]
    prompt = windows[0] + 40  # past the 512-token window: the local layers slide
    reference = teacher_forced(loaded.model, ids, prompt, 6, None, keep_logits=True)
    for name in ("dynakv", "token_topk"):
        run = teacher_forced(loaded.model, ids, prompt, 6, POLICIES.create(everything(name)),
                             keep_logits=True, record=True)
        np.testing.assert_allclose(run.logits, reference.logits, rtol=0, atol=1e-3)
        assert sorted(run.controller.layers) == [i for i, w in enumerate(windows) if w is None]


# --------------------------------------------------------------------------------------------
# One prefill, reused by every policy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    None,
    {"type": "dynakv", "budget": 0.15, "tokens_per_cluster": 8, "buffer_max": 2},
    {"type": "clusterkv", "budget": 0.2, "tokens_per_cluster": 8, "update_interval": 5},
    {"type": "h2o", "budget": 0.2},
    {"type": "infinigen", "budget": 0.5, "alpha": 1.0},
])
def test_a_reused_prefill_decodes_exactly_as_a_fresh_one(llama, spec):
    from sim.closed_loop.driver import decode, prefill

    ids = text(120)
    prefilled = prefill(llama, ids[:80], 110)
    for teacher in (ids[80:100], None):  # teacher-forced, then greedy
        fresh = decode(llama, ids[:80], 20, spec and POLICIES.create(spec), seed=2,
                       teacher=teacher, keep_logits=True)
        for _ in range(2):  # the prefill is left as it was: reusable
            reused = decode(llama, ids[:80], 20, spec and POLICIES.create(spec), seed=2,
                            teacher=teacher, keep_logits=True, prefilled=prefilled)
            np.testing.assert_array_equal(reused.logits, fresh.logits)
            np.testing.assert_array_equal(reused.tokens, fresh.tokens)


def test_a_prefill_is_refused_for_another_prompt_or_a_longer_decode(llama):
    from sim.closed_loop.driver import decode, prefill

    ids = text(120)
    prefilled = prefill(llama, ids[:80], 100)
    with pytest.raises(ValueError, match="another prompt"):
        decode(llama, ids[1:81], 10, prefilled=prefilled)
    with pytest.raises(ValueError, match="capacity of 100 positions"):
        decode(llama, ids[:80], 21, prefilled=prefilled)


# --------------------------------------------------------------------------------------------
# Needle retrieval
# --------------------------------------------------------------------------------------------


def test_needles_sit_at_the_requested_token_depth():
    from sim.closed_loop.needle import place_needles

    filler = list(range(1000, 1200))
    facts = [[1, 2, 3], [7, 8], [5]]
    context, starts = place_needles(filler, facts, [0.5, 0.0, 1.0], 100)
    assert len(context) == 100
    assert starts == [round(0.5 * 97), 0, 99]  # depth x (context - fact length)
    for fact, start in zip(facts, starts, strict=True):
        assert context[start : start + len(fact)] == fact
    rest = [t for t in context if t >= 1000]
    assert rest == filler[: 100 - 6]  # the filler, in order, around the facts


@pytest.mark.parametrize("depths, context_len, message", [
    ([1.5, 0.0], 100, "depth must be in \\[0, 1\\], got 1.5"),
    ([-0.1, 0.0], 100, "depth must be in \\[0, 1\\]"),
    ([0.5, 0.51], 100, "overlap"),
    ([0.1, 0.9], 300, "the filler has 200 tokens; 295 are needed"),
])
def test_needle_placement_refuses_what_cannot_be_placed(depths, context_len, message):
    from sim.closed_loop.needle import place_needles

    with pytest.raises(ValueError, match=message):
        place_needles(list(range(1000, 1200)), [[1, 2, 3], [7, 8]], depths, context_len)


def test_needle_accuracy_scores_the_greedy_answer_after_the_question(llama):
    """The tiny random model's own greedy continuation is taken as the expected answer of
    one needle (so full attention answers it) and a wrong one as the other's."""
    from sim.closed_loop.driver import decode
    from sim.closed_loop.needle import Needle, needle_accuracy, place_needles

    context, _ = place_needles(text(200), [[5, 6, 7], [9, 9]], [0.2, 0.7], 120)
    question = (11, 12, 13)
    greedy = decode(llama, context, 6, teacher=question).tokens[3:]
    right = Needle((5, 6, 7), question, tuple(int(t) for t in greedy))
    wrong = Needle((9, 9), question, tuple((int(t) + 1) % 97 for t in greedy))
    policies = [None, POLICIES.create(everything("dynakv")),
                POLICIES.create({"type": "streaming_llm", "budget": 4, "sink_tokens": 1})]
    table = needle_accuracy(llama, context, [right, wrong], policies)
    assert table["policy"].tolist() == ["full (model)"] * 2 + ["dynakv(budget=1.0)"] * 2 + [
        "streaming_llm(budget=4)"] * 2
    assert table["correct"].tolist()[:4] == [True, False, True, False]
    assert table["answer_ids"].iloc[0] == list(greedy)


# --------------------------------------------------------------------------------------------
# The loop's own trace
# --------------------------------------------------------------------------------------------


def _trace_out(model, path):
    from sim.closed_loop.driver import TraceOut
    from sim.trace.models import model_entry

    return TraceOut(path, model_entry(model, "tiny", "random weights", 256),
                    {"source": "random ids"}, {"mode": "closed_loop"})


@pytest.mark.parametrize("spec", [
    *LOOP_SPECS, {"type": "infinigen", "budget": 1.0, "alpha": 0.0, "partial_ratio": 0.5}])
def test_the_open_loop_pass_over_the_saved_trace_makes_the_loop_s_selections(
    llama, tmp_path, spec
):
    """The trace a decode writes (kvsim's format, float32) holds exactly the keys and queries
    the loop's policy saw, so the trace replay's own pass (sim.policy_pass) over it makes the
    loop's selections at every step, layer and KV head; writing it changes no logit."""
    from sim.policy_pass import run_policy_pass
    from sim.trace.format import open_trace

    ids = text(120)
    plain = teacher_forced(llama, ids, 80, 25, POLICIES.create(spec), seed=4, keep_logits=True)
    run = teacher_forced(llama, ids, 80, 25, POLICIES.create(spec), seed=4, keep_logits=True,
                         record=True, trace=_trace_out(llama, tmp_path / "t"))
    np.testing.assert_array_equal(run.logits, plain.logits)
    trace = open_trace(tmp_path / "t", verify=True)
    assert (trace.prompt_len, trace.decode_steps, trace.query_start) == (80, 24, 0)
    assert trace.tokens().tolist() == ids[:104]  # the prompt and the 24 tokens fed
    decoded = trace.manifest["capture"]["decode"]
    assert decoded["next_token_after_last_step"] == ids[104]
    assert decoded["sampling"]["method"] == "teacher_forced" and not decoded["greedy"]
    controller = run.controller
    for layer in controller.layers:
        np.testing.assert_array_equal(trace.keys(layer), controller.layer_context(layer).keys)
    passed = run_policy_pass(trace, POLICIES.create(spec), seed=4)
    assert_the_loop_s_selections(controller, passed.selections.__getitem__)


def test_a_trace_is_refused_with_a_shared_prefill_or_without_a_decode_step(llama, tmp_path):
    from sim.closed_loop.driver import prefill

    ids = text(120)
    with pytest.raises(ValueError, match="runs its own prefill"):
        teacher_forced(llama, ids, 80, 5, None, trace=_trace_out(llama, tmp_path / "t"),
                       prefilled=prefill(llama, ids[:80], 85))
    with pytest.raises(ValueError, match="at least one decode step"):
        teacher_forced(llama, ids, 80, 1, None, trace=_trace_out(llama, tmp_path / "t"))
    assert not list(tmp_path.iterdir())


def test_a_sliding_window_model_s_trace_holds_every_layer(tmp_path):
    """Gemma 3's layout: the trace holds the sliding layers too (the replay attends their
    window) and the manifest lists the windows; the global layer's keys are the loop's."""
    from sim.trace.format import open_trace

    model = tiny_gemma3()
    ids = text(90)
    run = teacher_forced(model, ids, 40, 30, POLICIES.create({"type": "token_topk",
                                                               "budget": 0.2}),
                         record=True, trace=_trace_out(model, tmp_path / "g"))
    trace = open_trace(tmp_path / "g", verify=True)
    assert trace.manifest["model"]["sliding_window"] == [16, None, 16]
    assert trace.manifest["capture"]["decode"]["sampling"]["method"] == "teacher_forced"
    assert trace.keys(0).shape == (1, 69, 8)
    np.testing.assert_array_equal(trace.keys(1), run.controller.layer_context(1).keys)


def test_facts_are_drawn_from_the_seed_alone():
    from sim.closed_loop.needle import NAMES, make_facts

    facts = make_facts(5, seed=3)
    assert facts == make_facts(5, seed=3)
    assert facts != make_facts(5, seed=4)
    assert len({f.name for f in facts}) == 5 and {f.name for f in facts} <= set(NAMES)
    assert all(len(f.code) == 5 and f.code.isdigit() for f in facts)
    assert facts[0].text == f"\nThe access code for {facts[0].name} is {facts[0].code}.\n"
    assert facts[0].answer == f" {facts[0].code}"
    assert make_facts(len(NAMES), 0)  # every name once
    with pytest.raises(ValueError, match="between 1 and 24 facts"):
        make_facts(len(NAMES) + 1, 0)


class _Chars:
    """Text -> one id per character (its code point)."""

    def __call__(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_a_suite_hides_each_fact_at_its_depth_after_the_bos():
    """Hand-computed: fact i of f tokens starts at 1 + round(depth * (200 - 1 - f)) (the BOS
    stays first); its question and answer are the fact's, tokenised."""
    from sim.closed_loop.needle import Fact, build_suite

    facts = [Fact("Alice", "12345"), Fact("Bruno", "67890")]
    fact_len = len("\nThe access code for Alice is 12345.\n")
    assert fact_len == 37
    filler = [0] + list(range(1000, 1400))  # 0: the BOS
    suite = build_suite(_Chars(), filler, facts, [0.3, 0.9], 200, keep=1)
    assert len(suite.context) == 200 and suite.context[0] == 0
    assert suite.starts == (1 + round(0.3 * 162), 1 + round(0.9 * 162)) == (50, 147)
    for fact, start, needle in zip(facts, suite.starts, suite.needles, strict=True):
        assert suite.context[start : start + fact_len] == tuple(ord(c) for c in fact.text)
        assert needle.question == tuple(ord(c) for c in fact.question)
        assert needle.answer == tuple(ord(c) for c in f" {fact.code}")
    assert [t for t in suite.context[1:] if t >= 1000] == filler[1 : 200 - 1 - 2 * 37 + 1]
    longest = max(len(f.question) for f in facts) + 6
    assert suite.capacity == 200 + longest


@pytest.mark.parametrize("answer, expected, match", [
    ([5, 6, 7], (5, 6, 7), True),
    (np.array([5, 6, 7]), (5, 6, 7), True),
    ([5, 6, 8], (5, 6, 7), False),
    ([5, 6], (5, 6, 7), False),
    ([5, 6, 7, 8], (5, 6, 7), False),
])
def test_exact_match_is_every_token_of_the_answer(answer, expected, match):
    from sim.closed_loop.needle import exact_match

    assert exact_match(answer, expected) is match


def test_answer_needles_reuses_one_prefill_and_scores_each_question(llama):
    """Answers from a shared prefill are those of a fresh decode per question; a needle whose
    expected answer is full attention's greedy answer is right, its timings add up."""
    from sim.closed_loop.driver import decode, prefill
    from sim.closed_loop.needle import Needle, answer_needles, room

    context = text(100, seed=5)
    greedy = decode(llama, context, 7, teacher=(20, 21, 22)).tokens[3:]
    needles = [Needle((1,), (20, 21, 22), tuple(int(t) for t in greedy)),
               Needle((2,), (30, 31), (1, 2, 3, 4, 5, 6))]
    shared = prefill(llama, context, len(context) + room(needles))
    assert room(needles) == 8  # 2 + 6 > 3 + 4
    policy = POLICIES.create({"type": "streaming_llm", "budget": 10, "sink_tokens": 2})
    for who in (None, policy):
        run = answer_needles(llama, context, needles, who, prefilled=shared)
        for needle, answer in zip(needles, run.answers, strict=True):
            fresh = decode(llama, context, len(needle.question) + len(needle.answer), who,
                           teacher=needle.question).tokens[len(needle.question):]
            np.testing.assert_array_equal(answer, fresh)
        assert len(run.answers[1]) == 6
    full = answer_needles(llama, context, needles, None, prefilled=shared)
    assert full.correct == [True, False] and full.accuracy == 0.5 and full.hook_s == 0.0
