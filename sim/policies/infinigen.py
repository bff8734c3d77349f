"""InfiniGen: next-layer tokens speculated from partial queries and a partial key cache."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from . import POLICIES
from .base import BudgetedPolicy, FullLayersMixin, HeadSelections, LayerContext, LayerSelection

if TYPE_CHECKING:
    from sim.trace.format import Trace

    from .online import OnlineLayer

RECAPTURE_HINT = (
    "the trace has no speculative queries (captured before kvsim stored them, trace format 1); "
    "recapture it: `kvsim capture ...` with the same settings, or run the experiment again, "
    "since get_or_capture now keys traces by the new format"
)


def partial_channels(
    prompt_queries: np.ndarray, prompt_keys: np.ndarray, n_channels: int
) -> np.ndarray:
    """Per KV head, the ``n_channels`` channels with the largest ``mean|q_d| * mean|k_d|``.

    ``prompt_queries`` (H_q, P', d), ``prompt_keys`` (H_kv, P, d); a KV head pools the query
    heads of its KV head. ``mean|q_d| * mean|k_d|`` is the mean of ``|q_d * k_d|`` over every
    (prompt query, prompt key) pair: the channels that move ``q . k`` most. Returns (H_kv,
    n_channels) int64, each row sorted ascending (ties: the lower channel).
    """
    n_q, _, head_dim = prompt_queries.shape
    n_kv = prompt_keys.shape[0]
    q_mag = np.abs(prompt_queries).mean(axis=1).reshape(n_kv, n_q // n_kv, head_dim).mean(axis=1)
    importance = q_mag * np.abs(prompt_keys).mean(axis=1)
    order = np.argsort(-importance, axis=-1, kind="stable")[:, :n_channels]
    return np.sort(order, axis=-1)


@POLICIES.register("infinigen")
@dataclass
class InfiniGen(FullLayersMixin, BudgetedPolicy):
    """InfiniGen speculative KV prefetching (Lee et al., OSDI 2024; github snu-comparch/InfiniGen).

    During layer ``l``, InfiniGen multiplies layer ``l``'s attention input by a *partial* query
    weight of layer ``l + 1`` and scores the result against a *partial* key cache of layer
    ``l + 1`` (a ``partial_ratio`` fraction of each head's channels, kept in DRAM); the tokens
    it deems important are fetched while layer ``l`` computes. Here the speculative query of
    layer ``l >= 1`` is the trace's ``speculative_queries`` (layer ``l``'s query path applied to
    layer ``l - 1``'s input, :mod:`sim.trace.recording`); layer 0, which nothing precedes, is
    scored the same way with its own decode query. ``selection_lead_layers = 1`` tells the
    engine to issue layer ``l + 1``'s reads during layer ``l``, right after its QKV projection.

    Per decode step ``s`` (context ``c = P + s``, positions ``[0, c)``), as in the reference
    code (``speculate_attention``, ``kv_cache_mask``):

    1. every query head ``q`` scores the stored positions with the partial dot product of its
       KV head's channels, in logit units: ``x_q(t) = q[C] . k_t[C] / sqrt(head_dim)``;
    2. ``count_q = #{t : x_q(t) >= max_t x_q - alpha}``; the layer fetches
       ``n = floor(mean_q count_q)`` tokens per KV head (the same number for every head, as the
       reference does). ``n >= 1``: each head's maximum is within ``alpha`` of itself, so no
       separate floor is needed;
    3. each KV head takes its ``n`` best positions by the summed speculative softmax of its
       query heads ``sum_{q of the KV head} softmax(x_q)(t)`` (GQA; InfiniGen's models are MHA,
       where this is the head's own ranking); forced sinks and recent tokens come on top, the
       total capped at the budget (``min(budget_at(c), forced + n)``, best speculative scores
       kept first).

    So the selection size varies with the step and layer, always ``<= budget_at(c)``.

    Deviations from the paper, which the trace cannot support:

    * channel choice: InfiniGen skews each layer's query/key weights offline (an SVD-based
      orthogonal transform) and keeps the channels with the largest summed ``|q|`` of the
      skewed prompt queries. The trace holds no weights, so the channels are not skewed; per KV
      head the ``partial_ratio`` fraction (``int(partial_ratio * head_dim)``, at least 1) with
      the largest ``mean|q_d| * mean|k_d|`` over the prompt's queries (of the KV head) and keys
      is kept (:func:`partial_channels`). Needs the prompt queries (capture with
      ``queries='all'``). Without skewing, the partial scores track the full ones less closely
      than in the paper.
    * InfiniGen's reference code runs layer 0 dense (no previous layer to speculate from);
      here it is speculated from its own query unless ``full_layers >= 1``.
    * the partial query projection (``partial_ratio`` of layer ``l + 1``'s q_proj) is neither
      timed nor counted in DRAM; only the partial key cache is (``index_vectors``).

    ``index_vectors[h, s] = ceil(c * n_channels / head_dim)``: the partial key cache of the
    ``c`` stored positions, in key-sized vectors (its DRAM footprint and scoring cost).
    Needs traces with speculative queries (format 2); older traces raise ValueError asking for
    a recapture.

    Parameters:
        budget (int | float, default 0.2): the cap on tokens per step and KV head, or a fraction
            in (0, 1] of the context (the reference's ``budget = 0.2``).
        sink_tokens (int, default 0): leading positions always attended (InfiniGen keeps none).
        recent_tokens (int, default 0): newest positions always attended (InfiniGen keeps none).
        partial_ratio (float, default 0.3): fraction of each head's channels in the partial
            query and key, in (0, 1].
        alpha (float, default 4.0): a token is counted when its speculative logit is within
            ``alpha`` of the head's maximum (the reference's speedup scripts use 4).
        full_layers (int, default 0): layers with index below this use full attention (1
            reproduces the reference code's dense layer 0).
    """

    budget: float = 0.2
    sink_tokens: int = 0
    recent_tokens: int = 0
    partial_ratio: float = 0.3
    alpha: float = 4.0
    full_layers: int = 0

    selection_lead_layers: ClassVar[int] = 1
    needs_speculative_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.partial_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"partial_ratio must be in (0, 1], got {ratio!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        self.check_full_layers()

    def trace_problem(self, trace: Trace) -> str | None:
        if trace.query_start >= trace.prompt_len:
            return (
                "infinigen chooses its partial channels from the prompt's queries; the trace "
                "stores none (capture with queries: all)"
            )
        if trace.model.n_layers <= max(1, self.full_layers):
            return None  # every layer that would speculate is dense (layer 0 never does)
        gap = getattr(trace, "speculative_gap", None)
        if gap:
            return f"{self.name} needs speculative queries: {gap}"
        if not trace.has_speculative_queries:
            return RECAPTURE_HINT
        return None

    def n_channels(self, head_dim: int) -> int:
        """Channels of the partial query and key cache per head."""
        return max(1, int(head_dim * self.partial_ratio))

    def partial_vectors(self, context: np.ndarray, head_dim: int) -> np.ndarray:
        """The partial key cache of ``context`` stored positions, in key-sized vectors."""
        return -(-np.asarray(context, dtype=np.int64) * self.n_channels(head_dim) // head_dim)

    def index_floor(self, prompt_len: int, step: int, head_dim: int) -> int:
        return int(self.partial_vectors(np.array([prompt_len + step]), head_dim)[0])

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import FullOnline, InfiniGenOnline

        if self.is_dense_layer(layer):
            return FullOnline(n_kv_heads, capacity, rng)
        return InfiniGenOnline(self, layer, n_kv_heads, capacity, rng)

    def index_layer(self, ctx: LayerContext):  # pragma: no cover - select_layer is overridden
        raise NotImplementedError("InfiniGen selects through select_layer")

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        if self.is_full_layer(ctx):
            return LayerSelection.full(ctx)
        queries = self._speculative(ctx)
        prompt, n_steps, n_kv = ctx.prompt_len, ctx.decode_steps, ctx.n_kv_heads
        keys = np.asarray(ctx.keys, dtype=np.float32)
        head_dim, q_per_kv = keys.shape[2], ctx.queries_per_kv_head
        if ctx.query_start >= prompt:
            raise ValueError(
                "infinigen chooses its partial channels from the prompt's queries; the trace "
                "stores none (capture with queries='all')"
            )
        m = self.n_channels(head_dim)
        channels = partial_channels(
            ctx.prompt_queries(ctx.query_start), keys[:, :prompt], m
        )
        per_head: list[list[np.ndarray]] = [[] for _ in range(n_kv)]
        for start in range(0, n_steps, self.score_chunk_steps):
            stop = min(n_steps, start + self.score_chunk_steps)
            logits = self._partial_logits(queries, keys, channels, prompt, start, stop)
            counts = self.fetch_counts(logits)
            ranking = self._kv_head_ranking(logits, n_kv, q_per_kv)
            for h in range(n_kv):
                for row, step in enumerate(range(start, stop)):
                    per_head[h].append(self._pick(ranking[h, row], prompt + step, counts[row]))
        heads = [HeadSelections.from_lists(rows) for rows in per_head]
        vectors = self.partial_vectors(prompt + np.arange(n_steps, dtype=np.int64), head_dim)
        selection = LayerSelection(heads, np.broadcast_to(vectors, (n_kv, n_steps)).copy())
        return self.with_dram(selection, ctx)

    def _speculative(self, ctx: LayerContext) -> np.ndarray:
        """The queries the layer is scored with: speculated from the previous layer's input
        (layers >= 1), the layer's own for layer 0."""
        if ctx.layer == 0:
            return np.asarray(ctx.queries, dtype=np.float32)
        if ctx.speculative_queries is None:
            raise ValueError(RECAPTURE_HINT)
        spec = np.asarray(ctx.speculative_queries, dtype=np.float32)
        if spec.shape != ctx.queries.shape:
            raise ValueError(
                f"speculative queries have shape {list(spec.shape)}, the decode queries "
                f"{list(ctx.queries.shape)}"
            )
        return spec

    @staticmethod
    def _partial_logits(
        queries: np.ndarray,
        keys: np.ndarray,
        channels: np.ndarray,
        prompt: int,
        start: int,
        stop: int,
    ) -> np.ndarray:
        """Speculative logits (H_q, steps, P + stop) over the partial channels of each KV head;
        a step's own and later positions are ``-inf``."""
        n_q, _, head_dim = queries.shape
        n_kv = keys.shape[0]
        q_per_kv = n_q // n_kv
        width = prompt + stop
        scale = np.float32(1.0 / math.sqrt(head_dim))
        out = np.empty((n_q, stop - start, width), np.float32)
        for h in range(n_kv):
            k_part = keys[h, :width][:, channels[h]]  # (width, m)
            q_part = queries[h * q_per_kv : (h + 1) * q_per_kv, start:stop][..., channels[h]]
            np.matmul(q_part * scale, k_part.T, out=out[h * q_per_kv : (h + 1) * q_per_kv])
        rel = np.arange(width)[None, :] - (prompt + np.arange(start, stop))[:, None]
        out[:, rel >= 0] = -np.inf
        return out

    def fetch_counts(self, logits: np.ndarray) -> np.ndarray:
        """Tokens to fetch per step: ``floor`` of the mean, over the query heads, of the
        positions within ``alpha`` of each head's maximum. ``logits`` (H_q, steps, width)."""
        peak = logits.max(axis=-1, keepdims=True)
        within = (logits >= peak - np.float32(self.alpha)).sum(axis=-1)  # (H_q, steps)
        return np.floor(within.mean(axis=0) + 1e-9).astype(np.int64)

    @staticmethod
    def _kv_head_ranking(logits: np.ndarray, n_kv: int, q_per_kv: int) -> np.ndarray:
        """(H_kv, steps, width): each KV head's query heads' summed speculative softmax."""
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        return weights.reshape(n_kv, q_per_kv, *weights.shape[1:]).sum(axis=1)

    def _pick(self, ranking: np.ndarray, context: int, count: int) -> np.ndarray:
        """Forced positions plus the ``count`` best by ``ranking``, at most the budget."""
        forced = self._n_forced(context)
        k = min(self.budget_at(context), forced + int(count))
        if k >= context:
            return np.arange(context, dtype=np.int32)
        if k <= forced:
            return self._forced_prefix(context, k)
        scores = np.array(ranking[:context], dtype=np.float64)
        scores[: self.sink_tokens] = np.inf
        scores[max(0, context - self.recent_tokens) :] = np.inf
        top = np.argpartition(scores, context - k)[context - k :]
        return np.sort(top).astype(np.int32)
