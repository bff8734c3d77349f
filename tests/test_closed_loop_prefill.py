"""The closed loop's chunked prefill (sim/closed_loop/driver.py ``run_prompt``): the prompt fed
in passes of ``chunk`` consecutive positions into one cache gives what one pass gives: the
same logits, the same recorded keys and queries, a cache the decode continues from alike, on
a tiny Llama (grouped-query attention) and a tiny Gemma 3 whose sliding window (16) chunk
boundaries cut through.

Tolerance: ``ATOL`` = 1e-5 absolute on values of magnitude <= 2.4. Chunking changes only the
order of float32 sums (a pass attends the earlier positions through the cache, the attention
kernel tiles and masks differently), so the two differ by rounding: measured <= 2.4e-6 (about
ten float32 ulps at the keys' magnitude) on these configurations. A real error (a position
attended or masked wrongly, a chunk recorded twice or at the wrong offset) moves the numbers by
1e-2 and more (the control below: one prompt token changed moves the logits by > 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest

from sim.policies import POLICIES

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sim.closed_loop.driver import decode, prefill  # noqa: E402  (after the importorskips)
from tests.test_closed_loop import (  # noqa: E402,F401
    _one_thread,
    everything,
    text,
    tiny_gemma3,
    tiny_llama,
)

ATOL = 1e-5
MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def assert_same_prefill(chunked, whole) -> None:
    np.testing.assert_allclose(chunked.logits.numpy(), whole.logits.numpy(), rtol=0, atol=ATOL)
    assert sorted(chunked.keys) == sorted(whole.keys) and sorted(chunked.queries) == sorted(
        whole.queries)
    for layer in whole.keys:
        assert chunked.keys[layer].shape == whole.keys[layer].shape
        assert chunked.queries[layer].shape == whole.queries[layer].shape
        np.testing.assert_allclose(chunked.keys[layer], whole.keys[layer], rtol=0, atol=ATOL)
        np.testing.assert_allclose(chunked.queries[layer], whole.queries[layer], rtol=0,
                                   atol=ATOL)


# 97 = 3 x 32 + 1: a last chunk of one position; 10 and 7 cut the sliding window (16) of the
# Gemma layers inside it; 1: every position its own pass
@pytest.mark.parametrize("chunk", [32, 10, 7, 1])
def test_a_chunked_prefill_is_one_pass_s(model, chunk):
    ids = text(120)
    whole = prefill(model, ids[:97], 110, chunk=97)
    chunked = prefill(model, ids[:97], 110, chunk=chunk)
    assert_same_prefill(chunked, whole)
    # the cache it leaves: a decode from it predicts alike
    after = [decode(model, ids[:97], 12, teacher=ids[97:109], prefilled=p, keep_logits=True)
             for p in (whole, chunked)]
    np.testing.assert_allclose(after[1].logits, after[0].logits, rtol=0, atol=ATOL)


def test_the_tolerance_tells_a_different_prompt_apart(model):
    ids = text(120)
    whole = prefill(model, ids[:97], 110, chunk=97)
    changed = list(ids[:97])
    changed[40] = (changed[40] + 1) % 97
    other = prefill(model, changed, 110, chunk=32)
    assert np.abs(other.logits.numpy() - whole.logits.numpy()).max() > 100 * ATOL


def test_the_default_chunk_runs_a_short_prompt_in_one_pass(model):
    ids = text(120)
    np.testing.assert_array_equal(prefill(model, ids[:97], 110).logits.numpy(),
                                  prefill(model, ids[:97], 110, chunk=97).logits.numpy())


def test_a_decode_s_own_prefill_in_chunks_records_the_prompt_alike(model, monkeypatch):
    """decode without a shared prefill runs the prompt itself (:func:`run_prompt`, the
    default chunk): with chunks of 10 its policy is prefilled with the same keys and queries
    and, attending everything, predicts as one pass does."""
    from sim.closed_loop import driver

    ids = text(120)
    runs = []
    for chunk in (2048, 10):
        monkeypatch.setattr(driver, "PREFILL_CHUNK", chunk)
        runs.append(decode(model, ids[:97], 12, POLICIES.create(everything("dynakv")),
                           teacher=ids[97:109], keep_logits=True, record=True))
    whole, chunked = runs
    np.testing.assert_allclose(chunked.logits, whole.logits, rtol=0, atol=ATOL)
    for layer in whole.controller.layers:
        for recorded in ("recorded_keys", "recorded_queries"):
            a = getattr(chunked.controller, recorded)[layer][0]
            b = getattr(whole.controller, recorded)[layer][0]
            assert a.shape == b.shape and a.shape[1] == 97
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def test_a_chunk_must_be_a_position_at_least(model):
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        prefill(model, text(20), 30, chunk=0)
