"""The contract every KV-retrieval policy fulfils.

A policy runs **layer by layer** over a trace: given one layer's keys and decode queries it
returns, for every decode step and KV head, the positions it attends (its *selection*). The
selection is the only thing that links accuracy (``sim.metrics.accuracy``) to latency
(``sim.replay``); policies never see the device, the cache or simulated time.

Conventions (shared by all policies, the accuracy metrics and the engine):

* decode step ``s`` (0-based) generates the token at position ``P + s`` (``P`` = prompt length);
  its query attends the stored context ``[0, P + s)`` plus its own fresh key/value;
* a selection lists positions in ``[0, P + s)``, sorted and unique; the current token is always
  attended from DRAM and never listed;
* the budget counts every listed position, sinks and recent window included.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from sim.policies.online import OnlineLayer
    from sim.trace.format import Trace


@dataclass(frozen=True)
class LayerContext:
    """One trace layer's data handed to a policy.

    ``keys``: (n_kv_heads, P + S, head_dim) float32, every stored position;
    ``queries``: (n_q_heads, S, head_dim) float32, the decode steps' queries (post-RoPE);
    query head ``q`` belongs to KV head ``q // queries_per_kv_head``.
    ``stored_queries``: the trace's query array of this layer as stored (memory-mapped,
    float16, positions ``query_start ..``), for policies that need prompt queries (H2O's
    accumulated attention, co-retrieval statistics); read it through :meth:`prompt_queries`.
    ``speculative_queries``: (n_q_heads, S, head_dim) float32, this layer's decode queries
    speculated from the previous layer's attention input (InfiniGen); ``None`` for layer 0 and
    for traces captured without them (see ``Trace.speculative_queries``).
    """

    layer: int
    keys: np.ndarray
    queries: np.ndarray
    prompt_len: int
    rng: np.random.Generator
    stored_queries: np.ndarray | None = None
    query_start: int = 0
    speculative_queries: np.ndarray | None = None

    def prompt_queries(self, start: int = 0) -> np.ndarray:
        """Queries of prompt positions ``[start, P)`` as float32 (n_q_heads, P - start, d).

        Raises ValueError if the trace does not store them (captured with queries="decode").
        """
        if self.stored_queries is None or start < self.query_start:
            raise ValueError(
                f"the trace stores queries from position {self.query_start} on; this policy "
                f"needs them from position {start} (capture with queries='all')"
            )
        rows = slice(start - self.query_start, self.prompt_len - self.query_start)
        return np.asarray(self.stored_queries[:, rows], dtype=np.float32)

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def decode_steps(self) -> int:
        return self.queries.shape[1]

    @property
    def queries_per_kv_head(self) -> int:
        """Query heads sharing one KV head (GQA)."""
        return self.queries.shape[0] // self.keys.shape[0]

    def context_len(self, step: int) -> int:
        """Stored positions visible at decode step ``step`` (the current token excluded)."""
        return self.prompt_len + step


@dataclass
class HeadSelections:
    """Ragged per-step position lists of one KV head, stored flat (CSR-like).

    ``positions[offsets[s]:offsets[s + 1]]`` are the positions attended at step ``s``.
    Policies make ``positions`` int32; the policy pass stores a finished layer's in the
    smallest unsigned dtype that holds the trace's positions (:meth:`compacted`: uint16 up
    to 65,536 positions, half the memory of a long decode's selections); :meth:`at` returns
    int32 either way.
    """

    positions: np.ndarray  # int32 (or compacted), concatenated, each step's slice sorted, unique
    offsets: np.ndarray  # int64, length S + 1

    @classmethod
    def from_lists(cls, per_step: list[np.ndarray]) -> HeadSelections:
        sizes = np.fromiter((len(p) for p in per_step), dtype=np.int64, count=len(per_step))
        offsets = np.zeros(len(per_step) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = (
            np.concatenate(per_step).astype(np.int32, copy=False)
            if per_step
            else np.zeros(0, np.int32)
        )
        return cls(flat, offsets)

    def at(self, step: int) -> np.ndarray:
        """The positions of step ``step``, int32 (a view, or a copy of compacted positions)."""
        chunk = self.positions[self.offsets[step] : self.offsets[step + 1]]
        return chunk if chunk.dtype == np.int32 else chunk.astype(np.int32)

    def compacted(self, n_positions: int) -> HeadSelections:
        """The same selections with positions in the smallest unsigned integer dtype holding
        ``[0, n_positions)`` (``self`` if that is no smaller than the current dtype)."""
        dtype = np.min_scalar_type(max(0, n_positions - 1))
        if dtype.itemsize >= self.positions.dtype.itemsize:
            return self
        return HeadSelections(self.positions.astype(dtype), self.offsets)

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class Relabel:
    """After decode step ``step`` (its new token placed), ``positions`` belong to ``group``."""

    step: int
    positions: np.ndarray
    group: int


@dataclass
class LayerSelection:
    """What a policy decided for one trace layer.

    ``heads[h]`` holds KV head ``h``'s selections; ``None`` means full attention (every stored
    position, nothing fetched from flash by definition of the reference).
    ``index_vectors[h, s]``: key-sized vectors the policy keeps in DRAM and scores the query
    against at step ``s`` (cluster representatives, page bounds, keys); drives the scoring cost
    and the index's DRAM footprint.
    ``prefill_groups[h, p]`` / ``append_groups[h, s]``: the unit (cluster) each prefill position /
    decode token belongs to, for cluster-aware layouts and caches; ``None`` if the policy has none.
    ``relabels[h]``: time-ordered :class:`Relabel` events of KV head ``h`` (cluster splits move
    positions to a new group); ``None`` if groups never change after assignment.
    ``extra_reads[h]``: positions read from flash into DRAM at step ``s`` *without* being
    attended (DynaKV's forced load-and-split when its split buffers fill); ``None`` if none.
    ``coretrieval[h]``: (n_groups, n_groups) counts of how often two prefill groups were
    retrieved together, measured before decoding (for layouts that co-locate them, DynaKV
    Fig. 7); ``None`` if the policy does not measure it.
    ``window``: set (to ``w``) only for a sliding-window layer of the model itself (Gemma 3's
    local layers, see :meth:`sliding_window`): ``heads`` then lists the window, which stays in
    DRAM (no cache, no flash); ``None`` for every policy-made selection.

    What the policy holds in DRAM outside the cache (never looked up in it, never read from
    flash; the replay counts it in :mod:`sim.footprint`):
    ``dram_sinks``: positions ``[0, dram_sinks)``, the forced attention sinks.
    ``dram_tail[s]``: the policy's window at step ``s`` is the stored positions
    ``[dram_tail[s], P + s)`` (a forced recent window, ClusterKV's unclustered window), the
    same for every KV head; the token appended at step ``s`` joins it instead of the cache and
    leaves DRAM when it leaves the window (it was written to flash on append). ``None``: no
    window; appended tokens go into the cache.
    ``kept_in_dram``: the selection *is* the KV the policy keeps (eviction policies: H2O,
    StreamingLLM; what they evict never returns): the layer is attended wholly from DRAM
    like a sliding window (no cache, no flash reads or writes).
    ``split_buffers[h]``: per step, the positions in KV head ``h``'s split buffers at the
    *end* of step ``s`` (DynaKV's delayed-split buffers, in DRAM); ``None`` if never any.
    """

    heads: list[HeadSelections] | None
    index_vectors: np.ndarray
    prefill_groups: np.ndarray | None = None
    append_groups: np.ndarray | None = None
    relabels: list[list[Relabel]] | None = None
    extra_reads: list[HeadSelections] | None = None
    coretrieval: list[np.ndarray] | None = None
    window: int | None = None
    dram_sinks: int = 0
    dram_tail: np.ndarray | None = None
    kept_in_dram: bool = False
    split_buffers: list[HeadSelections] | None = None

    @property
    def is_full(self) -> bool:
        return self.heads is None

    @property
    def is_resident(self) -> bool:
        """Attended wholly from DRAM, nothing cached or read: full attention, a sliding
        window or an eviction policy's kept set."""
        return self.heads is None or self.window is not None or self.kept_in_dram

    @classmethod
    def full(cls, ctx: LayerContext) -> LayerSelection:
        """Every stored position, no index, no groups (the reference, or a dense layer)."""
        return cls(heads=None, index_vectors=np.zeros((ctx.n_kv_heads, ctx.decode_steps), np.int64))

    @classmethod
    def sliding_window(cls, ctx: LayerContext, window: int) -> LayerSelection:
        """A sliding-window layer of ``window`` positions, as the model attends it.

        The convention is transformers' (``sliding_window_overlay``: key ``j`` is visible to
        query ``i`` iff ``j > i - window``, on top of the causal ``j <= i``): the query at
        position ``t = P + s`` attends ``(t - window, t]``, its own key included, i.e. the
        stored positions ``[max(0, t - window + 1), t)`` (``min(window - 1, t)`` of them) plus
        the current token. Every KV head lists the same window; no index, no groups.
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"a sliding window must be an integer >= 1, got {window!r}")
        ends = ctx.prompt_len + np.arange(ctx.decode_steps, dtype=np.int64)  # t = P + s
        starts = np.maximum(0, ends - window + 1)
        offsets = np.zeros(ctx.decode_steps + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        # position of every entry: its step's window start plus its rank inside the window
        step_of = np.repeat(np.arange(ctx.decode_steps), ends - starts)
        positions = (starts[step_of] + np.arange(offsets[-1]) - offsets[step_of]).astype(np.int32)
        heads = HeadSelections(positions, offsets)
        return cls(
            heads=[heads] * ctx.n_kv_heads,
            index_vectors=np.zeros((ctx.n_kv_heads, ctx.decode_steps), np.int64),
            window=window,
        )


def tokens_for_budget(budget: float, context_len: int) -> int:
    """Resolve a budget (an int = tokens, a float in (0, 1] = fraction) at one context length."""
    if isinstance(budget, float) and budget <= 1.0:
        return min(context_len, max(1, math.ceil(budget * context_len)))
    return min(context_len, int(budget))


def validate_budget(budget: float) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a token count or a fraction, got {budget!r}")
    if isinstance(budget, float) and not (0.0 < budget <= 1.0) and not budget.is_integer():
        raise ValueError(f"budget as a fraction must be in (0, 1], got {budget}")
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")


class RetrievalPolicy(ABC):
    """Base of every KV-retrieval policy. Subclasses are dataclasses whose fields are their
    hyperparameters, registered in :data:`sim.policies.POLICIES` under a name.

    ``selection_needs_query``: ``False`` for policies whose selection does not depend on the
    current query (StreamingLLM), so the engine may start their reads before scoring.
    ``selection_lead_layers``: 1 for policies that select layer ``l + 1``'s entries during layer
    ``l`` (InfiniGen's speculation): the engine scores layer ``l + 1``'s index and issues its
    reads right after layer ``l``'s QKV projection; layer 0 is scored and read at its own
    scoring point. 0 (the default): each layer selects for itself.
    ``needs_speculative_queries``: ``True`` for policies that read
    ``LayerContext.speculative_queries`` (InfiniGen), so a trace split before its captured
    prompt's end (which has none for the earlier decode steps) is refused before any work.
    ``keeps_selection_in_dram``: ``True`` for eviction policies (H2O, StreamingLLM), whose
    selection is the whole KV they keep, in DRAM (``LayerSelection.kept_in_dram``).

    The methods :meth:`is_dense_layer`, :meth:`dram_window`, :meth:`dram_held_entries` and
    :meth:`index_floor` describe the policy's DRAM without a trace, so a total DRAM target
    (``cache.dram_total``) can be checked before any pass (:mod:`sim.footprint`).
    """

    name: ClassVar[str]
    selection_needs_query: ClassVar[bool] = True
    selection_lead_layers: ClassVar[int] = 0
    needs_speculative_queries: ClassVar[bool] = False
    keeps_selection_in_dram: ClassVar[bool] = False

    @abstractmethod
    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        """Selections of every decode step and KV head of one layer."""

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer | None:
        """The policy's step-wise form of trace layer ``layer`` (:mod:`sim.policies.online`):
        ``n_kv_heads`` KV heads, at most ``capacity`` stored positions, ``rng`` the layer's
        random stream (the pass's ``default_rng([seed, layer])``). ``None``: no online form
        yet (the closed-loop driver refuses the policy)."""
        return None

    def min_context(self) -> int:
        """The smallest context length the policy's settings make sense for (config check)."""
        return 1

    def is_dense_layer(self, layer: int) -> bool:
        """Whether the policy attends trace layer ``layer`` in full (no selection)."""
        return False

    def dram_window(self, prompt_len: int, steps: np.ndarray) -> tuple[int, np.ndarray | None]:
        """``(sinks, tail)``: the positions the policy holds in DRAM outside the cache at decode
        ``steps``, ``[0, sinks)`` and ``[tail[i], prompt_len + steps[i])`` (see
        :class:`LayerSelection`'s ``dram_sinks`` / ``dram_tail``); ``tail`` ``None``: no
        window. Default: nothing."""
        return 0, None

    def dram_held_entries(self, prompt_len: int, step: int) -> int:
        """KV entries per KV head the policy holds in DRAM outside the cache at the end of
        decode ``step`` (its sinks and window with the appended token, or its kept set with
        it), as :func:`sim.footprint.window_entries` counts them from the selection."""
        from sim.footprint import window_entries  # the one count, shared with the replay

        sinks, tail = self.dram_window(prompt_len, np.array([step]))
        return int(window_entries(sinks, None if tail is None else int(tail[0]), prompt_len + step))

    def index_floor(self, prompt_len: int, step: int, head_dim: int) -> int:
        """A lower bound on the index vectors per KV head at decode ``step`` (the exact count is
        the pass's ``index_vectors``); ``head_dim``: the trace's. Default 0."""
        return 0

    def trace_problem(self, trace: Trace) -> str | None:
        """Why the policy cannot run on ``trace`` (an opened trace, possibly a split; nothing
        of its arrays is read), or ``None``. Planning asks before any work, so data the trace
        lacks (prompt queries, speculative queries) or a geometry the settings do not fit is
        one line up front instead of a failure inside the run. The default: no requirement."""
        return None

    def kept_tail_start(self, prompt_len: int, step: int) -> int:
        """First position of the tail the policy attends at decode ``step`` whatever the scores
        (its recent window), so statistics can tell retrieval from keeping; the step's context
        is ``[0, prompt_len + step]``."""
        return prompt_len + step + 1 - int(getattr(self, "recent_tokens", 0) or 0)


# --------------------------------------------------------------------------------------------
# Exact decode attention (shared by oracle policies and sim.metrics.accuracy)
# --------------------------------------------------------------------------------------------


def decode_attention_weights(
    queries: np.ndarray,
    keys: np.ndarray,
    prompt_len: int,
    start: int,
    stop: int,
    out: np.ndarray | None = None,
    logits_out: np.ndarray | None = None,
    window: int | None = None,
    rows: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Unnormalised exact softmax weights of decode steps ``[start, stop)``, all heads at once.

    ``queries``: (H_q, S, d); ``keys``: (H_kv, >= P + stop, d), float32 preferably (any other
    dtype is converted); query head ``q`` reads KV head ``q // (H_q // H_kv)``.

    Returns ``(weights, norm, logits)``. ``weights`` (H_kv, G, C, P + stop) float32 holds
    ``exp(q.k / sqrt(d) - rowmax)`` over positions ``[0, P + s]`` (the step's own key included),
    floored at ``e^-80``, and exactly 0 after it; ``norm`` (H_kv, G, C) is the row sum, so
    ``weights / norm`` is the softmax. ``logits`` is ``None`` unless ``logits_out`` is given:
    then the shifted logits ``q.k / sqrt(d) - rowmax`` (-inf after the step's own position) are
    kept there, same shape, unclamped (so ranking by them has no ties from the floor).
    ``out`` / ``logits_out``: optional float32 buffers of at least ``H_kv * G * C * (P + stop)``
    elements, reused across chunks to save page faults.
    ``window``: a sliding-window layer's reference (see :meth:`LayerSelection.sliding_window`):
    step ``s`` sees only ``(P + s - window, P + s]``; earlier positions are treated like the
    future ones (logit -inf, weight exactly 0).
    ``rows``: only these decode steps (ascending, inside ``[start, stop)``), the ``C`` axis
    then being theirs (the sampled accuracy of ``accuracy_every``). With ``scratch`` (a buffer
    like ``out``) their logits come from the very same matrix product as without ``rows`` (the
    whole chunk's), so they are bit-identical to it whatever kernel the BLAS picks; without
    it, from the product of these rows alone, which is bit-identical only while the BLAS uses
    the same kernel for both shapes (see :data:`sim.metrics.accuracy.SMALL_PRODUCT`).
    Everything after the product runs on these rows only.
    """
    n_q, _, head_dim = queries.shape
    n_kv = keys.shape[0]
    q_per_kv = n_q // n_kv
    steps = stop - start if rows is None else len(rows)
    width = prompt_len + stop
    shape = (n_kv, q_per_kv * steps, width)

    def buffer(buf: np.ndarray | None) -> np.ndarray:
        if buf is None:
            return np.empty(shape, np.float32)
        return buf.reshape(-1)[: math.prod(shape)].reshape(shape)

    whole_chunk = rows is None or scratch is not None
    picked = slice(start, stop) if whole_chunk else rows
    q = np.asarray(queries[:, picked], dtype=np.float32) * np.float32(1.0 / math.sqrt(head_dim))
    q = q.reshape(n_kv, -1, head_dim)
    k = np.asarray(keys[:, :width], dtype=np.float32)
    w = buffer(out)
    logits = w if logits_out is None else buffer(logits_out)
    if rows is None or scratch is None:
        np.matmul(q, k.transpose(0, 2, 1), out=logits)
    else:
        whole = (n_kv, q_per_kv * (stop - start), width)
        product = scratch.reshape(-1)[: math.prod(whole)].reshape(whole)
        np.matmul(q, k.transpose(0, 2, 1), out=product)
        np.take(product.reshape(n_kv, q_per_kv, stop - start, width), np.asarray(rows) - start,
                axis=2, out=logits.reshape(n_kv, q_per_kv, steps, width))
    if rows is None:
        # Causality only bites in the trailing steps x steps block: step r sees P + start + r.
        tri_rows, cols = np.triu_indices(steps, 1)
        future = (slice(None), slice(None), tri_rows, prompt_len + start + cols)
        current = prompt_len + start + np.arange(steps)
    else:
        # row i sees up to P + rows[i]: the columns after it, up to the width, are the future
        current = prompt_len + np.asarray(rows, dtype=np.int64)
        after = width - 1 - current
        row_of = np.repeat(np.arange(steps), after)
        first = np.repeat(np.cumsum(after) - after, after)
        future = (slice(None), slice(None), row_of,
                  current[row_of] + 1 + np.arange(len(row_of)) - first)
    logits4 = logits.reshape(n_kv, q_per_kv, steps, width)
    logits4[future] = -np.inf
    expired = None
    if window is not None:
        # (steps, width): position j is out of step r's window iff j <= P + start + r - window
        expired = np.arange(width)[None, :] <= (current - window)[:, None]
        logits4[:, :, expired] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    # Floor at e^-80 so exp never yields float32 subnormals: such a weight is noise next to the
    # row max's 1, but subnormals make the later matmuls ~50x slower on x86.
    np.maximum(logits, np.float32(-80.0), out=w)
    np.exp(w, out=w)
    w4 = w.reshape(n_kv, q_per_kv, steps, width)
    w4[future] = 0.0
    if expired is not None:
        w4[:, :, expired] = 0.0
    return w4, w4.sum(axis=-1), (None if logits_out is None else logits4)


# --------------------------------------------------------------------------------------------
# Budgeted retrieval: the base owns budget, sinks and recent window; subclasses only score
# --------------------------------------------------------------------------------------------


@dataclass
class LayerIndex:
    """What a :class:`BudgetedPolicy` builds once per layer.

    ``score_steps(start, stop)`` returns token scores (H_kv, stop - start, P + stop), higher
    = attended first; entries at or after a step's own position are ignored. Ties are broken
    arbitrarily, so encode any secondary order (e.g. position inside a cluster) in the score.
    The array must be fresh and floating-point (float32 is fine if it ranks exactly): the base
    overwrites it in place to mark forced and invisible positions.
    ``index_vectors``, ``prefill_groups``, ``append_groups``: as in :class:`LayerSelection`.
    ``groups``: set when the scores rank whole groups (clusters, pages) each one's positions
    earliest first, or a window newest first: the same selections, computed on the groups
    (:class:`GroupRanking`);
    ``score_steps`` then stays the reference they equal.
    """

    score_steps: Callable[[int, int], np.ndarray]
    index_vectors: np.ndarray
    prefill_groups: np.ndarray | None = None
    append_groups: np.ndarray | None = None
    groups: GroupRanking | None = None


@dataclass
class GroupRanking:
    """Scores that rank groups of positions whole: what :class:`BudgetedPolicy`'s fill of
    ``score_steps`` selects, stated on the groups, so a step costs about its budget instead
    of its context (no per-position priorities, no partition of them).

    The scores it stands for (``cluster_priorities``, Quest's pages, StreamingLLM's recency):
    at decode step ``s``, first a *lead* window ``[lead[s], P + s)`` newest first (ClusterKV's
    unclustered window, StreamingLLM's everything after the sinks; none if ``lead`` is
    ``None``), then the groups of ``order`` in that order, then the
    positions of the groups ``order`` does not list, and inside each group (and among the
    unlisted) the earliest position first. Every such priority is distinct, so the top-k set
    is the first ``k`` positions of this order; the forced sinks and recent window come first,
    as in the fill.

    ``labels`` (H_kv, N): the group of every stored position, fixed over the decode (>= 0).
    ``order(start, stop)``: per KV head, a (stop - start, m) integer array: per decode step,
    group ids best first (distinct; groups without positions in the step's context may be
    listed anywhere).
    ``lead(start, stop)`` (stop - start,) integer, or ``None``.
    """

    labels: np.ndarray
    order: Callable[[int, int], Sequence[np.ndarray] | np.ndarray]
    lead: Callable[[int, int], np.ndarray] | None = None

    def members(self, h: int, sinks: int) -> GroupMembers:
        """KV head ``h``'s groups (:class:`GroupMembers`), ``sinks``: the forced sinks."""
        labels = np.asarray(self.labels[h])
        n_labels = int(labels.max()) + 1 if len(labels) else 0
        counts = np.bincount(labels, minlength=n_labels)
        by_label = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
        first = [int(np.searchsorted(m, sinks)) for m in by_label]
        return GroupMembers(labels, by_label, n_labels, first)


@dataclass
class GroupMembers:
    """One KV head's groups: ``labels`` (N,) as :attr:`GroupRanking.labels`, ``positions[g]``
    group ``g``'s positions ascending, ``n_labels`` the number of labels, ``first[g]`` how many
    of ``g``'s positions are sinks (below the unforced span)."""

    labels: np.ndarray
    positions: list[np.ndarray]
    n_labels: int
    first: list[int]


def check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")



class FullLayersMixin:
    """For policies with a ``full_layers`` field: layers with index below it attend everything
    (Quest and ClusterKV keep the first two layers dense; InfiniGen's reference code, one).

    The subclass declares the field (its default is the policy's own) and calls
    :meth:`check_full_layers` from ``__post_init__``; listed before its policy base, the mixin's
    :meth:`select_layer` answers the dense layers and hands the others on to that base. A
    subclass that defines its own ``select_layer`` starts it with
    ``if self.is_full_layer(ctx): return LayerSelection.full(ctx)``.
    """

    full_layers: int

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        """Full attention on the dense first layers, else the next class's selection."""
        if self.is_full_layer(ctx):
            return LayerSelection.full(ctx)
        return super().select_layer(ctx)  # type: ignore[misc]  # the policy base, next in the MRO

    def check_full_layers(self) -> None:
        """Raises ValueError unless ``full_layers`` is an integer >= 0."""
        check_count("full_layers", self.full_layers)

    def is_full_layer(self, ctx: LayerContext) -> bool:
        """Whether ``ctx``'s layer is one of the dense first layers."""
        return self.is_dense_layer(ctx.layer)

    def is_dense_layer(self, layer: int) -> bool:
        return layer < self.full_layers

#: :meth:`BudgetedPolicy._budget_rows`: rows decided by the budget alone, contexts, budgets and
#: the plain rows
BudgetRows = tuple[list[np.ndarray], np.ndarray, np.ndarray, list[int]]


@dataclass
class BudgetedPolicy(RetrievalPolicy):
    """A retrieval policy that attends a fixed token budget per (step, KV head).

    The base resolves the budget at each step's context length, forces the attention sinks
    ``[0, sink_tokens)`` and the recent window ``[P + s - recent_tokens, P + s)`` into the
    selection (they count toward the budget) and fills the rest with the highest-scoring
    positions from :meth:`index_layer`. If a fractional budget resolves below the forced set,
    sinks are kept first, then the newest recent tokens. The forced sinks and recent window are
    held in DRAM (:meth:`dram_window`), whatever the budget attends of them.

    Parameters (inherited by every subclass):
        budget (int | float, default 1024): tokens per step and KV head; a float in (0, 1] is a
            fraction of the step's context length (rounded up).
        sink_tokens (int, default 0): leading positions always attended.
        recent_tokens (int, default 0): newest stored positions always attended.
    """

    budget: float = 1024
    sink_tokens: int = 0
    recent_tokens: int = 0

    #: decode steps scored together; bounds the (H_kv, steps, context) score buffers.
    score_chunk_steps: ClassVar[int] = 32

    def __post_init__(self) -> None:
        validate_budget(self.budget)
        check_count("sink_tokens", self.sink_tokens)
        check_count("recent_tokens", self.recent_tokens)
        forced = self.sink_tokens + self.recent_tokens
        if self.token_budget is not None and forced > self.token_budget:
            raise ValueError(
                f"sink_tokens + recent_tokens (={forced}) exceed budget (={self.budget})"
            )

    @property
    def token_budget(self) -> int | None:
        """The budget in tokens if it is a count, ``None`` if it is a fraction."""
        if isinstance(self.budget, float) and self.budget <= 1.0:
            return None
        return int(self.budget)

    def min_context(self) -> int:
        return self.token_budget or 1

    def budget_at(self, context_len: int) -> int:
        return tokens_for_budget(self.budget, context_len)

    def dram_window(self, prompt_len: int, steps: np.ndarray) -> tuple[int, np.ndarray | None]:
        """The forced sinks and recent window, held in DRAM (PQCache keeps its initial and
        local tokens on the GPU, ClusterKV its sinks and unclustered window: the tokens a
        policy attends whatever the scores stay resident)."""
        if not self.recent_tokens:
            return self.sink_tokens, None
        steps = np.asarray(steps, dtype=np.int64)
        return self.sink_tokens, np.maximum(0, prompt_len + steps - self.recent_tokens)

    def dram_held_entries(self, prompt_len: int, step: int) -> int:
        if self.keeps_selection_in_dram:  # the kept set (at most the budget) + the new token
            context = prompt_len + step
            return min(self.budget_at(context), context) + 1
        return super().dram_held_entries(prompt_len, step)

    @abstractmethod
    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        """Build the layer's index (clusters, pages...) and return its scorer."""

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        index = self.index_layer(ctx)
        n_kv, n_steps, prompt = ctx.n_kv_heads, ctx.decode_steps, ctx.prompt_len
        per_head: list[list[np.ndarray]] = [[] for _ in range(n_kv)]
        groups = index.groups
        members = None if groups is None else [
            groups.members(h, self.sink_tokens) for h in range(n_kv)
        ]
        for start in range(0, n_steps, self.score_chunk_steps):
            stop = min(n_steps, start + self.score_chunk_steps)
            budgeted = self._budget_rows(prompt, start, stop - start)  # the same for every head
            if groups is None:
                scores = index.score_steps(start, stop)
                for h in range(n_kv):
                    per_head[h].extend(self._fill(scores[h], prompt, start, budgeted))
                continue
            assert members is not None  # built with groups
            order = groups.order(start, stop)
            lead = None if groups.lead is None else groups.lead(start, stop)
            for h in range(n_kv):
                per_head[h].extend(
                    self._fill_groups(members[h], order[h], prompt, start, lead, budgeted)
                )
        heads = [HeadSelections.from_lists(rows) for rows in per_head]
        selection = LayerSelection(
            heads, index.index_vectors, index.prefill_groups, index.append_groups
        )
        return self.with_dram(selection, ctx)

    def with_dram(self, selection: LayerSelection, ctx: LayerContext) -> LayerSelection:
        """``selection`` with what the policy holds in DRAM outside the cache: its kept set
        (``keeps_selection_in_dram``), else its sinks and window (:meth:`dram_window`)."""
        if self.keeps_selection_in_dram:
            selection.kept_in_dram = True
            return selection
        sinks, tail = self.dram_window(ctx.prompt_len, np.arange(ctx.decode_steps))
        selection.dram_sinks, selection.dram_tail = sinks, tail
        return selection

    def _budget_rows(self, prompt: int, start: int, n_rows: int) -> BudgetRows:
        """The rows of decode steps ``start, start + 1, ...``: their selections where the
        budget decides them alone (the whole context, or a prefix of the forced positions),
        the rows' context lengths and budgets, and the *plain* rows (``forced <= budget <
        context``), which take the best-scoring positions after the forced ones."""
        context = prompt + start + np.arange(n_rows)
        budgets = np.array([self.budget_at(int(c)) for c in context])
        rows: list[np.ndarray] = [np.empty(0, np.int32)] * n_rows
        plain = []
        for r, (c, k) in enumerate(zip(context.tolist(), budgets.tolist(), strict=True)):
            if k >= c:
                rows[r] = np.arange(c, dtype=np.int32)
            elif k < self._n_forced(c):
                rows[r] = self._forced_prefix(c, k)
            else:
                plain.append(r)
        return rows, context, budgets, plain

    def _fill_groups(
        self,
        head: GroupMembers,
        order: np.ndarray,
        prompt: int,
        start: int,
        lead: np.ndarray | None,
        budgeted: BudgetRows | None = None,
    ) -> list[np.ndarray]:
        """:meth:`_fill` of the scores a :class:`GroupRanking` stands for, one KV head:
        ``head`` its groups, ``order`` (steps, m) and ``lead`` (steps,) or ``None`` its
        ranking of the steps ``start, start + 1, ...``; ``budgeted``: their
        :meth:`_budget_rows` if known."""
        labels, members, n_labels, first = head.labels, head.positions, head.n_labels, head.first
        if budgeted is None:
            budgeted = self._budget_rows(prompt, start, len(order))
        rows, context, budgets, plain = budgeted
        rows = list(rows)  # filled in here: the caller's stays as it is
        if not plain:
            return rows
        sinks, recent = self.sink_tokens, self.recent_tokens
        picked = np.asarray(plain)
        context, k = context[picked], budgets[picked]
        hi = context - recent  # the unforced span is [sinks, hi): sinks < hi as k < context
        cut = hi if lead is None else np.maximum(sinks, np.minimum(hi, lead[picked]))
        rest = k - sinks - recent
        n_lead = np.minimum(hi - cut, rest)  # the lead window's share, newest first
        need = rest - n_lead  # the groups' share, taken from their positions in [sinks, cut)
        # Positions of every label in [sinks, cut) per row (cut grows with the rows).
        in_span = np.zeros((len(plain), n_labels), np.int64)
        in_span[0] = np.bincount(labels[sinks : cut[0]], minlength=n_labels)
        if len(plain) > 1:
            row_of = np.repeat(np.arange(1, len(plain)), np.diff(cut))
            np.add.at(in_span, (row_of, labels[cut[0] : cut[-1]]), 1)
            np.cumsum(in_span, axis=0, out=in_span)
        order = order[picked]
        ranked = np.take_along_axis(in_span, order, axis=1)
        filled = np.cumsum(ranked, axis=1)
        whole = (filled < need[:, None]).sum(axis=1)  # groups taken whole, in order
        for i, r in enumerate(plain):
            c, kk, top, low = int(context[i]), int(k[i]), int(hi[i]), int(cut[i])
            parts = []
            n_whole = int(whole[i])
            for g, count in zip(order[i, :n_whole].tolist(), ranked[i, :n_whole].tolist(),
                                strict=True):
                if count:
                    parts.append(members[g][first[g] : first[g] + count])
            left = int(need[i]) - (int(filled[i, n_whole - 1]) if n_whole else 0)
            if left > 0 and n_whole < order.shape[1]:  # the boundary group, its earliest
                g = int(order[i, n_whole])
                parts.append(members[g][first[g] : first[g] + left])
            elif left > 0:  # the unlisted groups' positions, earliest first
                unlisted = np.ones(n_labels, bool)
                unlisted[order[i]] = False
                parts.append(sinks + np.flatnonzero(unlisted[labels[sinks:low]])[:left])
            out = np.empty(kk, np.int32)
            out[:sinks] = np.arange(sinks)
            chosen = int(need[i])
            if parts:
                span = np.concatenate(parts)  # a fresh array: sorted in place
                span.sort()
                out[sinks : sinks + chosen] = span
            lead_part = int(n_lead[i])
            out[sinks + chosen : sinks + chosen + lead_part] = np.arange(top - lead_part, top)
            out[kk - recent :] = np.arange(top, c)
            rows[r] = out
        return rows

    def _fill(
        self, scores: np.ndarray, prompt: int, start: int, budgeted: BudgetRows | None = None
    ) -> list[np.ndarray]:
        """Top-budget positions of each row of ``scores`` (steps, P + stop), forced first;
        ``budgeted``: the rows' :meth:`_budget_rows` if known."""
        n_rows, width = scores.shape
        if budgeted is None:
            budgeted = self._budget_rows(prompt, start, n_rows)
        rows, context, budgets, plain_rows = budgeted
        rows = list(rows)  # filled in here: the caller's stays as it is
        if not np.issubdtype(scores.dtype, np.floating):
            scores = scores.astype(np.float64)
        # Forced and invisible positions: the sinks are a column block; the recent window and
        # the step's own/future positions form a band in the trailing columns.
        scores[:, : self.sink_tokens] = np.inf
        lo = max(0, prompt + start - self.recent_tokens)
        rel = np.arange(lo, width)[None, :] - context[:, None]
        tail = scores[:, lo:]
        tail[rel >= -self.recent_tokens] = np.inf
        tail[rel >= 0] = -np.inf
        if not plain_rows:
            return rows
        plain_budgets = budgets[plain_rows]
        for k in np.unique(plain_budgets):
            plain = [r for r, b in zip(plain_rows, plain_budgets, strict=True) if b == k]
            if plain:
                top = np.argpartition(scores[plain], width - k, axis=-1)[:, width - k :]
                top.sort(axis=-1)
                for r, sel in zip(plain, top.astype(np.int32), strict=True):
                    rows[r] = sel
        return rows

    def _n_forced(self, context_len: int) -> int:
        return min(context_len, self.sink_tokens + self.recent_tokens)

    def _forced_prefix(self, context_len: int, k: int) -> np.ndarray:
        """The first ``k`` forced positions, sinks first, then the newest recent ones.

        The sinks are ``[0, n_sinks)`` and the recent window counts down from the newest
        position, so the recent positions that are not sinks are those ``>= n_sinks``
        (no set lookup: this runs for every step of a short context, a long decode's start)."""
        n_sinks = min(self.sink_tokens, context_len)
        if k <= n_sinks:
            return np.arange(k, dtype=np.int32)
        newest = np.arange(context_len - 1, max(n_sinks, context_len - self.recent_tokens) - 1,
                           -1)[: k - n_sinks]
        return np.concatenate([np.arange(n_sinks), newest[::-1]]).astype(np.int32)
