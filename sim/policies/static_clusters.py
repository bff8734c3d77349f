"""Cluster retrieval with static update: prefill k-means, decode tokens join the nearest cluster."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from scipy import sparse
from sklearn.cluster import KMeans
from threadpoolctl import ThreadpoolController

from . import POLICIES
from .base import (
    BudgetedPolicy,
    GroupRanking,
    LayerContext,
    LayerIndex,
    LayerSelection,
    check_count,
)

if TYPE_CHECKING:
    from .online import OnlineLayer

DISTANCES = ("euclidean", "cosine")


def check_clustering(policy, positive: tuple[str, ...] = ()) -> None:
    """Validate the k-means knobs shared by the cluster policies (``tokens_per_cluster``,
    ``max_iter``, optional ``n_clusters``, ``distance``, ``coretrieval_queries``) plus the
    policy's own ``positive`` integer knobs; raises ValueError naming the bad value."""
    check_count("coretrieval_queries", policy.coretrieval_queries)
    for name in ("tokens_per_cluster", "max_iter", *positive):
        value = getattr(policy, name)
        check_count(name, value)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    n_clusters = getattr(policy, "n_clusters", None)
    if n_clusters is not None:
        check_count("n_clusters", n_clusters)
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if policy.distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {policy.distance!r}")


@dataclass
class ClusteredPolicy(BudgetedPolicy):
    """The knobs every k-means cluster policy shares, with the defaults of the static update
    (a subclass may redeclare a field to change its default, as ClusterKV does for
    ``recent_tokens`` and ``distance``). ``positive_knobs`` names a subclass's own integer
    knobs that must be >= 1; all are validated by :func:`check_clustering`."""

    budget: float = 1024
    sink_tokens: int = 16
    recent_tokens: int = 32
    tokens_per_cluster: int = 80
    distance: str = "euclidean"
    max_iter: int = 20
    coretrieval_queries: int = 64

    positive_knobs: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_clustering(self, self.positive_knobs)

    def min_context(self) -> int:
        return max(super().min_context(), self.sink_tokens + 1)

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        selection = super().select_layer(ctx)
        selection.coretrieval = prefill_coretrieval(self, ctx, selection.prefill_groups)
        return selection

    def clustering_inputs(self, ctx: LayerContext) -> tuple[np.ndarray, np.ndarray]:
        """The layer's keys as float32 (H_kv, P + S, d) and each KV head's mean group query
        (H_kv, S, d), the query clusters are ranked by; rejects a prompt of sinks only."""
        if ctx.prompt_len <= self.sink_tokens:
            raise ValueError(
                f"prompt of {ctx.prompt_len} tokens leaves nothing to cluster past the sinks"
            )
        keys = np.asarray(ctx.keys, dtype=np.float32)
        queries = np.asarray(ctx.queries, dtype=np.float32)
        n_kv, n_steps, dim = ctx.n_kv_heads, ctx.decode_steps, queries.shape[2]
        group_query = queries.reshape(n_kv, ctx.queries_per_kv_head, n_steps, dim).mean(axis=1)
        return keys, group_query


