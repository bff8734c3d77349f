"""PQCache: token-level top-k by maximum inner-product search over product-quantised keys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import POLICIES
from .base import BudgetedPolicy, LayerContext, LayerIndex, check_count
from .static_clusters import kmeans_labels, nearest_centroid, sum_by_label

if TYPE_CHECKING:
    from sim.trace.format import Trace

    from .online import OnlineLayer

GROUP_SCORES = ("softmax", "sum")
MAX_BITS = 16


@POLICIES.register("pqcache")
@dataclass
class PQCache(BudgetedPolicy):
    """PQCache (Zhang et al., SIGMOD 2025, arXiv 2407.12820): keys are product-quantised per
    (layer, KV head) at prefill and each decode step retrieves its top tokens by approximate
    inner product computed from the codes (MIPS over PQ), token by token like ``token_topk``.

    Codebooks: the head dimension ``d`` is split into ``n_subvectors`` contiguous sub-vectors of
    ``d / n_subvectors`` dims (``d`` must be divisible). Per sub-space, k-means (Lloyd, random
    initial points, ``max_iter`` iterations, seeded from the layer's random stream) with
    ``2 ** bits`` centroids (capped by the number of training keys) runs on the sub-vectors of
    the prefill keys *past the sinks* ``[sink_tokens, P)``: the sinks are always attended, so
    PQCache keeps them out of the quantised set. A centroid is the mean of its members. Every
    stored key (sinks, prefill and decode tokens) is encoded as the index of the nearest
    centroid (Euclidean) in each sub-space; the codebooks are **static**: decode tokens are
    encoded with the prefill codebooks, which are never updated.

    Scoring (lookup tables): for query ``q`` and sub-space ``m``, ``T_m[c] = q_m . C_m[c]`` for
    every centroid ``c``; a token with codes ``(c_1..c_M)`` scores ``sum_m T_m[c_m]`` (= ``q``
    against the token's reconstructed key). GQA (``group_score``): ``"softmax"`` (default)
    ranks a KV head's tokens by the sum over its query heads of the softmax of the approximate
    logits ``score / sqrt(d)`` (the current token's own key, in DRAM, enters the normaliser
    exactly), the same aggregation as ``token_topk``, so with exact codes both select the same
    tokens; ``"sum"`` ranks by the sum of the approximate scores over the KV head's query heads
    (MIPS with their summed query). The budgeted base forces the sinks and the recent window and
    fills the rest of the budget with the top-scoring tokens.

    ``index_vectors[h, s]`` (the DRAM index in key-sized vectors, driving the engine's scoring
    cost and index footprint): the codebooks, ``n_subvectors`` x ``2 ** bits`` centroids of
    ``d / n_subvectors`` dims = ``2 ** bits`` key-sized vectors (the configured size, not the
    cap), plus the codes of the ``P + s`` stored tokens packed at ``bits`` per code:
    ``ceil((P + s) * n_subvectors * bits / (8 * 2 * d))`` key-sized FP16 vectors (a key is
    ``2 d`` bytes). No groups: ``prefill_groups`` / ``append_groups`` are ``None``.

    Parameters:
        budget (int | float, default 1024): tokens per step and KV head, or a fraction in
            (0, 1] of the context.
        sink_tokens (int, default 32): leading positions always attended (PQCache's 32 initial
            tokens); excluded from codebook training.
        recent_tokens (int, default 32): newest positions always attended (PQCache's 32 local
            tokens).
        n_subvectors (int, default 2): PQ sub-spaces ``M``; must divide the head dimension.
        bits (int, default 6): bits per code, ``2 ** bits`` centroids per sub-space (1..16).
        max_iter (int, default 20): Lloyd iterations of each sub-space's k-means.
        group_score (str, default "softmax"): GQA aggregation over a KV head's query heads,
            "softmax" (sum of per-head softmax of the approximate logits) or "sum" (sum of the
            approximate inner products).
    """

    budget: float = 1024
    sink_tokens: int = 32
    recent_tokens: int = 32
    n_subvectors: int = 2
    bits: int = 6
    max_iter: int = 20
    group_score: str = "softmax"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_subvectors", "bits", "max_iter"):
            value = getattr(self, name)
            check_count(name, value)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.bits > MAX_BITS:
            raise ValueError(f"bits must be <= {MAX_BITS}, got {self.bits}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")

    def min_context(self) -> int:
        return max(super().min_context(), self.sink_tokens + 1)

    def trace_problem(self, trace: Trace) -> str | None:
        head_dim = trace.model.head_dim
        if head_dim % self.n_subvectors:
            return (
                f"n_subvectors (={self.n_subvectors}) must divide the trace's head dimension "
                f"(={head_dim})"
            )
        return None

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        prompt, n_steps, n_kv = ctx.prompt_len, ctx.decode_steps, ctx.n_kv_heads
        q_per_kv = ctx.queries_per_kv_head
        if prompt <= self.sink_tokens:
            raise ValueError(f"prompt of {prompt} tokens leaves nothing to quantise past the sinks")
        keys = np.asarray(ctx.keys, dtype=np.float32)
        queries = np.asarray(ctx.queries, dtype=np.float32)
        head_dim = keys.shape[2]
        if head_dim % self.n_subvectors:
            raise ValueError(
                f"n_subvectors (={self.n_subvectors}) must divide the head dimension (={head_dim})"
            )
        books, codes = [], []
        for h in range(n_kv):
            book, code = pq_train_encode(
                keys[h],
                self.sink_tokens,
                prompt,
                self.n_subvectors,
                self.bits,
                self.max_iter,
                ctx.rng,
            )
            books.append(book)
            codes.append(code)
        scale = np.float32(1.0 / math.sqrt(head_dim))

        def score_steps(start: int, stop: int) -> np.ndarray:
            width = prompt + stop
            out = np.empty((n_kv, stop - start, width), np.float32)
            for h in range(n_kv):
                q = queries[h * q_per_kv : (h + 1) * q_per_kv, start:stop]  # (G, steps, d)
                if self.group_score == "sum":
                    out[h] = lut_scores(q.sum(axis=0), books[h], codes[h][:width])
                    continue
                logits = lut_scores(q, books[h], codes[h][:width]) * scale  # (G, steps, width)
                rows = np.arange(stop - start)
                own = prompt + start + rows
                # The step's own key is in DRAM: its logit is exact; later positions invisible.
                logits[:, rows, own] = np.einsum("gsd,sd->gs", q, keys[h, own]) * scale
                logits[:, np.arange(width)[None, :] > own[:, None]] = -np.inf
                logits -= logits.max(axis=-1, keepdims=True)
                # Floor at e^-80 as decode_attention_weights does (no float32 subnormals).
                np.maximum(logits, np.float32(-80.0), out=logits)
                np.exp(logits, out=logits)
                logits /= logits.sum(axis=-1, keepdims=True)
                out[h] = logits.sum(axis=0)
            return out

        return LayerIndex(score_steps, self.index_vectors(prompt, n_steps, n_kv, head_dim))

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import PQCacheOnline

        return PQCacheOnline(self, n_kv_heads, capacity, rng)

    def index_floor(self, prompt_len: int, step: int, head_dim: int) -> int:
        return int(self.index_vectors(prompt_len + step, 1, 1, head_dim)[0, 0])

    def index_vectors(self, prompt: int, n_steps: int, n_kv: int, head_dim: int) -> np.ndarray:
        """(n_kv, n_steps) int64: ``2 ** bits + ceil((P + s) M bits / (16 d))``, see above."""
        context = prompt + np.arange(n_steps, dtype=np.int64)
        key_bits = 8 * 2 * head_dim  # one FP16 key
        code_vectors = -(-(context * self.n_subvectors * self.bits) // key_bits)
        row = 2**self.bits + code_vectors
        return np.broadcast_to(row, (n_kv, n_steps)).copy()


def pq_train_encode(
    keys: np.ndarray,
    train_start: int,
    train_stop: int,
    n_subvectors: int,
    bits: int,
    max_iter: int,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Product-quantise one head's keys (T, d).

    Per sub-space ``m`` (dims ``[m d/M, (m+1) d/M)``), k-means on the sub-vectors of
    ``keys[train_start:train_stop]`` with ``2 ** bits`` centroids (capped by the points; empty
    clusters dropped), centroid = mean of members. Returns the codebooks (a list of M arrays
    (k_m, d/M) float32) and the codes (T, M) int32 of *every* key: its nearest centroid.
    """
    sub = np.split(keys, n_subvectors, axis=1)
    books = []
    codes = np.empty((len(keys), n_subvectors), np.int32)
    for m, x in enumerate(sub):
        train = x[train_start:train_stop]
        labels = kmeans_labels(train, 2**bits, max_iter, int(rng.integers(2**31 - 1)))
        k = int(labels.max()) + 1
        size = np.bincount(labels, minlength=k).astype(np.float64)
        centroids = (sum_by_label(train, labels, k) / size[:, None]).astype(np.float32)
        books.append(centroids)
        codes[:, m] = nearest_centroid(x, centroids)
    return books, codes


def lut_scores(queries: np.ndarray, books: list[np.ndarray], codes: np.ndarray) -> np.ndarray:
    """Approximate ``q . k`` of every coded key by lookup tables.

    ``queries`` (..., d); ``books``: M codebooks (k_m, d/M); ``codes`` (T, M). Per sub-space the
    table ``q_m . C_m`` (..., k_m) is built once and gathered at the tokens' codes; the tables
    are summed over sub-spaces. Returns (..., T) float32.
    """
    q_sub = np.split(np.asarray(queries, dtype=np.float32), len(books), axis=-1)
    out = None
    for m, (q, book) in enumerate(zip(q_sub, books, strict=True)):
        table = q @ book.T  # (..., k_m)
        part = np.take(table, codes[:, m], axis=-1)
        out = part if out is None else np.add(out, part, out=out)
    assert out is not None  # np.split above fails on zero codebooks, so the loop ran
    return out
