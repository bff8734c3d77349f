"""Token-level top-k retrieval ("no-cluster"): the accuracy upper bound at a token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import POLICIES
from .base import BudgetedPolicy, LayerContext, LayerIndex, decode_attention_weights

if TYPE_CHECKING:
    from .online import OnlineLayer


@POLICIES.register("token_topk")
@dataclass
class TokenTopK(BudgetedPolicy):
    """Exact per-KV-head top-k tokens by attention, TokenSelect-like (Wu et al., EMNLP 2025,
    arXiv 2411.02886); DynaKV's "no-cluster" baseline (arXiv 2511.07427).

    Each KV head ranks its stored positions by the *group-aggregated* exact attention: the sum,
    over the query heads sharing the KV head (GQA), of their softmax probabilities (each over
    ``[0, P + s]``, the current token included, exactly as ``sim.metrics.accuracy`` measures).
    The top ``budget`` positions therefore maximise the group's mean attention recall among all
    selections of that size holding the forced tokens: an oracle, since it scores every key
    (``index_vectors[h, s] = P + s``) and reads one small extent per token.

    Parameters:
        budget (int | float, default 1024): tokens per step and KV head, or a fraction in
            (0, 1] of the context.
        sink_tokens (int, default 0): leading positions always attended (0: a pure oracle).
        recent_tokens (int, default 0): newest positions always attended (0: a pure oracle).
    """

    def index_floor(self, prompt_len: int, step: int, head_dim: int) -> int:
        return prompt_len + step  # every stored key

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        keys = np.asarray(ctx.keys, dtype=np.float32)

        def score_steps(start: int, stop: int) -> np.ndarray:
            w, norm, _ = decode_attention_weights(ctx.queries, keys, ctx.prompt_len, start, stop)
            w /= norm[..., None]
            return w.sum(axis=1)  # (H_kv, steps, P + stop): summed over the query group

        context = ctx.prompt_len + np.arange(ctx.decode_steps, dtype=np.int64)
        index_vectors = np.broadcast_to(context, (ctx.n_kv_heads, ctx.decode_steps)).copy()
        return LayerIndex(score_steps, index_vectors)

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import TokenTopKOnline

        return TokenTopKOnline(self, n_kv_heads, capacity, rng)
