"""Quest: page retrieval by an upper bound of q.k from per-page, per-channel key min/max."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import POLICIES
from .base import (
    BudgetedPolicy,
    FullLayersMixin,
    GroupRanking,
    LayerContext,
    LayerIndex,
    check_count,
)

if TYPE_CHECKING:
    from sim.trace.format import Trace

    from .online import OnlineLayer

GROUP_REDUCTIONS = ("sum", "max")


def page_upper_bound(query: np.ndarray, key_min: np.ndarray, key_max: np.ndarray) -> np.ndarray:
    """Quest's criticality of a page: ``sum_d max(q_d * min_d, q_d * max_d)``.

    An upper bound of ``q . k`` for every key ``k`` of the page (``min_d <= k_d <= max_d``).
    ``query`` (..., d) broadcasts against ``key_min``/``key_max`` (..., d).
    """
    return np.maximum(query * key_min, query * key_max).sum(axis=-1)


class PageIndex:
    """Per-page, per-channel key bounds of one layer, grown as decode tokens are appended.

    ``keys`` (H_kv, N, d) holds every stored position of the trace layer; page ``p`` is positions
    ``[p * T, (p + 1) * T)``. The bounds of a page at context length ``c`` cover its positions
    below ``c`` only: they are the running (prefix) min/max within the page, evaluated at its
    last visible position, which is exactly what incremental updates on append produce.
    """

    def __init__(self, keys: np.ndarray, page_tokens: int) -> None:
        n_kv, n, d = keys.shape
        self.page_tokens = page_tokens
        self.n_positions = n
        n_pages = -(-n // page_tokens)
        padded = np.zeros((n_kv, n_pages * page_tokens, d), np.float32)
        padded[:, :n] = keys
        blocks = padded.reshape(n_kv, n_pages, page_tokens, d)
        # Prefix min/max inside each page: entry t = bounds of the page's positions <= t.
        self.run_min = np.minimum.accumulate(blocks, axis=2).reshape(n_kv, -1, d)[:, :n]
        self.run_max = np.maximum.accumulate(blocks, axis=2).reshape(n_kv, -1, d)[:, :n]

    def n_pages(self, context_len: int) -> int:
        """Pages holding at least one of the positions ``[0, context_len)``."""
        return -(-context_len // self.page_tokens)

    def bounds_at(self, context_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(min, max), each (H_kv, n_pages(context_len), d), over positions < ``context_len``."""
        last = self._last_visible(np.arange(self.n_pages(context_len)), context_len)
        return self.run_min[:, last], self.run_max[:, last]

    def page_scores(
        self, queries: np.ndarray, contexts: np.ndarray, reduce: str = "sum"
    ) -> np.ndarray:
        """Upper bounds (H_kv, steps, n_pages(max context)) for consecutive decode steps.

        ``queries`` (H_kv, G, steps, d): each KV head's query group; ``contexts`` (steps,):
        ascending consecutive context lengths. Pages not yet visible at a step score ``-inf``.
        The G query heads' bounds are combined by ``reduce`` ("sum" or "max").
        """
        t = self.page_tokens
        n_kv, _, steps, _ = queries.shape
        q_pos = np.maximum(queries, 0.0)
        q_neg = np.minimum(queries, 0.0)  # max(q m, q M) = q+ . M + q- . m since m <= M
        n_total = self.n_pages(int(contexts[-1]))
        n_fixed = int(contexts[0]) // t  # pages complete before the first step: fixed bounds
        out = np.full((n_kv, queries.shape[1], steps, n_total), -np.inf, np.float32)
        if n_fixed:
            last = np.arange(1, n_fixed + 1) * t - 1
            lo = self.run_min[:, last].transpose(0, 2, 1)[:, None]  # (H, 1, d, pages)
            hi = self.run_max[:, last].transpose(0, 2, 1)[:, None]
            out[..., :n_fixed] = q_pos @ hi + q_neg @ lo
        if n_total > n_fixed:  # pages still growing during the chunk: bounds vary per step
            pages = np.arange(n_fixed, n_total)
            visible = pages[None, :] * t < contexts[:, None]  # (steps, pages)
            last = self._last_visible(pages[None, :], contexts[:, None])
            last = np.where(visible, last, 0)
            lo, hi = self.run_min[:, last], self.run_max[:, last]  # (H, steps, pages, d)
            var = np.einsum("hgsd,hspd->hgsp", q_pos, hi) + np.einsum(
                "hgsd,hspd->hgsp", q_neg, lo
            )
            out[..., n_fixed:] = np.where(visible, var, -np.inf)
        return out.sum(axis=1) if reduce == "sum" else out.max(axis=1)

    def _last_visible(self, pages: np.ndarray, context_len) -> np.ndarray:
        return np.minimum((pages + 1) * self.page_tokens, context_len) - 1


