"""StreamingLLM: attention sinks plus a sliding window of the newest tokens, query-independent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import POLICIES
from .base import BudgetedPolicy, GroupRanking, LayerContext, LayerIndex

if TYPE_CHECKING:
    from .online import OnlineLayer


@POLICIES.register("streaming_llm")
@dataclass
class StreamingLLM(BudgetedPolicy):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): the first ``sink_tokens``
    positions (attention sinks) plus a window of the newest stored positions.

    The window is whatever the budget leaves after the sinks: ``window = budget - sink_tokens``
    at every step (a fractional budget is resolved at each step's context length first), so
    step ``s`` attends ``[0, sink_tokens) U [P + s - window, P + s)``. Implemented as a
    budgeted policy whose score is the position itself (newest first), so ``recent_tokens``
    does not change the selection. The selection ignores the query
    (``selection_needs_query = False``), and there is no index (``index_vectors`` all 0, no
    groups). The sinks and window are StreamingLLM's whole KV cache, in DRAM
    (``keeps_selection_in_dram``): evicted tokens never return, so nothing is written to or
    read from flash and the DRAM cache is unused; the replay attends each layer from DRAM like
    a sliding window and counts the kept set in the DRAM footprint's ``window``.

    Parameters:
        budget (int | float, default 1024): sinks + window tokens per step and KV head, or a
            fraction in (0, 1] of the context.
        sink_tokens (int, default 4): leading positions always attended (StreamingLLM's 4).
        recent_tokens (int, default 0): inherited; the window already holds the newest
            ``budget - sink_tokens`` positions, so this only has to fit in the budget.
    """

    budget: float = 1024
    sink_tokens: int = 4
    recent_tokens: int = 0

    selection_needs_query = False
    keeps_selection_in_dram = True

    def window_at(self, context_len: int) -> int:
        """Window length at a context length (the budget left after the sinks)."""
        return max(0, self.budget_at(context_len) - min(self.sink_tokens, context_len))

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        n_kv, n_steps = ctx.n_kv_heads, ctx.decode_steps

        def score_steps(start: int, stop: int) -> np.ndarray:
            width = ctx.prompt_len + stop
            by_recency = np.arange(width, dtype=np.float64)
            return np.broadcast_to(by_recency, (n_kv, stop - start, width)).copy()

        # The same ranking on groups: after the sinks, one window of every stored position,
        # newest first (no group is ever reached).
        every_position = np.zeros((n_kv, ctx.prompt_len + n_steps), np.int64)

        def no_groups(start: int, stop: int) -> np.ndarray:
            return np.zeros((n_kv, stop - start, 1), np.int64)

        def from_the_sinks(start: int, stop: int) -> np.ndarray:
            return np.full(stop - start, self.sink_tokens, np.int64)

        return LayerIndex(
            score_steps,
            index_vectors=np.zeros((n_kv, n_steps), np.int64),
            groups=GroupRanking(every_position, no_groups, from_the_sinks),
        )

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import StreamingLLMOnline

        return StreamingLLMOnline(self, n_kv_heads, capacity, rng)