@POLICIES.register("static_clusters")
@dataclass
class StaticClusters(ClusteredPolicy):
    """PQCache-style static update (Zhang et al., SIGMOD 2025, arXiv 2407.12820) with
    ClusterKV's cluster retrieval (Liu et al., DAC 2025, arXiv 2412.03213); DynaKV's static
    update baseline (arXiv 2511.07427).

    Per KV head, k-means clusters the prefill keys (sinks excluded: they form their own group,
    label ``n_clusters``, always attended). A cluster's representative is the mean of its
    members' raw keys. Each decode token joins the cluster of the nearest centroid as soon as
    it is generated; centroids stay fixed (PQCache reuses its prefill codebooks), which is what
    lets variance grow under distribution shift. At step ``s`` the group's mean query is scored
    against the representatives by inner product; clusters are taken in that order until the
    budget is filled (forced sinks and recent tokens count once). The last cluster is truncated
    to its *earliest* positions: a cluster is stored contiguously in join order, so a truncated
    read is one prefix of its extent, while ranking inside it would need keys that are on flash
    (ClusterKV truncates without ranking too). ``index_vectors[h, s]`` = number of clusters.

    Parameters:
        budget (int | float, default 1024): tokens per step and KV head (ClusterKV's 1024), or a
            fraction in (0, 1] of the context.
        sink_tokens (int, default 16): leading positions always attended (ClusterKV keeps 16).
        recent_tokens (int, default 32): newest positions always attended (PQCache keeps 32).
        tokens_per_cluster (int, default 80): prefill clusters = round(clustered keys / this),
            ClusterKV's L/80 rule; ignored if ``n_clusters`` is set.
        n_clusters (int | None, default None): a fixed prefill cluster count (capped by the
            number of clustered keys).
        distance (str, default "euclidean"): "euclidean" (PQCache's k-means) or "cosine"
            (ClusterKV: k-means on L2-normalised keys).
        max_iter (int, default 20): Lloyd iterations (ClusterKV runs 20 from random keys).
        update_centroids (bool, default False): if True, centroids and representatives become
            running means that include the decode tokens that joined (still no splitting).
        coretrieval_queries (int, default 64): the last prompt queries whose retrievals give
            the co-retrieval matrix (``LayerSelection.coretrieval``, see
            :func:`prefill_coretrieval`); 0 = do not measure.
    """

    n_clusters: int | None = None
    update_centroids: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.update_centroids, bool):
            raise ValueError(f"update_centroids must be a bool, got {self.update_centroids!r}")

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        prompt, n_steps, n_kv = ctx.prompt_len, ctx.decode_steps, ctx.n_kv_heads
        keys, group_query = self.clustering_inputs(ctx)
        labels = np.empty((n_kv, prompt + n_steps), np.int32)
        cluster_scores, counts = [], []
        for h in range(n_kv):
            lab, scores = self._cluster_head(keys[h], group_query[h], prompt, ctx.rng)
            labels[h] = lab
            cluster_scores.append(scores)
            counts.append(scores.shape[1])

        def score_steps(start: int, stop: int) -> np.ndarray:
            width = prompt + stop
            out = np.empty((n_kv, stop - start, width), np.float64)
            for h in range(n_kv):
                cluster_priorities(cluster_scores[h][start:stop], labels[h, :width], out=out[h])
            return out

        n_clusters = np.asarray(counts, np.int64)
        return LayerIndex(
            score_steps,
            index_vectors=np.repeat(n_clusters[:, None], n_steps, axis=1),
            prefill_groups=labels[:, :prompt].copy(),
            append_groups=labels[:, prompt:].copy(),
            groups=GroupRanking(labels, cluster_order(cluster_scores)),
        )

    def _cluster_head(
        self, keys: np.ndarray, group_query: np.ndarray, prompt: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels of every position (sinks = n_clusters) and cluster scores (S, n_clusters)."""
        space = cluster_space(keys, self.distance)
        prefill_lab, size, centroid_sum, rep_sum = self._prefill_sums(space, keys, prompt, rng)
        n = len(size)
        decode = space[prompt:]
        labels = np.full(len(keys), n, np.int32)
        labels[self.sink_tokens : prompt] = prefill_lab
        if not self.update_centroids:
            centroids = centroid_sum / size[:, None]
            labels[prompt:] = nearest_centroid(decode, centroids)
            scores = group_query @ (rep_sum / size[:, None]).T
            return labels, scores
        # Running means: membership of token s depends on the joins before it (sequential).
        scores = np.empty((len(decode), n))
        for s in range(len(decode)):
            scores[s] = (rep_sum / size[:, None]) @ group_query[s]
            j = int(nearest_centroid(decode[s : s + 1], centroid_sum / size[:, None])[0])
            labels[prompt + s] = j
            size[j] += 1
            centroid_sum[j] += decode[s]
            rep_sum[j] += keys[prompt + s]
        return labels, scores

    def _prefill_sums(
        self, space: np.ndarray, keys: np.ndarray, prompt: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One KV head's prompt clustering (``space``: its keys in the clustering space, at
        least the prompt's rows; one seed drawn from ``rng``): the labels of
        ``[sink_tokens, prompt)``, the clusters' sizes (float64), clustering-space sums and
        raw-key sums."""
        clustered = space[self.sink_tokens : prompt]
        wanted = self.n_clusters or max(1, round(len(clustered) / self.tokens_per_cluster))
        seed = int(rng.integers(2**31 - 1))
        prefill_lab = kmeans_labels(clustered, wanted, self.max_iter, seed)
        n = int(prefill_lab.max()) + 1
        size = np.bincount(prefill_lab, minlength=n).astype(np.float64)
        # Centroid = mean of members (not sklearn's last centres), so a decode key equal to a
        # cluster's mean provably joins that cluster.
        centroid_sum = sum_by_label(clustered, prefill_lab, n)
        if space is keys:  # euclidean: the clustering space is the raw keys
            rep_sum = centroid_sum.copy()
        else:
            rep_sum = sum_by_label(keys[self.sink_tokens : prompt], prefill_lab, n)
        return prefill_lab, size, centroid_sum, rep_sum

    def prefill_clusters(self, keys: np.ndarray, rng: np.random.Generator) -> PromptClusters:
        """One KV head's clusters of the prompt ``keys`` (P, d) float32, for the online form:
        the same k-means, seed draw and sums as :meth:`index_layer`."""
        space = cluster_space(keys, self.distance)
        prefill_lab, size, centroid_sum, rep_sum = self._prefill_sums(
            space, keys, len(keys), rng
        )
        labels = np.full(len(keys), len(size), np.int32)
        labels[self.sink_tokens :] = prefill_lab
        return PromptClusters(labels, size, centroid_sum, rep_sum, self.update_centroids)

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import StaticClustersOnline

        return StaticClustersOnline(self, n_kv_heads, capacity, rng)


class PromptClusters:
    """One KV head's static-update clusters, one decode token at a time (the online form of
    :meth:`StaticClusters._cluster_head`, the same arithmetic): ``labels`` of the prompt (the
    sinks ``n``), the clusters' sizes and sums; fixed centroids and representatives, or
    running means with ``update``."""

    def __init__(self, labels: np.ndarray, size: np.ndarray, centroid_sum: np.ndarray,
                 rep_sum: np.ndarray, update: bool) -> None:
        self.labels, self.size, self.update = labels, size, update
        self.centroid_sum, self.rep_sum = centroid_sum, rep_sum
        if not update:
            self.centroids = centroid_sum / size[:, None]
            self.reps = rep_sum / size[:, None]

    def scores(self, group_query: np.ndarray) -> np.ndarray:
        """Each cluster's score for a KV head's mean query (d,)."""
        if not self.update:
            return group_query @ self.reps.T
        return (self.rep_sum / self.size[:, None]) @ group_query

    def join(self, point: np.ndarray, key: np.ndarray) -> int:
        """The cluster a new token (``point``: its key in the clustering space) joins."""
        if not self.update:
            return int(nearest_centroid(point[None, :], self.centroids)[0])
        j = int(nearest_centroid(point[None, :], self.centroid_sum / self.size[:, None])[0])
        self.size[j] += 1
        self.centroid_sum[j] += point
        self.rep_sum[j] += key
        return j


# --------------------------------------------------------------------------------------------
# Shared with other cluster policies (clusterkv): k-means, per-cluster sums, cluster ranking
# --------------------------------------------------------------------------------------------


def cluster_space(keys: np.ndarray, distance: str) -> np.ndarray:
    """The vectors k-means runs on: raw keys ("euclidean") or L2-normalised keys ("cosine")."""
    if distance == "euclidean":
        return keys
    norm = np.linalg.norm(keys, axis=-1, keepdims=True)
    return keys / np.maximum(norm, np.float32(1e-12))


def kmeans_labels(points: np.ndarray, n_clusters: int, max_iter: int, seed: int) -> np.ndarray:
    """Compact k-means labels ``0..k-1`` (k <= n_clusters, no empty cluster) of ``points``.

    Lloyd's algorithm from ``n_clusters`` random points (capped by the number of points), one
    initialisation, at most ``max_iter`` iterations, sklearn's ``random_state=seed``.
    """
    wanted = min(n_clusters, len(points))
    km = KMeans(wanted, init="random", n_init=1, max_iter=max_iter, random_state=seed)
    # One OpenMP thread: at this size (thousands of keys) sklearn's threads mostly spin at
    # barriers, which is up to 5x slower when the cores are shared (parallel runs, BLAS).
    with _threadpools().limit(limits=1, user_api="openmp"):
        km.fit(points)
    # Compact the labels: an empty cluster would be an index vector that never matches.
    _, labels = np.unique(km.labels_, return_inverse=True)
    return labels.reshape(-1)


_CONTROLLER: list[ThreadpoolController] = []


def _threadpools() -> ThreadpoolController:
    """One controller for every k-means call: building one scans the loaded libraries (a few
    ms), and scikit-learn's OpenMP runtime is loaded with this module."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


def cluster_order(
    cluster_scores: list[np.ndarray],
) -> Callable[[int, int], list[np.ndarray]]:
    """:attr:`GroupRanking.order` of per-head cluster scores (S, n): the clusters by score,
    ties to the lowest id, as :func:`cluster_priorities` ranks them (the unranked label
    ``n`` is not listed: it ranks last)."""

    def order(start: int, stop: int) -> list[np.ndarray]:
        return [np.argsort(-scores[start:stop], axis=1, kind="stable")
                for scores in cluster_scores]

    return order


def cluster_priorities(
    scores: np.ndarray, labels: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Token priorities (steps, width) that take clusters whole in score order.

    ``scores`` (steps, n): each cluster's score at each step; ``labels`` (width,): the cluster
    of positions ``[0, width)``, in ``[0, n]``, label ``n`` unranked (priority 0: the sinks,
    which the budgeted base forces anyway). Lexicographic (cluster rank, earliest position)
    packed into one exact number (integers below 2^53): rank * (width + 1) + (width - position),
    so a budget cut inside a cluster keeps its earliest positions.
    """
    steps, n = scores.shape
    width = len(labels)
    priority = np.zeros((steps, n + 1))  # last column: the unranked label
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.arange(n, 0, -1, dtype=np.float64)[None, :] * (width + 1)
    np.put_along_axis(priority, order, ranks, axis=1)
    within = np.arange(width, 0, -1, dtype=np.float64)
    return np.add(priority[:, labels], within, out=out)


def prefill_coretrieval(
    policy: BudgetedPolicy, ctx: LayerContext, prefill_groups: np.ndarray | None
) -> list[np.ndarray] | None:
    """Co-retrieval counts of the prefill groups, measured before decoding (DynaKV, arXiv
    2511.07427, §4.2 "inter-cluster": the frequency matrix that orders clusters on flash).

    ``prefill_groups`` (n_kv, P): the prefill clusters ``0..n-1`` and, if the policy keeps
    sinks, the sinks' group ``n`` (the largest label), as the cluster policies publish them. The
    last ``policy.coretrieval_queries`` prompt queries (positions ``P - m .. P - 1``, ``m``
    capped at ``P - 1``) play decode steps: per KV head the group's mean query is scored by
    inner product against each prefill cluster's representative (mean raw key of its members),
    clusters fill ``policy``'s budget in that order with the same fill as at decode (the
    budgeted base: sinks and recent window forced, budget at the query's own causal context
    ``[0, p)``, last cluster truncated). A query *retrieves* the groups of its selected
    positions, the sinks' group always and the recent window's positions not counted (at decode
    the recent window is the newest decode tokens, not prefill clusters).

    Returns per KV head an (n_groups, n_groups) int64 matrix ``C``: ``C[i, j]`` = queries that
    retrieved both ``i`` and ``j`` (``C[i, i]``: queries that retrieved ``i``). ``None`` when
    the policy has no groups, ``coretrieval_queries`` is 0 or the trace lacks the prompt
    queries (captured with queries="decode"). Reads only the queries and keys, never the
    policy's random stream, so selections do not change.
    """
    m = min(int(getattr(policy, "coretrieval_queries", 0)), ctx.prompt_len - 1)
    if prefill_groups is None or m <= 0:
        return None
    prompt = ctx.prompt_len
    try:
        prompt_q = ctx.prompt_queries(prompt - m)  # (n_q, m, d)
    except ValueError:
        return None
    n_kv = ctx.n_kv_heads
    group_query = prompt_q.reshape(n_kv, ctx.queries_per_kv_head, m, prompt_q.shape[2]).mean(axis=1)
    keys = ctx.keys
    context = prompt - m + np.arange(m)
    out = []
    for h in range(n_kv):
        labels = np.asarray(prefill_groups[h], dtype=np.int64)
        n_groups = int(labels.max()) + 1
        # ranked clusters 0..n-1; label n (the sinks' group, if any) is unranked
        n = n_groups - 1 if policy.sink_tokens else n_groups
        size = np.bincount(labels, minlength=n + 1)[:n].astype(np.float64)
        rep = sum_by_label(np.asarray(keys[h, :prompt], np.float32), labels, n + 1)[:n]
        rep /= np.maximum(size, 1.0)[:, None]
        scores = group_query[h].astype(np.float64) @ rep.T  # (m, n)
        retrieved = _retrieved_groups(policy, scores, labels, n_groups, context)
        out.append(retrieved.T @ retrieved)
    return out


def _retrieved_groups(
    policy: BudgetedPolicy,
    scores: np.ndarray,
    labels: np.ndarray,
    n_groups: int,
    context: np.ndarray,
) -> np.ndarray:
    """(rows, n_groups) int64 0/1: the groups each row's fill retrieves (see
    :func:`prefill_coretrieval`); row ``i`` is a query with causal context ``context[i]``
    (ascending by one) and cluster scores ``scores[i]``.

    The fill ranks every position by :func:`cluster_priorities`; all priorities are distinct,
    so when the budget covers the forced positions and not the whole context, the selection
    is the forced ones plus whole clusters in rank order (the unranked label last), the last
    one truncated. Which groups that retrieves only needs each cluster's count in the unforced
    span ``[sinks, context - recent)``, so those rows are computed on clusters; the others
    take the budgeted base's fill of the per-position priorities."""
    n_rows, n = scores.shape
    sinks, recent = policy.sink_tokens, policy.recent_tokens
    budgets = np.array([policy.budget_at(int(c)) for c in context])
    generic = (budgets < context) & (budgets >= np.minimum(context, sinks + recent))
    retrieved = np.zeros((n_rows, n_groups), np.int64)
    # Rank order of the labels per row: clusters by score (stable), then the unranked label.
    order = np.argsort(-scores, axis=1, kind="stable")
    if n_groups > n:
        order = np.concatenate((order, np.full((n_rows, n_groups - n), n)), axis=1)
    # Label counts in [sinks, context[i] - recent) for every row (the span grows by one).
    ends = np.maximum(context - recent, sinks)
    in_span = np.zeros((n_rows, n_groups), np.int64)
    in_span[0] = np.bincount(labels[sinks : ends[0]], minlength=n_groups)
    grew = np.flatnonzero(ends[1:] > ends[:-1]) + 1
    in_span[grew, labels[ends[grew] - 1]] = 1
    np.cumsum(in_span, axis=0, out=in_span)
    ranked = np.take_along_axis(in_span, order, axis=1)
    filled = np.cumsum(ranked, axis=1)
    rest = budgets - sinks - recent
    boundary = (filled < rest[:, None]).sum(axis=1)  # rank of the truncated cluster
    before = np.take_along_axis(filled, np.maximum(boundary - 1, 0)[:, None], axis=1)[:, 0]
    part = rest - np.where(boundary > 0, before, 0)
    rank = np.arange(n_groups)[None, :]
    taken = ((rank < boundary[:, None]) & (ranked > 0)) | (
        (rank == boundary[:, None]) & (part > 0)[:, None]
    )
    np.put_along_axis(retrieved, order, taken.astype(np.int64), axis=1)
    retrieved[:, labels[:sinks]] = 1  # the sinks, always selected
    for i in np.flatnonzero(~generic).tolist():
        # The budget holds the whole context or not even the forced positions.
        retrieved[i] = 0
        priority = cluster_priorities(scores[i : i + 1], labels)
        width_start = int(context[i]) - i  # _fill's (prompt, start) for this row: (c - i, i)
        selected = policy._fill(priority, width_start, i)[0].astype(np.int64)
        kept = selected[selected < max(int(context[i]) - recent, sinks)]
        retrieved[i, labels[kept]] = 1
    return retrieved


def sum_by_label(x: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Row sums of ``x`` per label ``0..n-1``, float64 (a sparse one-hot product: O(rows))."""
    # scipy comes with scikit-learn; cumsum/reduceat along axis 0 are ~10x slower here.
    onehot = sparse.csr_matrix(
        (np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n, len(labels))
    )
    return np.asarray(onehot @ np.asarray(x, dtype=np.float64))


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each row of ``x``."""
    # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2): one matmul, no (n, k, d) temporary.
    affinity = x.astype(np.float64) @ centroids.T - 0.5 * (centroids**2).sum(axis=1)
    return np.argmax(affinity, axis=1).astype(np.int32)
