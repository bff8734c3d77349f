"""InfiniGen on a tiny layer whose selections are worked out by hand.

One KV head, two query heads, head_dim 4, partial_ratio 0.5 (two channels), prompt 8, two steps.
Prompt queries are all ones, so a channel's importance is its mean |key| over the prompt:
channel 0 (3.44) and channel 2 (3.0) win over channels 1 and 3 (0.1). The speculative queries
put a weight of 100 on the *dropped* channels 1 and 3, where the keys are +-0.1 in two
different patterns: full dot products would move by 0 or +-10 logits, so only the partial
scoring gives the results below. With ``scale = 1/sqrt(4) = 0.5`` the speculative logits are

* head 0, query ``[2, 100, 0, 100]``: ``x(t) = k0(t)``;
* head 1, query ``[-2, 100, 0, 100]``: ``x(t) = -k0(t)``;

with ``k0 = [10, 7, 6.5, 5, 1, 0.5, 0, -0.5 | 2]`` (position 8 is step 0's token, visible at
step 1). At step 0 with alpha 4: head 0 counts {0, 1, 2} (>= 6), head 1 counts {4, 5, 6, 7}
(>= 0.5 - 4), so ``n = floor(3.5) = 3``. Summed softmax: position 0 (0.92 from head 0), then
7 (0.45), 6 (0.28), 5 (0.17), 4 (0.10), 1 (0.05), ... from head 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from sim.errors import ConfigError
from sim.policies import POLICIES
from sim.policies.base import LayerContext
from sim.policies.infinigen import partial_channels

PROMPT, STEPS = 8, 2
K0 = np.array([10, 7, 6.5, 5, 1, 0.5, 0, -0.5, 2, 0], dtype=np.float32)
SPEC = np.array([[2, 100, 0, 100], [-2, 100, 0, 100]], dtype=np.float32)


def _layer(layer: int = 1, spec: bool = True, own: np.ndarray | None = None) -> LayerContext:
    n = PROMPT + STEPS
    alternating = 0.1 * (-1.0) ** np.arange(n)
    pairs = 0.1 * (-1.0) ** (np.arange(n) // 2)
    keys = np.stack([K0, alternating, np.full(n, 3.0), pairs], axis=-1)[None]
    speculative = np.repeat(SPEC[:, None], STEPS, axis=1)  # the same query at both steps
    queries = speculative if own is None else own
    stored = np.concatenate([np.ones((2, PROMPT, 4)), queries], axis=1).astype(np.float16)
    return LayerContext(layer, keys.astype(np.float32), queries, PROMPT,
                        np.random.default_rng(0), stored_queries=stored,
                        speculative_queries=speculative if spec else None)


def _select(ctx: LayerContext, **params) -> list[list[int]]:
    policy = POLICIES.create({"type": "infinigen", "partial_ratio": 0.5, **params})
    selection = policy.select_layer(ctx)
    return [selection.heads[0].at(s).tolist() for s in range(STEPS)]


def test_alpha_threshold_and_group_ranking() -> None:
    # step 1 also sees position 8 (x = 2 / -2): head 1 now counts 5, n = floor(4) = 4
    assert _select(_layer(), budget=1.0, alpha=4.0) == [[0, 6, 7], [0, 5, 6, 7]]
    # alpha 0: each head counts only its maximum, n = 1: the best summed softmax, position 0
    assert _select(_layer(), budget=1.0, alpha=0.0) == [[0], [0]]
    # alpha 2: head 0 counts {0}, head 1 {5, 6, 7}; n = floor(2) = 2
    assert _select(_layer(), budget=1.0, alpha=2.0) == [[0, 7], [0, 7]]


def test_cap_at_the_budget() -> None:
    assert _select(_layer(), budget=2, alpha=4.0) == [[0, 7], [0, 7]]
    # alpha 100 counts everything (n = context), the budget of 5 keeps the five best
    assert _select(_layer(), budget=5, alpha=100.0) == [[0, 4, 5, 6, 7], [0, 4, 5, 6, 7]]
    # a fractional budget: ceil(0.25 * 8) = 2, ceil(0.25 * 9) = 3
    assert _select(_layer(), budget=0.25, alpha=100.0) == [[0, 7], [0, 6, 7]]


def test_forced_tokens_come_on_top_of_the_speculated_ones() -> None:
    # sink 0 and the newest position forced; n = 3 more by score, capped at 5 in total
    got = _select(_layer(), budget=10, alpha=4.0, sink_tokens=1, recent_tokens=1)
    assert got == [[0, 4, 5, 6, 7], [0, 4, 5, 6, 7, 8]]  # step 1: n = 4
    assert _select(_layer(), budget=3, alpha=4.0, sink_tokens=1, recent_tokens=1) == [
        [0, 6, 7], [0, 7, 8]]


def test_channel_choice() -> None:
    keys = _layer().keys[:, :PROMPT]
    assert partial_channels(np.ones((2, PROMPT, 4)), keys, 2).tolist() == [[0, 2]]
    # the queries count too: a query channel of zero drops its channel however large the keys
    queries = np.ones((2, PROMPT, 4))
    queries[:, :, 0] = 0.0
    assert partial_channels(queries, keys, 2).tolist() == [[1, 2]]
    # per KV head, pooling its own query group (heads 0-1 -> KV 0, heads 2-3 -> KV 1)
    two_heads = np.concatenate([keys, keys[:, :, ::-1]])
    assert partial_channels(np.ones((4, PROMPT, 4)), two_heads, 1).tolist() == [[0], [3]]
    # the whole policy on the wrong channels would rank by the +-10 logits of channels 1, 3
    assert _select(_layer(), budget=1.0, alpha=4.0, partial_ratio=1.0) != [[0, 6, 7],
                                                                           [0, 5, 6, 7]]


def test_layer_zero_uses_its_own_query_and_the_rest_the_speculation() -> None:
    # layer 0 has no speculative queries: its own query (here the same vectors) is scored
    assert _select(_layer(layer=0, spec=False), alpha=4.0, budget=1.0) == [[0, 6, 7],
                                                                          [0, 5, 6, 7]]
    # layer 1 ignores its own query for the speculation; this one scores every position 3
    # (channel 2 only), so all are within alpha, and layer 0, scored with it, takes them all
    own = np.zeros((2, STEPS, 4), np.float32)
    own[:, :, 2] = 2.0
    assert _select(_layer(own=own), alpha=4.0, budget=1.0) == [[0, 6, 7], [0, 5, 6, 7]]
    assert _select(_layer(layer=0, own=own), alpha=4.0, budget=1.0) == [
        list(range(PROMPT)), list(range(PROMPT + 1))]


def test_old_traces_ask_for_a_recapture() -> None:
    with pytest.raises(ValueError, match="no speculative queries.*recapture"):
        _select(_layer(spec=False))


def test_index_is_the_partial_key_cache() -> None:
    policy = POLICIES.create({"type": "infinigen", "partial_ratio": 0.5})
    selection = policy.select_layer(_layer())
    # two of four channels of 8 and 9 stored keys: 4 and 4.5 -> 5 key-sized vectors
    assert selection.index_vectors.tolist() == [[4, 5]]
    assert POLICIES.create({"type": "infinigen"}).n_channels(64) == 19  # int(0.3 * 64)
    assert POLICIES.create({"type": "infinigen", "partial_ratio": 0.01}).n_channels(64) == 1


def test_full_layers_and_defaults() -> None:
    policy = POLICIES.create({"type": "infinigen", "full_layers": 2})
    assert policy.select_layer(_layer(layer=1)).is_full
    defaults = POLICIES.create("infinigen")
    assert (defaults.budget, defaults.partial_ratio, defaults.alpha) == (0.2, 0.3, 4.0)
    assert (defaults.sink_tokens, defaults.recent_tokens, defaults.full_layers) == (0, 0, 0)
    assert type(defaults).selection_lead_layers == 1


@pytest.mark.parametrize(
    "bad, match",
    [({"partial_ratio": 0}, "partial_ratio"), ({"partial_ratio": 1.5}, "partial_ratio"),
     ({"alpha": -1}, "alpha"), ({"alpha": "big"}, "alpha"), ({"full_layers": -1}, "full_layers")],
)
def test_parameters_are_validated(bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        POLICIES.create({"type": "infinigen", **bad})
