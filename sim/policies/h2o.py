"""H2O: heavy hitters by accumulated attention plus a recent window, evicted permanently."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from . import POLICIES
from .base import (
    BudgetedPolicy,
    HeadSelections,
    LayerContext,
    LayerIndex,
    LayerSelection,
    decode_attention_weights,
)

if TYPE_CHECKING:
    from sim.trace.format import Trace

    from .online import OnlineLayer

#: Eviction-key offsets of the protected tiers (accumulated scores stay far below them and
#: every key is an exact float64 integer-or-score below 2^53).
_RECENT_TIER = 2e15
_SINK_TIER = 3e15


@POLICIES.register("h2o")
@dataclass
class H2O(BudgetedPolicy):
    """H2O, the Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048).

    Each KV head keeps a cache of at most ``budget`` entries: the newest ``r`` stored positions
    (the recent window) plus the *heavy hitters*, the older positions with the largest
    accumulated attention. A position's accumulated attention is the sum, over every query so
    far and over the query heads sharing the KV head (GQA, as the summed-group ports of H2O do),
    of the softmax probability it received. Eviction is **permanent**: an evicted position never
    returns (unlike ``token_topk``, which re-ranks the whole context at every step).

    Timeline of one layer and KV head:

    * prefill: every prompt query attends causally over the prompt keys (full attention, as
      H2O's prefill pass computes it); the probabilities accumulate per key. The cache is then
      cut to ``budget_at(P)`` entries: sinks, the recent window, then the top accumulated scores.
      Needs the trace's prompt queries (``LayerContext.prompt_queries``; capture with
      ``queries='all'``), otherwise ValueError (one line from ``kvsim run``).
    * decode step ``s`` attends the kept set (its selection) plus its own token. The probabilities
      added to the accumulators are those of the softmax **restricted to kept + current**, which
      is what a model running H2O actually computes (evicted keys are gone, so they receive
      nothing and the kept ones get the renormalised mass). The new token ``P + s`` then enters
      with its own probability as its score; if the cache exceeds ``budget_at(P + s + 1)`` the
      unprotected entry with the smallest accumulated score is evicted (ties: the earliest).

    So the selection at step ``s`` is decided before step ``s``'s query: the policy ignores the
    current query (``selection_needs_query = False``).

    The kept set is H2O's whole KV cache, in DRAM (``keeps_selection_in_dram``): what it evicts
    never returns, so nothing is written to or read from flash and the DRAM cache is unused;
    the replay attends each layer from DRAM like a sliding window and counts the kept set with
    the current token in the DRAM footprint's ``window``.
    ``index_vectors`` are all 0: H2O's index is one scalar score per kept entry, not key-sized
    vectors to score the query against.

    Budget split (at each context length ``c``, with ``b = budget_at(c)``): the recent window is
    ``r = min(b - sinks, max(recent_tokens, floor(recent_ratio * b)))``; heavy hitters fill the
    remaining ``b - sinks - r``. H2O's default keeps half heavy hitters, half recent tokens
    (``recent_ratio = 0.5``, e.g. llama-recipes' H2O: "the number of local and heavy-hitter KV
    pairs equals half of the window"). If a fractional budget is below the sinks, sinks are
    kept first (earliest first), then the newest tokens, like every budgeted policy.

    Parameters:
        budget (int | float, default 1024): cache entries per KV head (sinks + recent window +
            heavy hitters), or a fraction in (0, 1] of the context length (rounded up).
        sink_tokens (int, default 0): leading positions never evicted (H2O has none natively).
        recent_tokens (int, default 0): lower bound of the recent window in tokens.
        recent_ratio (float, default 0.5): share of the budget given to the recent window, in
            [0, 1]; the rest (after sinks) holds heavy hitters.
    """

    budget: float = 1024
    sink_tokens: int = 0
    recent_tokens: int = 0
    recent_ratio: float = 0.5

    selection_needs_query = False
    keeps_selection_in_dram = True

    #: the prefill accumulation scores prompt query rows in chunks of at most this many rows...
    prompt_chunk_rows: ClassVar[int] = 256
    #: ...and at most this many bytes of float32 weights per chunk (all query heads at once).
    prompt_chunk_bytes: ClassVar[int] = 32 << 20

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.recent_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"recent_ratio must be a number in [0, 1], got {ratio!r}")

    def trace_problem(self, trace: Trace) -> str | None:
        if trace.query_start > 0:
            return (
                "h2o accumulates attention from every prompt query, but the trace stores "
                f"queries from position {trace.query_start} on (capture with queries: all)"
            )
        return None

    def recent_at(self, context_len: int) -> int:
        """Recent-window length at a context length (non-decreasing, +1 at most per token)."""
        b = self.budget_at(context_len)
        free = b - min(self.sink_tokens, b)
        return min(free, max(self.recent_tokens, math.floor(self.recent_ratio * b)))

    # ----------------------------------------------------------------------------------------

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        # The kept sets directly, not the base's top-budget fill: the base would re-force sinks
        # that a budget below them once evicted, and H2O's evictions are permanent.
        kept = self.kept_sets(ctx)
        heads = [
            HeadSelections.from_lists([np.sort(k[h]) for k in kept]) for h in range(ctx.n_kv_heads)
        ]
        selection = LayerSelection(heads, np.zeros((ctx.n_kv_heads, ctx.decode_steps), np.int64))
        return self.with_dram(selection, ctx)  # the kept set is in DRAM (keeps_selection_in_dram)

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        """The kept sets as scores (kept 1, evicted 0), for callers of the BudgetedPolicy API;
        :meth:`select_layer` does not go through it."""
        kept = self.kept_sets(ctx)
        n_kv, n_steps = ctx.n_kv_heads, ctx.decode_steps

        def score_steps(start: int, stop: int) -> np.ndarray:
            scores = np.zeros((n_kv, stop - start, ctx.prompt_len + stop), np.float64)
            for s in range(start, stop):
                np.put_along_axis(scores[:, s - start], kept[s], 1.0, axis=-1)
            return scores

        return LayerIndex(score_steps, index_vectors=np.zeros((n_kv, n_steps), np.int64))

    def kept_sets(self, ctx: LayerContext) -> list[np.ndarray]:
        """The cache of every KV head before each decode step: ``[s]`` is (H_kv, budget_at(P+s))
        int64 positions (unsorted), the selection of step ``s``."""
        prompt, n_steps = ctx.prompt_len, ctx.decode_steps
        n_kv, q_per_kv = ctx.n_kv_heads, ctx.queries_per_kv_head
        keys = np.asarray(ctx.keys, dtype=np.float32)
        acc = np.zeros((n_kv, prompt + n_steps), np.float64)
        acc[:, :prompt] = self.prompt_scores(ctx)
        heads = np.arange(n_kv)[:, None]
        all_prompt = np.broadcast_to(np.arange(prompt, dtype=np.int64), (n_kv, prompt))
        kept = self._trim(all_prompt, acc, prompt)
        head_dim = keys.shape[2]
        q = np.asarray(ctx.queries, dtype=np.float32) * np.float32(1.0 / math.sqrt(head_dim))
        q = q.reshape(n_kv, q_per_kv, n_steps, head_dim)
        out: list[np.ndarray] = []
        for s in range(n_steps):
            out.append(kept)
            current = np.full((n_kv, 1), prompt + s, np.int64)
            cols = np.concatenate([kept, current], axis=1)  # (H_kv, n + 1)
            logits = q[:, :, s] @ keys[heads, cols].transpose(0, 2, 1)  # (H_kv, G, n + 1)
            logits -= logits.max(axis=-1, keepdims=True)
            np.maximum(logits, np.float32(-80.0), out=logits)  # no float32 subnormals
            w = np.exp(logits)
            w /= w.sum(axis=-1, keepdims=True)
            acc[heads, cols] += w.sum(axis=1)
            if s + 1 < n_steps:
                kept = self._trim(cols, acc, prompt + s + 1)
        return out

    def prompt_scores(self, ctx: LayerContext) -> np.ndarray:
        """(H_kv, P) float64: attention each prompt key received from the prompt's own queries
        (causal softmax, summed over queries and over each KV head's query group)."""
        try:
            queries = ctx.prompt_queries()
        except ValueError as exc:
            msg = f"H2O accumulates attention from every prompt query, but {exc}"
            raise ValueError(msg) from None
        prompt, n_kv = ctx.prompt_len, ctx.n_kv_heads
        n_q = queries.shape[0]
        acc = np.zeros((n_kv, prompt), np.float64)
        if prompt == 0:
            return acc
        keys = np.asarray(ctx.keys[:, :prompt], dtype=np.float32)
        rows = max(1, min(self.prompt_chunk_rows, self.prompt_chunk_bytes // (4 * n_q * prompt)))
        buf = np.empty(n_q * rows * prompt, np.float32)
        for start in range(0, prompt, rows):
            stop = min(prompt, start + rows)
            # prompt_len=0: "decode step" r is prompt position r and sees keys [0, r].
            w, norm, _ = decode_attention_weights(queries, keys, 0, start, stop, out=buf)
            inv = (1.0 / norm).astype(np.float32).reshape(n_kv, 1, -1)  # (H_kv, 1, G * rows)
            acc[:, :stop] += (inv @ w.reshape(n_kv, -1, stop))[:, 0]
        return acc

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import H2OOnline

        return H2OOnline(self, n_kv_heads, capacity, rng)

    def _trim(self, cols: np.ndarray, acc: np.ndarray, context_len: int) -> np.ndarray:
        """Keep ``budget_at(context_len)`` of each row of ``cols`` (H_kv, n): sinks (earliest
        first), then the recent window (newest first), then the highest accumulated scores."""
        b = self.budget_at(context_len)
        if cols.shape[1] <= b:
            return np.ascontiguousarray(cols)
        recent_from = context_len - self.recent_at(context_len)
        key = np.take_along_axis(acc, cols, axis=1)
        key = np.where(cols >= recent_from, _RECENT_TIER + cols, key)
        key = np.where(cols < self.sink_tokens, _SINK_TIER - cols, key)
        if cols.shape[1] == b + 1:  # the decode case: evict the single lowest entry
            low = key == key.min(axis=1, keepdims=True)
            drop = np.argmin(np.where(low, cols, np.iinfo(np.int64).max), axis=1)  # earliest
            keep = np.ones(cols.shape, bool)
            keep[np.arange(cols.shape[0]), drop] = False
            return cols[keep].reshape(cols.shape[0], b)
        # Ascending by (key, position): the lowest keys go, among equal ones the earliest.
        order = np.lexsort((cols, key), axis=1)[:, cols.shape[1] - b :]
        return np.take_along_axis(cols, order, axis=1)
