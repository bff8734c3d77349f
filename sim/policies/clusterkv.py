"""ClusterKV: cluster retrieval with local update (new tokens clustered alone, per window)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from . import POLICIES
from .base import FullLayersMixin, GroupRanking, LayerContext, LayerIndex
from .static_clusters import (
    ClusteredPolicy,
    cluster_order,
    cluster_priorities,
    cluster_space,
    kmeans_labels,
    sum_by_label,
)

if TYPE_CHECKING:
    from .online import OnlineLayer


@POLICIES.register("clusterkv")
@dataclass
class ClusterKV(FullLayersMixin, ClusteredPolicy):
    """ClusterKV with local update (Liu et al., DAC 2025, arXiv 2412.03213); DynaKV's local
    update baseline (arXiv 2511.07427).

    Prefill: per KV head, k-means clusters the prompt keys past the ``sink_tokens`` sinks (the
    sinks form their own group, always attended) with cosine distance (Lloyd on L2-normalised
    keys, random initial keys, one initialisation) into ``round(clustered / tokens_per_cluster)``
    clusters. The k-means, the prefill seed draw and the ranking are shared with
    ``static_clusters`` (same code), so with the same seed and settings the prefill labels equal
    ``static_clusters(distance="cosine")``'s.

    Decode (local update): the token generated at step ``s`` sits in a DRAM window and is
    always attended (counted in the budget, like recent tokens) until its window is clustered;
    the window and the sinks are held in DRAM (``dram_tail`` / ``dram_sinks``: attended from
    there, never read from flash, counted in the DRAM footprint's ``window``).
    Window ``w`` holds the tokens of steps ``[w m, (w + 1) m)`` (``m = update_interval``); once
    its ``m`` tokens are stored (from step ``(w + 1) m`` on) they are clustered *alone* by the
    same k-means into ``window_clusters`` new clusters; older clusters never change. A window
    k-means draws its seed from a generator seeded by the head's prefill seed and ``w``, so the
    layer's random stream (and the prefill clustering) does not depend on ``m``.

    Ranking (as ``static_clusters``): at step ``s`` the KV head's group-mean query is scored by
    inner product against the representatives (mean raw key) of the clusters existing at ``s``;
    clusters are taken whole in that order until the budget is filled, the last one truncated to
    its earliest positions. Priority order: sinks and ``recent_tokens`` (forced by the base),
    then the unclustered window (newest first if the budget cannot hold it: with the paper's
    ``m = 320`` and a small fractional budget the window alone can exceed the budget), then
    clusters. Layers with index < ``full_layers`` attend everything (``heads=None``, as quest).

    ``index_vectors[h, s]`` = clusters existing at step ``s`` (prefill clusters + the window
    clusters made so far; grows by up to ``window_clusters`` every ``m`` steps).

    Groups (unit ids for cluster-aware layouts and caches), per KV head with ``n`` prefill
    clusters: prefill clusters ``0..n-1``, the sinks ``n`` (as ``static_clusters``), window
    clusters ``n+1, n+2, ...`` in creation order. ``append_groups[h, s]`` is the cluster the
    token of step ``s`` *will* belong to once its window is clustered (the simulator writes a
    token once, on append, so it is written to its final cluster's extent). Tokens of the
    trailing window that is not complete by the end of the trace (never clustered) share one
    extra label, the last one (``n + 1 + window clusters``): a run of consecutive positions,
    like a page. The trace's own decode steps (128-256) are fewer than the paper's ``m = 320``,
    so with the defaults no update happens and every decode token carries that window label.

    Parameters:
        budget (int | float, default 1024): tokens per step and KV head (ClusterKV's 1024), or a
            fraction in (0, 1] of the context.
        sink_tokens (int, default 16): leading positions always attended (ClusterKV keeps 16).
        recent_tokens (int, default 0): newest positions forced on top of the window (ClusterKV's
            recent window *is* the unclustered window, so none by default).
        tokens_per_cluster (int, default 80): prefill clusters = round(clustered keys / this),
            ClusterKV's L/80 rule (about 400 clusters at 32K).
        distance (str, default "cosine"): ClusterKV's k-means distance (L2-normalised keys);
            "euclidean" for ablations.
        max_iter (int, default 20): Lloyd iterations (ClusterKV runs 20 from random keys).
        update_interval (int, default 320): ClusterKV's m, decode steps per local update.
        window_clusters (int, default 4): clusters per window; ClusterKV uses 4-8, we take the
            low end (larger clusters, fewer small flash reads; 320 / 4 = 80 tokens per cluster,
            matching the prefill's L/80).
        full_layers (int, default 2): layers with index below this use full attention
            (ClusterKV keeps layers 0-1 dense).
        coretrieval_queries (int, default 64): the last prompt queries whose retrievals give
            the prefill clusters' co-retrieval matrix (``LayerSelection.coretrieval``, see
            :func:`~sim.policies.static_clusters.prefill_coretrieval`); 0 = do not measure.
    """

    recent_tokens: int = 0
    distance: str = "cosine"
    update_interval: int = 320
    window_clusters: int = 4
    full_layers: int = 2

    positive_knobs: ClassVar[tuple[str, ...]] = ("update_interval", "window_clusters")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_full_layers()

    def dram_window(self, prompt_len: int, steps: np.ndarray) -> tuple[int, np.ndarray | None]:
        """The sinks and the unclustered window (with any forced recent tokens) stay in DRAM:
        ClusterKV keeps them on the GPU until the window is clustered and offloaded."""
        steps = np.asarray(steps, dtype=np.int64)
        window_start = prompt_len + (steps // self.update_interval) * self.update_interval
        recent_start = np.maximum(0, prompt_len + steps - self.recent_tokens)
        return self.sink_tokens, np.minimum(recent_start, window_start)

    def kept_tail_start(self, prompt_len: int, step: int) -> int:
        """The unclustered window (tokens since the last local update) is attended always."""
        window_start = prompt_len + (step // self.update_interval) * self.update_interval
        return min(super().kept_tail_start(prompt_len, step), window_start)

    def index_layer(self, ctx: LayerContext) -> LayerIndex:
        prompt, n_steps, n_kv = ctx.prompt_len, ctx.decode_steps, ctx.n_kv_heads
        m = self.update_interval
        keys, group_query = self.clustering_inputs(ctx)
        ranking_labels = np.empty((n_kv, prompt + n_steps), np.int32)
        groups = np.empty((n_kv, prompt + n_steps), np.int32)
        cluster_scores, counts = [], []
        index_vectors = np.empty((n_kv, n_steps), np.int64)
        for h in range(n_kv):
            internal, born, n_prefill = self._cluster_head(keys[h], prompt, n_steps, ctx.rng)
            n = len(born)
            rep = (
                sum_by_label(keys[h], internal, n + 1)[:n]
                / np.bincount(internal, minlength=n)[:n, None]
            )
            scores = group_query[h] @ rep.T  # (S, n)
            steps = np.arange(n_steps)
            scores[born[None, :] > steps[:, None]] = -np.inf  # clusters not made yet
            cluster_scores.append(scores)
            counts.append(n)
            ranking_labels[h] = internal
            index_vectors[h] = (born[None, :] <= steps[:, None]).sum(axis=1)
            # Published ids: prefill 0..n_p-1, sinks n_p, window clusters n_p+1.., trailing
            # (never clustered) window n+1.
            pub = np.where(internal >= n_prefill, internal + 1, internal)
            pub[: self.sink_tokens] = n_prefill
            pub[prompt + (n_steps // m) * m :] = n + 1
            groups[h] = pub

        def score_steps(start: int, stop: int) -> np.ndarray:
            width = prompt + stop
            out = np.empty((n_kv, stop - start, width), np.float64)
            positions = np.arange(width, dtype=np.float64)
            for h in range(n_kv):
                cluster_priorities(
                    cluster_scores[h][start:stop], ranking_labels[h, :width], out=out[h]
                )
                # The unclustered window outranks every cluster (newest first):
                # cluster priorities are below (counts + 1) * (width + 1).
                top = (counts[h] + 2) * (width + 1)
                for i, s in enumerate(range(start, stop)):
                    lo, hi = prompt + (s // m) * m, prompt + s
                    out[h, i, lo:hi] = top + positions[lo:hi]
            return out

        def lead(start: int, stop: int) -> np.ndarray:  # the unclustered window's start
            return prompt + (np.arange(start, stop) // m) * m

        return LayerIndex(
            score_steps,
            index_vectors=index_vectors,
            prefill_groups=groups[:, :prompt].copy(),
            append_groups=groups[:, prompt:].copy(),
            groups=GroupRanking(ranking_labels, cluster_order(cluster_scores), lead),
        )

    def _cluster_head(
        self, keys: np.ndarray, prompt: int, n_steps: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """One KV head's clustering over the whole trace.

        Returns ``(labels, born, n_prefill)``: ``labels`` (P + S,) internal cluster ids in
        creation order, ``len(born)`` for the sinks and never-clustered tokens (unranked);
        ``born[c]`` the first decode step at which cluster ``c`` exists.
        """
        m = self.update_interval
        space = cluster_space(keys, self.distance)
        prefill, seed = self._prefill_labels(space, prompt, rng)
        n_prefill = int(prefill.max()) + 1
        window_rng = np.random.default_rng([seed, 1])
        parts, born = [prefill], [np.zeros(n_prefill, np.int64)]
        n = n_prefill
        for w in range(n_steps // m):  # windows complete within the trace
            lo = prompt + w * m
            local = kmeans_labels(
                space[lo : lo + m],
                self.window_clusters,
                self.max_iter,
                int(window_rng.integers(2**31 - 1)),
            )
            k = int(local.max()) + 1
            parts.append(n + local)
            born.append(np.full(k, (w + 1) * m, np.int64))
            n += k
        labels = np.full(len(keys), n, np.int32)
        tail = np.concatenate(parts)
        labels[self.sink_tokens : self.sink_tokens + len(tail)] = tail
        return labels, np.concatenate(born), n_prefill

    def _prefill_labels(
        self, space: np.ndarray, prompt: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """One KV head's prompt k-means labels of ``[sink_tokens, prompt)`` (``space``: its
        keys in the clustering space) and the seed drawn for it from ``rng``."""
        clustered = space[self.sink_tokens : prompt]
        wanted = max(1, round(len(clustered) / self.tokens_per_cluster))
        seed = int(rng.integers(2**31 - 1))  # the same draw as static_clusters
        return kmeans_labels(clustered, wanted, self.max_iter, seed), seed

    def prefill_labels(
        self, keys: np.ndarray, prompt: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """:meth:`_prefill_labels` of one KV head's raw prompt keys (P, d), for the online
        form."""
        return self._prefill_labels(cluster_space(keys, self.distance), prompt, rng)

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import ClusterKVOnline, FullOnline

        if self.is_dense_layer(layer):
            return FullOnline(n_kv_heads, capacity, rng)
        return ClusterKVOnline(self, n_kv_heads, capacity, rng)
