"""DynaKV's migration-free cluster adaptation (arXiv 2511.07427, Technique 1, Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from . import POLICIES
from .base import (
    HeadSelections,
    LayerContext,
    LayerIndex,
    LayerSelection,
    Relabel,
)
from .online import OnlineLayer, group_queries
from .static_clusters import (
    ClusteredPolicy,
    cluster_space,
    kmeans_labels,
    nearest_centroid,
    prefill_coretrieval,
    sum_by_label,
)


@POLICIES.register("dynakv")
@dataclass
class DynaKV(ClusteredPolicy):
    """DynaKV (Liu et al., arXiv 2511.07427): cluster retrieval whose clusters split when decode
    tokens inflate their variance, without moving data on flash (Algorithm 1).

    Prefill: exactly :class:`~sim.policies.static_clusters.StaticClusters`' clustering (same
    k-means, same seed draw from ``ctx.rng``, sinks excluded and always attended, their group
    id = the initial cluster count ``n0``). Per KV head, ``tau_h`` is the ``tau_quantile``
    quantile (numpy's linear interpolation) of the prefill clusters' variances, a variance
    being the mean squared distance of a cluster's members to its centroid in the clustering
    space (raw keys, or L2-normalised keys for ``distance="cosine"``).

    Each decode step ``s`` and KV head, sequentially:

    1. *Select*: the group's mean query is scored against the representatives (mean raw key of
       the members counted in the statistics); clusters fill the budget in score order, the
       last one truncated to its earliest positions, sinks and recent window forced (the
       budgeted base and static_clusters' ranking). Entries waiting in a cluster's split buffer
       are in DRAM: they are attended with their cluster, ranked first inside it (so a truncated
       cluster keeps them). DRAM at step ``s`` = the selection plus every buffered entry; the
       *active (loaded) set* is the clusters whose members are all in DRAM (a truncated cluster
       is not active: its tail is on flash).
    2. *Place the new token* ``P + s``: it joins the cluster ``j`` of the nearest centroid; the
       variance with it is computed incrementally (Welford). If ``<= tau_h`` it is appended
       (size, centroid, representative, variance updated). Otherwise, if ``j`` is active,
       ``j`` (with its buffer and the new token) is split now; else the token goes to ``j``'s
       DRAM buffer (delayed split; a non-empty buffer is the split flag ``f_j``). Buffered
       entries carry ``j``'s label but are not in its statistics.
    3. Every active cluster with a non-empty buffer is split together with it.
    4. While the buffers hold ``>= buffer_max`` entries in total, the cluster with the largest
       buffer (lowest id on ties) is force-loaded and split: its members on flash (stored
       positions ``< P + s`` not in the step's DRAM set) are ``extra_reads[h]`` at step ``s``
       (read, not attended).

    Split: 2-means in the clustering space over all members (buffer included), initialised
    deterministically by farthest points (the member farthest from the centroid, then the one
    farthest from it), ``split_iters`` Lloyd iterations; if a half ever empties (only possible
    when all members coincide) the members are split at the median of their projection on the
    principal direction instead, so no cluster is ever empty. The larger half keeps id ``j``
    (the one holding the earliest member on a tie), the other gets the next fresh id
    (``n0 + 1, n0 + 2, ...``; ``n0`` is the sinks); both halves' size, centroid,
    representative and variance are recomputed exactly and their buffers are empty.
    ``Relabel(s, moved positions, new id)`` records the move.

    ``adaptation=False`` is static update, identical to static_clusters with the same settings
    and seed: every decode token joins the nearest prefill centroid, centroids and
    representatives stay fixed, no buffers, no splits.

    Outputs: ``index_vectors[h, s]`` = clusters at step ``s`` (sinks not counted);
    ``prefill_groups`` the prefill clusters; ``append_groups[h, s]`` the cluster token
    ``P + s`` joined (or was buffered for) at its step, before any split of that step;
    ``relabels`` the splits; ``extra_reads`` the forced loads (``None`` if there were none);
    ``coretrieval`` the prefill clusters' co-retrieval counts over the last
    ``coretrieval_queries`` prompt queries (``None`` without prompt queries in the trace);
    ``split_buffers`` the buffers' positions at the end of each step (in DRAM: the engine
    attends them from there and counts them in the DRAM footprint; ``None`` if never any);
    ``dram_sinks`` / ``dram_tail`` the forced sinks and recent window (held in DRAM).
    Techniques 2 (dual-head, co-retrieval-ordered flash pools, page-aligned append buffers)
    and 3 (pipelined virtualisation, cluster-aligned replacement) are not part of the policy:
    they consume these groups and relabels in ``sim/kv/layouts/`` and ``sim/kv/replacement/``.

    Parameters:
        budget (int | float, default 1024): tokens per step and KV head, or a fraction in
            (0, 1] of the context.
        sink_tokens (int, default 16): leading positions always attended (as static_clusters).
        recent_tokens (int, default 32): newest positions always attended (as static_clusters).
        tokens_per_cluster (int, default 80): prefill clusters = round(clustered keys / this);
            ignored if ``n_clusters`` is set. The paper leaves the initial count open.
        n_clusters (int | None, default None): a fixed prefill cluster count.
        distance (str, default "euclidean"): "euclidean" or "cosine" (k-means on L2-normalised
            keys); the space of centroids, variances and splits.
        max_iter (int, default 20): prefill Lloyd iterations.
        adaptation (bool, default True): Algorithm 1; False = static update (the ablation).
        tau_quantile (float, default 0.9): ``tau_h`` = this quantile of the head's prefill
            per-cluster variances (the paper leaves ``tau_h`` open).
        buffer_max (int, default 16): ``B_max``, total buffered entries per KV head that force
            a load-and-split (the paper sweeps buffer sizes up to 16).
        split_iters (int, default 10): Lloyd iterations of a split's 2-means.
        coretrieval_queries (int, default 64): the last prompt queries whose retrievals give
            the prefill clusters' co-retrieval matrix (``LayerSelection.coretrieval``: DynaKV's
            inter-cluster placement input, measured before decoding with the decode ranking and
            budget fill; see :func:`~sim.policies.static_clusters.prefill_coretrieval`);
            0 = do not measure; ``None`` also when the trace lacks prompt queries.
    """

    n_clusters: int | None = None
    adaptation: bool = True
    tau_quantile: float = 0.9
    buffer_max: int = 16
    split_iters: int = 10

    positive_knobs: ClassVar[tuple[str, ...]] = ("buffer_max", "split_iters")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.adaptation, bool):
            raise ValueError(f"adaptation must be a bool, got {self.adaptation!r}")
        q = self.tau_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ValueError(f"tau_quantile must be in [0, 1], got {q!r}")

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        raise NotImplementedError("DynaKV selects step by step: use select_layer")

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        prompt, n_steps, n_kv = ctx.prompt_len, ctx.decode_steps, ctx.n_kv_heads
        keys, group_query = self.clustering_inputs(ctx)
        runs = [self._run_head(keys[h], group_query[h], prompt, ctx.rng) for h in range(n_kv)]
        forced = any(len(p) for run in runs for p in run.extra)
        buffered = any(len(p) for run in runs for p in run.buffered)
        prefill_groups = np.stack([run.prefill_groups for run in runs])
        selection = LayerSelection(
            heads=[HeadSelections.from_lists(run.selected) for run in runs],
            index_vectors=np.array([run.n_clusters for run in runs], np.int64).reshape(
                n_kv, n_steps
            ),
            prefill_groups=prefill_groups,
            append_groups=np.stack([run.append_groups for run in runs]),
            relabels=[run.relabels for run in runs] if self.adaptation else None,
            extra_reads=[HeadSelections.from_lists(run.extra) for run in runs] if forced else None,
            coretrieval=prefill_coretrieval(self, ctx, prefill_groups),
            split_buffers=(
                [HeadSelections.from_lists(run.buffered) for run in runs] if buffered else None
            ),
        )
        return self.with_dram(selection, ctx)

    # ----------------------------------------------------------------------------------------

    def _run_head(
        self, keys: np.ndarray, group_query: np.ndarray, prompt: int, rng: np.random.Generator
    ) -> _HeadRun:
        """Algorithm 1 over every decode step of one KV head (:class:`_DynaHead`, the same
        step loop as the online form; static update precomputed for the whole trace)."""
        n_steps = len(group_query)
        space = cluster_space(keys, self.distance)
        head = _DynaHead(self, keys, space, space.astype(np.float64), prompt, n_steps, rng,
                         decode_known=True)
        if not self.adaptation:
            head.static_batch(group_query)
        for s in range(n_steps):
            head.select(group_query[s])
            head.place()
        head.finish()
        return head.run

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        return DynaKVOnline(self, n_kv_heads, capacity, rng)

    def _select(
        self, scores: np.ndarray, state: _Clusters, prompt: int, s: int, buffered: np.ndarray
    ) -> np.ndarray:
        """Step ``s``'s selection (sorted int32): forced sinks and recent window, then the
        clusters whole in score order (ties: lowest id), the last one truncated, its buffered
        entries first and then its earliest positions.

        This is the budgeted base's fill of :func:`cluster_priorities` with the buffered
        entries moved to the front of their cluster (``tests/dynakv_reference.py`` computes
        it so): every priority is distinct, so the top-k set is the first k in this order;
        when the budget covers the whole context or not even the forced positions, the fill
        takes the context or a prefix of the forced positions. Computed on clusters instead:
        a cluster's positions in the unforced span ``[sinks, width - recent)`` are the first
        ``span_count`` of its sorted stored members."""
        width = prompt + s
        sinks, recent = self.sink_tokens, self.recent_tokens
        k = self.budget_at(width)
        if k >= width:  # the fill's two cases the budget decides alone
            return np.arange(width, dtype=np.int32)
        if k < min(width, sinks + recent):
            return self._forced_prefix(width, k)
        # Otherwise sinks + recent <= k < width: the forced blocks [0, sinks) and [hi, width)
        # are disjoint and the clusters fill the other rest >= 0 positions, from [sinks, hi).
        hi = width - recent
        rest = k - sinks - recent
        in_span, stored = state.span_count, state.stored
        parts = []
        taken = 0
        # Clusters by score (ties: lowest id) until the next one reaches the budget.
        for c in np.argsort(-scores, kind="stable").tolist():
            count = in_span[c]
            if taken + count >= rest:
                break
            if count:
                parts.append(stored[c][:count])
                taken += count
        part = rest - taken  # the boundary cluster's share: 0 <= part <= count
        if part:
            inside = stored[c][:count]
            first = [p for p in state.buffers.get(c, ()) if p < hi]  # buffered: >= prompt
            if first:
                inside = np.concatenate((first, inside[~np.isin(inside, first)]))
            parts.append(inside[:part])
        out = np.empty(k, np.int32)
        out[:sinks] = state.sink_range
        if parts:
            chosen = np.concatenate(parts)  # a fresh array: sorted in place
            chosen.sort()
            out[sinks:hi - width + k] = chosen
        out[hi - width + k :] = state.recent_offsets + width
        return out

    def _split(self, state: _Clusters, run: _HeadRun, j: int, step: int, last: int) -> None:
        """Split cluster ``j`` (members up to position ``last``, buffer included) in two."""
        members = state.members(j, last + 1)
        move = split_in_two(state.space[members].astype(np.float64), self.split_iters)
        if move.sum() * 2 > len(move) or (move.sum() * 2 == len(move) and move[0]):
            move = ~move  # the larger half (or the one with the earliest member) keeps j
        moved = members[move].astype(np.int32)
        new_id = state.add_cluster()
        state.labels[moved] = new_id
        state.unbuffer(j)
        kept = members[~move]
        state.recompute(j, kept)
        state.recompute(new_id, moved)
        state.move_members(j, kept, new_id, members[move])
        run.relabels.append(Relabel(step, moved, new_id))


class _DynaHead:
    """Algorithm 1 of one KV head, one decode step at a time: :meth:`select` with the step's
    group-mean query, then :meth:`place` of the step's new token (its key already in
    ``keys`` / ``space`` / ``space64`` at position ``prompt + step``). The pass drives it over
    a trace (``decode_known``: the arrays hold every position); the online form over arrays
    it fills as tokens arrive. Outputs go to :attr:`run` (a :class:`_HeadRun`)."""

    def __init__(
        self, policy: DynaKV, keys: np.ndarray, space: np.ndarray, space64: np.ndarray,
        prompt: int, n_steps: int, rng: np.random.Generator, decode_known: bool,
    ) -> None:
        self.policy, self.prompt, self.space64 = policy, prompt, space64
        sinks = policy.sink_tokens
        clustered = space[sinks:prompt]
        # static_clusters' prefill clustering, same rng draw: adaptation=False reproduces it.
        wanted = policy.n_clusters or max(1, round(len(clustered) / policy.tokens_per_cluster))
        seed = int(rng.integers(2**31 - 1))
        prefill_lab = kmeans_labels(clustered, wanted, policy.max_iter, seed)
        n0 = int(prefill_lab.max()) + 1
        state = _Clusters(space, keys, capacity=n0 + 1 + 2 * n_steps + 2, sink_id=n0)
        state.init_prefill(prefill_lab, sinks, prompt, space64)
        self.tau = float(np.quantile(state.m2[:n0] / state.n[:n0], policy.tau_quantile))
        self.state, self.n0 = state, n0
        prefill_groups = state.labels[:prompt].copy()
        self.static_scores: np.ndarray | None = None
        if not policy.adaptation:
            size = state.n[:n0]
            self.static_centroids = state.csum[:n0] / size[:, None]
            self.static_reps = state.rsum[:n0] / size[:, None]
        self.run = _HeadRun(prefill_groups, state.labels[prompt:].copy())
        state.init_members(prompt, prompt - policy.recent_tokens, policy.recent_tokens)
        self.s = 0
        self.decode_known = decode_known

    def static_batch(self, group_query: np.ndarray) -> None:
        """Static update over a whole trace at once (nothing depends on the order of the
        joins): every decode token's nearest prefill centroid and every step's scores."""
        state, prompt = self.state, self.prompt
        state.labels[prompt:] = nearest_centroid(state.space[prompt:], self.static_centroids)
        self.run.append_groups[:] = state.labels[prompt:]
        scores = group_query @ self.static_reps.T
        # sink_id = n0 = the last: ranked below every cluster (forced by the base anyway)
        self.static_scores = np.concatenate((scores, np.full((len(scores), 1), -np.inf)), axis=1)

    def select(self, group_query: np.ndarray) -> np.ndarray:
        """Step (1): the step's selection (sorted int32)."""
        policy, state, run, s = self.policy, self.state, self.run, self.s
        width = self.prompt + s
        state.advance_span(width - policy.recent_tokens)
        # (1) rank the clusters, fill the budget; the active set is what is in DRAM.
        if policy.adaptation:
            scores = state.representatives() @ group_query
            scores[state.sink_id] = -np.inf  # the sinks' group: forced by the base anyway
        elif self.static_scores is not None:
            scores = self.static_scores[s]
        else:
            scores = np.concatenate((group_query @ self.static_reps.T, [-np.inf]))
        buffered = state.buffered_positions() if state.buffers else _NO_POSITIONS
        if s:
            run.buffered.append(buffered)  # the buffers at the end of step s - 1
        selected = policy._select(scores, state, self.prompt, s, buffered)
        run.selected.append(selected)
        run.n_clusters.append(state.count - 1)
        run.extra.append(_NO_READS)
        self.selected, self.buffered = selected, buffered
        return selected

    def place(self) -> None:
        """Steps (2)-(4): place the step's new token, split, force-load; next step."""
        policy, state, run, s = self.policy, self.state, self.run, self.s
        selected, buffered = self.selected, self.buffered
        self.s += 1
        width = self.prompt + s
        new = width
        buffers = state.buffers
        if not policy.adaptation:
            if not self.decode_known:
                point = state.space[new : new + 1]
                state.labels[new] = nearest_centroid(point, self.static_centroids)[0]
                run.append_groups[s] = state.labels[new]
            state.add_member(int(state.labels[new]), new)
            return

        # (2) place the new token. Its cluster and variance depend on neither the labels
        # nor the sizes, so the active set (of the state before the placement) is only
        # computed when a split may need it.
        j = state.nearest(self.space64[new])
        deviation, variance = state.append_variance(j, new)
        active = None
        if variance > self.tau or buffers:  # the clusters a split may concern: j, the buffered
            active = state.active({j, *buffers}, selected, buffered)
        state.labels[new] = run.append_groups[s] = j
        state.size[j] += 1
        state.add_member(j, new)
        if variance <= self.tau:
            state.append(j, new, deviation)
        else:
            assert active is not None  # computed above: variance > tau
            if active[j]:
                policy._split(state, run, j, s, new)
            else:
                state.buffer(j, new)
        if not buffers:
            return
        # buffers were non-empty before the placement or variance > tau: computed above
        assert active is not None
        # (3) delayed splits of the loaded clusters.
        for c in sorted(buffers):
            if active[c]:
                policy._split(state, run, c, s, new)
        # (4) buffers full: force-load the cluster with the largest buffer and split it.
        extra = []
        while sum(len(b) for b in buffers.values()) >= policy.buffer_max:
            c = max(sorted(buffers), key=lambda k: len(buffers[k]))
            members = state.members(c, width)
            extra.append(members[~state.held(members, selected, buffered)])
            policy._split(state, run, c, s, new)
        if extra:
            run.extra[-1] = np.unique(np.concatenate(extra)).astype(np.int32)

    def finish(self) -> None:
        """The buffers at the end of the last step."""
        state = self.state
        self.run.buffered.append(state.buffered_positions() if state.buffers else _NO_POSITIONS)


