"""Oracle token retrieval: token_topk's exact top-k selection at zero scoring cost."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import POLICIES
from .base import LayerContext, LayerIndex
from .token_topk import TokenTopK


@POLICIES.register("oracle")
@dataclass
class Oracle(TokenTopK):
    """Exact per-KV-head top-k tokens known for free: the latency lower bound of token-level
    retrieval (the "no-cluster" selection of DynaKV, arXiv 2511.07427, without its cost).

    The selection is :class:`~sim.policies.token_topk.TokenTopK`'s (group-aggregated exact
    attention, TokenSelect-like; Wu et al., EMNLP 2025, arXiv 2411.02886) but nothing is scored
    and no index lives in DRAM (``index_vectors`` all 0); the reads (one small extent per
    token) are still paid.

    Parameters:
        budget (int | float, default 1024): tokens per step and KV head, or a fraction in
            (0, 1] of the context.
        sink_tokens (int, default 0): leading positions always attended.
        recent_tokens (int, default 0): newest positions always attended.
    """

    def index_floor(self, prompt_len: int, step: int, head_dim: int) -> int:
        return 0  # no index

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        index = super().index_layer(ctx)
        return replace(index, index_vectors=np.zeros_like(index.index_vectors))