@POLICIES.register("quest")
@dataclass
class Quest(FullLayersMixin, BudgetedPolicy):
    """Quest query-aware page retrieval (Tang et al., ICML 2024, arXiv 2406.10774).

    Positions are cut into pages of ``page_tokens`` consecutive tokens. Per KV head, each page
    keeps the per-channel minimum and maximum of its keys; a query scores a page by
    ``sum_d max(q_d * min_d, q_d * max_d)``, an upper bound of ``q . k`` over the page's keys.
    Decode tokens join the page of their position (``position // page_tokens``) and widen its
    bounds incrementally (running min/max), so a page is scored from the keys stored so far.

    GQA (Quest's paper is MHA): each query head of a KV head's group bounds every page and the
    bounds are combined by ``group_reduce`` ("sum", the default, ranks pages by the bound of
    the group's summed logits; "max" by the most interested head). Pages are taken in
    descending score (ties: earlier page first) until the budget is filled; forced sinks and
    recent tokens count once. To keep the budget exact, the last page taken is truncated to
    its *earliest* positions (one prefix read, like a truncated cluster; ranking inside it
    would need keys that are on flash). Layers with index < ``full_layers`` attend everything
    (Quest and ClusterKV keep the first two layers dense): their selection is full
    (``heads=None``, no index, no groups).

    ``index_vectors[h, s] = 2 * ceil((P + s) / page_tokens)`` (a min and a max vector per
    page); ``prefill_groups`` / ``append_groups`` = page ids, so cluster-aware layouts and
    caches see pages as units (pages are runs of consecutive positions, so the cluster layout
    equals the sequence layout here).

    Parameters:
        budget (int | float, default 1024): tokens per step and KV head, or a fraction in
            (0, 1] of the context.
        sink_tokens (int, default 0): leading positions always attended (Quest keeps none).
        recent_tokens (int, default 16): newest positions always attended (held in DRAM);
            one page's worth, standing in for Quest always attending the current, partly
            filled page.
        page_tokens (int, default 16): tokens per page (Quest's page size).
        full_layers (int, default 2): layers with index below this use full attention.
        group_reduce (str, default "sum"): "sum" or "max" of a page's bounds over the query
            heads sharing a KV head.
    """

    budget: float = 1024
    sink_tokens: int = 0
    recent_tokens: int = 16
    page_tokens: int = 16
    full_layers: int = 2
    group_reduce: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("page_tokens", self.page_tokens)
        if self.page_tokens < 1:
            raise ValueError(f"page_tokens must be >= 1, got {self.page_tokens}")
        self.check_full_layers()
        if self.group_reduce not in GROUP_REDUCTIONS:
            raise ValueError(
                f"group_reduce must be one of {GROUP_REDUCTIONS}, got {self.group_reduce!r}"
            )

    def trace_problem(self, trace: Trace) -> str | None:
        # the page index pads the keys to whole pages: a page beyond the trace is no paging at
        # all, and a huge one would allocate page_tokens keys per head
        if self.page_tokens > trace.n_positions:
            return (
                f"page_tokens (={self.page_tokens}) exceeds the trace's {trace.n_positions} "
                "positions"
            )
        return None

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import FullOnline, QuestOnline

        if self.is_dense_layer(layer):
            return FullOnline(n_kv_heads, capacity, rng)
        return QuestOnline(self, n_kv_heads, capacity, rng)

    def page_vectors(self, context: np.ndarray) -> np.ndarray:
        """Index vectors at stored context lengths ``context``: a min and a max per page."""
        return 2 * -(-np.asarray(context, dtype=np.int64) // self.page_tokens)

    def index_floor(self, prompt_len: int, step: int, head_dim: int) -> int:
        return int(self.page_vectors(np.array([prompt_len + step]))[0])

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        prompt, n_steps, n_kv = ctx.prompt_len, ctx.decode_steps, ctx.n_kv_heads
        t = self.page_tokens
        index = PageIndex(np.asarray(ctx.keys, dtype=np.float32), t)
        queries = np.asarray(ctx.queries, dtype=np.float32)
        grouped = queries.reshape(n_kv, ctx.queries_per_kv_head, n_steps, queries.shape[2])

        def page_order(start: int, stop: int) -> np.ndarray:
            """(H_kv, steps, pages visible by the last step): pages by bound, best first."""
            contexts = prompt + np.arange(start, stop)
            scores = index.page_scores(grouped[:, :, start:stop], contexts, self.group_reduce)
            return np.argsort(-scores, axis=-1, kind="stable")

        def score_steps(start: int, stop: int) -> np.ndarray:
            width = prompt + stop
            order = page_order(start, stop)
            n_pages = order.shape[-1]
            # Lexicographic (page rank, earliest position) packed into one exact number
            # (integers below 2^53): rank * (width + 1) + (width - position).
            priority = np.empty(order.shape, np.float64)
            ranks = np.arange(n_pages, 0, -1, dtype=np.float64) * (width + 1)
            np.put_along_axis(priority, order, np.broadcast_to(ranks, order.shape), axis=-1)
            # Positions of a page past the last one scored are at or after every step's own
            # position (the base masks them): clip them onto any page.
            page_of = np.minimum(np.arange(width) // t, n_pages - 1)
            return priority[..., page_of] + np.arange(width, 0, -1, dtype=np.float64)

        context = prompt + np.arange(n_steps, dtype=np.int64)
        page_of = (np.arange(prompt + n_steps) // t).astype(np.int32)
        return LayerIndex(
            score_steps,
            index_vectors=np.broadcast_to(self.page_vectors(context), (n_kv, n_steps)).copy(),
            prefill_groups=np.broadcast_to(page_of[:prompt], (n_kv, prompt)).copy(),
            append_groups=np.broadcast_to(page_of[prompt:], (n_kv, n_steps)).copy(),
            groups=GroupRanking(np.broadcast_to(page_of, (n_kv, prompt + n_steps)), page_order),
        )