class DynaKVOnline(OnlineLayer):
    """DynaKV's online form: per KV head a :class:`_DynaHead` over arrays filled as tokens
    arrive (the pass's step loop and seed draws; static update one join at a time)."""

    def __init__(
        self, policy: DynaKV, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> None:
        super().__init__(n_kv_heads, capacity, rng)
        self.policy = policy

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        policy, prompt = self.policy, self.prompt_len
        if prompt <= policy.sink_tokens:
            raise ValueError(
                f"prompt of {prompt} tokens leaves nothing to cluster past the sinks"
            )
        n_kv, _, dim = keys.shape
        self.keys = np.zeros((n_kv, self.capacity, dim), np.float32)
        self.keys[:, :prompt] = keys
        if policy.distance == "euclidean":
            self.space = self.keys  # cluster_space returns the keys themselves
        else:
            self.space = np.zeros_like(self.keys)
            self.space[:, :prompt] = cluster_space(keys, policy.distance)
        self.space64 = self.space.astype(np.float64)
        steps = self.capacity - prompt
        self.heads = []
        for h in range(n_kv):
            keys_h = self.keys[h]
            # one object when the clustering space is the raw keys, as in the pass
            space_h = keys_h if self.space is self.keys else self.space[h]
            self.heads.append(_DynaHead(policy, keys_h, space_h, self.space64[h], prompt, steps,
                                        self.rng, decode_known=False))

    def _select(self, queries: np.ndarray, keys: np.ndarray) -> list[np.ndarray]:
        grouped = group_queries(queries, self.n_kv_heads)
        return [head.select(grouped[h]) for h, head in enumerate(self.heads)]

    def _append(self, keys: np.ndarray) -> None:
        new = self.stored
        self.keys[:, new] = keys
        if self.space is not self.keys:
            self.space[:, new] = cluster_space(keys, self.policy.distance)
        self.space64[:, new] = self.space[:, new]
        for head in self.heads:
            head.place()


def split_in_two(points: np.ndarray, iters: int) -> np.ndarray:
    """Boolean mask of one half of a 2-means split of ``points`` (>= 2 rows); both halves
    are non-empty. Farthest-point initialisation, ``iters`` Lloyd iterations; if a half
    empties (coincident points), the median cut along the principal direction."""
    centre = points.mean(axis=0)
    a = int(np.argmax(((points - centre) ** 2).sum(axis=1)))
    b = int(np.argmax(((points - points[a]) ** 2).sum(axis=1)))
    ca, cb = points[a], points[b]
    half = None
    for _ in range(max(1, iters)):
        to_b = ((points - cb) ** 2).sum(axis=1) < ((points - ca) ** 2).sum(axis=1)
        n_b = int(to_b.sum())
        if n_b == 0 or n_b == len(points):
            half = None
            break
        if half is not None and np.array_equal(half, to_b):
            break
        half = to_b
        ca, cb = points[~to_b].mean(axis=0), points[to_b].mean(axis=0)
    if half is not None:
        return half
    # Degenerate 2-means: cut at the median of the projection on the principal direction.
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    order = np.argsort(points @ vt[0], kind="stable")
    half = np.zeros(len(points), bool)
    half[order[len(points) // 2 :]] = True
    return half


_NO_POSITIONS = np.zeros(0, np.int64)
_NO_READS = np.zeros(0, np.int32)  # shared by the steps without forced reads (never mutated)


@dataclass
class _HeadRun:
    """One KV head's outputs: its groups as first assigned (prefill positions, decode tokens),
    then per decode step its selections, cluster counts, forced reads, relabels and the
    split buffers' positions at the step's end."""

    prefill_groups: np.ndarray
    append_groups: np.ndarray
    selected: list[np.ndarray] = field(default_factory=list)
    n_clusters: list[int] = field(default_factory=list)
    extra: list[np.ndarray] = field(default_factory=list)
    relabels: list[Relabel] = field(default_factory=list)
    buffered: list[np.ndarray] = field(default_factory=list)


class _Clusters:
    """Per-cluster statistics of one KV head, ids ``0..count-1`` (``sink_id`` = the sinks).

    ``n``/``csum``/``rsum``/``m2``: members counted in the statistics (buffered entries are
    not), their clustering-space sum, raw-key sum and sum of squared deviations from the
    centroid; ``size``: every member with a label (buffered included).
    """

    def __init__(self, space: np.ndarray, keys: np.ndarray, capacity: int, sink_id: int):
        self.space, self.keys, self.sink_id = space, keys, sink_id
        d = space.shape[1]
        self.n = np.ones(capacity)  # 1 for unused slots and the sinks: no division by zero
        self.csum = np.zeros((capacity, d))
        self.m2 = np.zeros(capacity)
        self.centroid = np.zeros((capacity, d))
        # Euclidean clustering space = the raw keys: the raw-key sums and representatives are
        # the clustering-space ones (same operations on the same numbers), kept once.
        self.same_space = space is keys
        self.rsum = self.csum if self.same_space else np.zeros((capacity, d))
        self.rep = self.centroid if self.same_space else np.zeros((capacity, d))
        self.half_sq = np.zeros(capacity)
        self.size = np.zeros(capacity, np.int64)
        self.count = sink_id + 1
        self.labels = np.full(len(keys), sink_id, np.int32)
        self.buffers: dict[int, list[int]] = {}
        self._buffered: np.ndarray | None = None  # buffered_positions, while unchanged
        self._scratch = np.zeros(len(keys), bool)  # all False between uses
        # Stored members of each cluster (positions < the current step's new token, plus it
        # once placed), ascending: stored[c][:n_stored[c]] (arrays grow by doubling).
        self.stored: list[np.ndarray] = [_NO_POSITIONS] * capacity
        self.n_stored = np.zeros(capacity, np.int64)
        # Members of each cluster in the unforced span [sinks, span_end): its first members
        # (Python ints: read and bumped one cluster at a time).
        self.span_count = [0] * capacity
        self.sinks, self.span_end = 0, 0
        self.sink_range = self.recent_offsets = _NO_POSITIONS

    def init_prefill(
        self, prefill_lab: np.ndarray, sinks: int, prompt: int, space64: np.ndarray
    ) -> None:
        """The prompt's clusters (``space64``: the clustering space as float64)."""
        n0 = self.sink_id
        self.sinks = sinks
        self.labels[sinks:prompt] = prefill_lab
        self.n[:n0] = np.bincount(prefill_lab, minlength=n0)
        self.size[:n0] = self.n[:n0]
        self.size[n0] = sinks
        points = space64[sinks:prompt]
        self.csum[:n0] = sum_by_label(points, prefill_lab, n0)
        if not self.same_space:
            self.rsum[:n0] = sum_by_label(self.keys[sinks:prompt], prefill_lab, n0)
        self._derive(slice(0, n0))
        # points - centroid[label], squared, in one buffer (no page faults on temporaries)
        deviation = self.centroid.take(prefill_lab, axis=0)
        np.subtract(points, deviation, out=deviation)
        np.square(deviation, out=deviation)
        self.m2[:n0] = np.bincount(prefill_lab, deviation.sum(axis=1), minlength=n0)

    def init_members(self, prompt: int, span_end: int, recent: int) -> None:
        """Index the prompt's members, the unforced span ending at ``span_end``; the forced
        positions' offsets (sinks from 0, the ``recent`` window from the step's width)."""
        self.sink_range = np.arange(self.sinks, dtype=np.int32)
        self.recent_offsets = np.arange(-recent, 0, dtype=np.int32)
        labels = self.labels[:prompt]
        counts = np.bincount(labels, minlength=self.count)
        by_cluster = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
        for c, members in enumerate(by_cluster):
            self.stored[c] = members
        self.n_stored[: self.count] = counts
        self.span_end = self.sinks
        self.advance_span(span_end)

    def advance_span(self, span_end: int) -> None:
        """Move the end of the unforced span to ``span_end`` (non-decreasing)."""
        start = max(self.span_end, self.sinks)
        if span_end > start:
            labels = self.labels[start:span_end]
            if len(labels) == 1:  # every decode step
                self.span_count[int(labels[0])] += 1
            else:
                added = np.bincount(labels, minlength=len(self.span_count)).tolist()
                self.span_count = [x + y for x, y in zip(self.span_count, added, strict=True)]
            self.span_end = span_end

    def add_member(self, j: int, position: int) -> None:
        """``position`` (after every stored one) joined cluster ``j``."""
        n = int(self.n_stored[j])
        row = self.stored[j]
        if n == len(row):
            grown = np.empty(max(8, 2 * n), np.int64)
            grown[:n] = row
            self.stored[j] = row = grown
        row[n] = position
        self.n_stored[j] = n + 1

    def move_members(self, j: int, kept: np.ndarray, new_id: int, moved: np.ndarray) -> None:
        """A split: cluster ``j`` keeps ``kept``, ``moved`` form ``new_id`` (both ascending,
        all stored members of ``j`` between them)."""
        self.stored[j], self.n_stored[j] = kept, len(kept)
        self.stored[new_id], self.n_stored[new_id] = moved, len(moved)
        in_span = int(np.searchsorted(moved, self.span_end))  # moved are >= sinks
        self.span_count[j] -= in_span
        self.span_count[new_id] += in_span

    def representatives(self) -> np.ndarray:
        return self.rep[: self.count]

    def nearest(self, x: np.ndarray) -> int:
        """The cluster of the nearest centroid (Euclidean in the clustering space) of ``x``
        (float64)."""
        affinity = self.centroid[: self.count] @ x - self.half_sq[: self.count]
        affinity[self.sink_id] = -np.inf
        return int(affinity.argmax())

    def _derive(self, rows: slice | int) -> None:
        """Centroid, representative and half squared centroid norm from the sums."""
        n = self.n[rows] if isinstance(rows, int) else self.n[rows, None]
        self.centroid[rows] = self.csum[rows] / n
        if not self.same_space:
            self.rep[rows] = self.rsum[rows] / n
        self.half_sq[rows] = 0.5 * (self.centroid[rows] ** 2).sum(axis=-1)

    def append_variance(self, j: int, position: int) -> tuple[np.ndarray, float]:
        """Variance of cluster ``j``'s statistics with ``position`` added (Welford), and the
        position's deviation from the centroid (for :meth:`append`)."""
        n = float(self.n[j])
        deviation = self.space[position] - self.centroid[j]
        return deviation, float((self.m2[j] + n / (n + 1) * (deviation @ deviation)) / (n + 1))

    def append(self, j: int, position: int, deviation: np.ndarray) -> None:
        """Add ``position`` to cluster ``j``'s statistics (``deviation`` from
        :meth:`append_variance`, before any change to ``j``)."""
        n = float(self.n[j])
        self.m2[j] += n / (n + 1) * (deviation @ deviation)
        self.n[j] = n + 1
        self.csum[j] += self.space[position]
        if not self.same_space:
            self.rsum[j] += self.keys[position]
        self._derive(j)

    def buffer(self, j: int, position: int) -> None:
        """``position`` waits in cluster ``j``'s split buffer."""
        self.buffers.setdefault(j, []).append(position)
        self._buffered = None

    def unbuffer(self, j: int) -> None:
        """Cluster ``j``'s split buffer is emptied (by its split)."""
        if self.buffers.pop(j, None) is not None:
            self._buffered = None

    def buffered_positions(self) -> np.ndarray:
        """Every buffered position, ascending (kept until the buffers change: read-only)."""
        if not self.buffers:
            return np.zeros(0, np.int64)
        if self._buffered is None:
            self._buffered = np.sort(
                np.fromiter((p for b in self.buffers.values() for p in b), np.int64)
            )
        return self._buffered

    def held(self, positions: np.ndarray, selected: np.ndarray, buffered: np.ndarray) -> np.ndarray:
        """Which ``positions`` are in DRAM: selected or buffered (a mask)."""
        mark = self._scratch
        mark[selected] = True
        mark[buffered] = True
        found = mark[positions]
        mark[selected] = False
        mark[buffered] = False
        return found

    def active(
        self, clusters: set[int], selected: np.ndarray, buffered: np.ndarray
    ) -> dict[int, bool]:
        """Which of ``clusters`` have all their members (labelled so far) in DRAM: selected
        or buffered. A cluster's members are its stored ones (``size`` counts them too)."""
        mark = self._scratch
        mark[selected] = True
        mark[buffered] = True
        room = len(selected) + len(buffered)
        active = {}
        for c in clusters:
            n = int(self.n_stored[c])
            row = self.stored[c]
            # the earliest and newest member first: a cluster is rarely wholly in DRAM
            active[c] = c != self.sink_id and n <= room and (
                n == 0 or (mark[row[0]] and mark[row[n - 1]]
                           and np.count_nonzero(mark[row[:n]]) == n)
            )
        mark[selected] = False
        mark[buffered] = False
        return active

    def members(self, j: int, stop: int) -> np.ndarray:
        """Cluster ``j``'s members at positions ``< stop`` (ascending, a fresh array)."""
        row = self.stored[j][: self.n_stored[j]]
        return row[: np.searchsorted(row, stop)].copy()

    def add_cluster(self) -> int:
        self.count += 1
        return self.count - 1

    def recompute(self, j: int, members: np.ndarray) -> None:
        points = self.space[members].astype(np.float64)
        self.n[j] = self.size[j] = len(members)
        self.csum[j] = points.sum(axis=0)
        if not self.same_space:
            self.rsum[j] = self.keys[members].astype(np.float64).sum(axis=0)
        self._derive(j)
        self.m2[j] = float(((points - self.centroid[j]) ** 2).sum())
