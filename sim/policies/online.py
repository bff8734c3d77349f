"""The step-wise (online) form of a policy: one policy, two drivers.

:meth:`RetrievalPolicy.select_layer` decides a whole trace layer at once from recorded keys
and queries (the open-loop pass). A model that generates under a policy cannot hand it the
future: it has the prompt, then one token at a time. :class:`OnlineLayer` is that protocol,
for one layer and all its KV heads:

1. :meth:`OnlineLayer.prefill` once, with the prompt's keys (and its queries, for policies
   that need them);
2. per decode step, :meth:`OnlineLayer.select` with the step's queries and the new token's
   own keys (computed before attention, attended always, never listed; ``token_topk``'s
   softmax normaliser includes it) returns, per KV head, the stored positions attended
   (sorted, unique, int32, in ``[0, stored)``), or ``None`` for every stored position;
3. :meth:`OnlineLayer.append` stores the new token's keys (the same ones).

A policy builds its online layer with :meth:`RetrievalPolicy.online_layer` (``None``: the
policy has no online form yet). The same layer's random stream is the open-loop pass's
(``np.random.default_rng([seed, layer])``), so driving the online form from a trace
(:func:`drive_layer`) gives exactly the open-loop selections (``tests/test_online.py``;
pqcache: the same scores, its exactly tied tokens picked in any order). None of the
vectorised paths uses a future key or query for a step's selection (the online forms, which
cannot, select the same), so every policy is causal as it stands: ClusterKV clusters a window
once all its tokens are stored, DynaKV's and static_clusters' batched decode joins only
compute ahead what the step loop computes token by token, H2O's selection is decided before
its step's query. What the step's selection may use is the step's own query and key (and
InfiniGen's query speculated from the previous layer), as in the model.

This module has the protocol, the shared state (stored keys, per-head groups) and the online
forms of the policies whose vectorised code is a fill of per-step scores, and H2O's and
InfiniGen's; DynaKV's step loop is shared with its pass in :mod:`sim.policies.dynakv`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .base import (
    BudgetRows,
    GroupMembers,
    HeadSelections,
    LayerContext,
    decode_attention_weights,
)

if TYPE_CHECKING:
    from .base import BudgetedPolicy, RetrievalPolicy
    from .clusterkv import ClusterKV
    from .h2o import H2O
    from .infinigen import InfiniGen
    from .pqcache import PQCache
    from .quest import Quest
    from .static_clusters import StaticClusters
    from .streaming_llm import StreamingLLM
    from .token_topk import TokenTopK

#: a step's selection: per KV head the attended stored positions, or None (all of them)
Selection = list[np.ndarray] | None


class OnlineLayer(ABC):
    """One layer's policy state, driven one token at a time (see the module docstring).

    ``n_kv_heads``: the layer's KV heads; ``capacity``: the most positions (prompt and decode
    tokens) it will store; ``rng``: the layer's random stream.
    """

    def __init__(self, n_kv_heads: int, capacity: int, rng: np.random.Generator) -> None:
        self.n_kv_heads = n_kv_heads
        self.capacity = capacity
        self.rng = rng
        self.prompt_len = 0
        self.stored = 0  # positions stored so far
        self.speculative: np.ndarray | None = None  # the step's, see select

    def prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None = None) -> None:
        """Take the prompt: ``keys`` (n_kv_heads, P, d), ``prompt_queries`` (n_q_heads, P, d)
        or ``None`` (a policy that needs them raises ValueError)."""
        if self.stored:
            raise ValueError("prefill once, before any decode step")
        keys = np.asarray(keys, dtype=np.float32)
        if keys.ndim != 3 or keys.shape[0] != self.n_kv_heads or keys.shape[1] < 1:
            raise ValueError(
                f"prefill keys must be ({self.n_kv_heads}, P >= 1, d), got {keys.shape}"
            )
        if keys.shape[1] > self.capacity:
            raise ValueError(f"a prompt of {keys.shape[1]} exceeds capacity {self.capacity}")
        self.prompt_len = self.stored = keys.shape[1]
        self._prefill(keys, prompt_queries)

    def select(
        self, queries: np.ndarray, keys: np.ndarray, speculative: np.ndarray | None = None
    ) -> Selection:
        """The positions the step's ``queries`` (n_q_heads, d) attend; ``keys``
        (n_kv_heads, d): the new token's own keys (attended always, not listed).
        ``speculative`` (n_q_heads, d): the layer's queries speculated from the previous
        layer's attention input, for policies that select from them (InfiniGen); others ignore
        it."""
        if not self.stored:
            raise ValueError("select before prefill")
        self.speculative = None if speculative is None else np.asarray(speculative, np.float32)
        return self._select(np.asarray(queries, np.float32), np.asarray(keys, np.float32))

    def append(self, keys: np.ndarray) -> None:
        """Store the new token's ``keys`` (n_kv_heads, d) at position :attr:`stored`."""
        if self.stored >= self.capacity:
            raise ValueError(f"capacity of {self.capacity} positions exhausted")
        self._append(np.asarray(keys, np.float32))
        self.stored += 1

    @abstractmethod
    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None: ...

    @abstractmethod
    def _select(self, queries: np.ndarray, keys: np.ndarray) -> Selection: ...

    @abstractmethod
    def _append(self, keys: np.ndarray) -> None: ...


class FullOnline(OnlineLayer):
    """Every stored position (full attention; a policy's dense layers)."""

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        pass

    def _select(self, queries: np.ndarray, keys: np.ndarray) -> Selection:
        return None

    def _append(self, keys: np.ndarray) -> None:
        pass


class KeyStore:
    """The stored keys of one layer, (n_kv_heads, capacity + 1, d) float32: row ``stored``
    is scratch for the current token's keys (so a step's context and its own key are one
    contiguous view)."""

    def __init__(self, keys: np.ndarray, capacity: int) -> None:
        n_kv, prompt, dim = keys.shape
        self.keys = np.zeros((n_kv, capacity + 1, dim), np.float32)
        self.keys[:, :prompt] = keys
        self.n = prompt

    def with_current(self, current: np.ndarray) -> np.ndarray:
        """(n_kv, n + 1, d): the stored keys and ``current`` after them."""
        self.keys[:, self.n] = current
        return self.keys[:, : self.n + 1]

    def append(self, keys: np.ndarray) -> None:
        self.keys[:, self.n] = keys
        self.n += 1


def group_queries(queries: np.ndarray, n_kv: int) -> np.ndarray:
    """Each KV head's mean query over its query group, (n_kv, d) float32, summed in the
    order :meth:`ClusteredPolicy.clustering_inputs` sums a trace's."""
    return queries.reshape(n_kv, queries.shape[0] // n_kv, queries.shape[1]).mean(axis=1)


class BudgetedOnline(OnlineLayer):
    """A :class:`~sim.policies.base.BudgetedPolicy`'s online form: the base's own fill of one
    row, at the step's context length (budget, sinks and recent window as in the pass)."""

    def __init__(
        self, policy: BudgetedPolicy, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> None:
        super().__init__(n_kv_heads, capacity, rng)
        self.policy = policy

    def budget_rows(self) -> BudgetRows:
        """The step's :meth:`BudgetedPolicy._budget_rows` (one row: the selection where the
        budget decides it alone; ``plain`` non-empty where the scores decide it)."""
        return self.policy._budget_rows(self.stored, 0, 1)


class ScoredOnline(BudgetedOnline):
    """Top-budget positions by per-position scores (``scores``: (n_kv, 1, width >= stored)
    of the step, positions from ``stored`` on ignored), as :meth:`BudgetedPolicy._fill`."""

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        self.store = KeyStore(keys, self.capacity)

    def _append(self, keys: np.ndarray) -> None:
        self.store.append(keys)

    def _select(self, queries: np.ndarray, keys: np.ndarray) -> Selection:
        budgeted = self.budget_rows()
        if not budgeted[3]:
            return [budgeted[0][0]] * self.n_kv_heads
        scores = self.scores(queries, keys)
        return [self.policy._fill(scores[h], self.stored, 0, budgeted)[0]
                for h in range(self.n_kv_heads)]

    def scores(self, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TokenTopKOnline(ScoredOnline):
    """token_topk's exact group-summed softmax over the stored keys and the current one."""

    policy: TokenTopK

    def scores(self, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
        every = self.store.with_current(keys)
        w, norm, _ = decode_attention_weights(queries[:, None, :], every, self.stored, 0, 1)
        w /= norm[..., None]
        return w.sum(axis=1)  # (n_kv, 1, stored + 1)


class PQCacheOnline(ScoredOnline):
    """PQCache: per KV head, product-quantisation codebooks trained on the prompt's keys past
    the sinks (the pass's k-means and seed draws), every key coded when stored; each step
    ranks the stored tokens by the codes' approximate scores (the pass's lookup tables and
    group aggregation, the current token's own logit exact)."""

    policy: PQCache

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        from .pqcache import pq_train_encode

        policy, prompt = self.policy, self.prompt_len
        if prompt <= policy.sink_tokens:
            raise ValueError(f"prompt of {prompt} tokens leaves nothing to quantise past the sinks")
        head_dim = keys.shape[2]
        if head_dim % policy.n_subvectors:
            raise ValueError(f"n_subvectors (={policy.n_subvectors}) must divide the head "
                             f"dimension (={head_dim})")
        super()._prefill(keys, prompt_queries)
        self.books = []
        self.codes = np.zeros((self.n_kv_heads, self.capacity + 1, policy.n_subvectors),
                              np.int32)
        for h in range(self.n_kv_heads):
            book, code = pq_train_encode(keys[h], policy.sink_tokens, prompt,
                                         policy.n_subvectors, policy.bits, policy.max_iter,
                                         self.rng)
            self.books.append(book)
            self.codes[h, :prompt] = code
        self.scale = np.float32(1.0 / math.sqrt(head_dim))

    def _append(self, keys: np.ndarray) -> None:
        from .static_clusters import nearest_centroid

        super()._append(keys)
        for h, book in enumerate(self.books):
            parts = np.split(keys[h][None, :], len(book), axis=1)
            for m, (x, centroids) in enumerate(zip(parts, book, strict=True)):
                self.codes[h, self.stored, m] = nearest_centroid(x, centroids)[0]

    def scores(self, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
        from .pqcache import lut_scores

        n_kv, width = self.n_kv_heads, self.stored + 1
        group = queries.shape[0] // n_kv
        out = np.empty((n_kv, 1, width), np.float32)
        for h in range(n_kv):
            q = queries[h * group : (h + 1) * group, None, :]  # (G, 1, d)
            codes = self.codes[h, :width]
            if self.policy.group_score == "sum":
                out[h] = lut_scores(q.sum(axis=0), self.books[h], codes)
                continue
            logits = lut_scores(q, self.books[h], codes) * self.scale  # (G, 1, width)
            # the step's own key is in DRAM: its logit is exact
            logits[:, 0, -1] = np.einsum("gsd,sd->gs", q, keys[h][None, :])[:, 0] * self.scale
            logits -= logits.max(axis=-1, keepdims=True)
            np.maximum(logits, np.float32(-80.0), out=logits)
            np.exp(logits, out=logits)
            logits /= logits.sum(axis=-1, keepdims=True)
            out[h] = logits.sum(axis=0)
        return out


class HeadGroups:
    """One KV head's positions by group, for :meth:`BudgetedPolicy._fill_groups`: every
    stored position's label (``labels``), each label's positions ascending, and how many of
    them are sinks."""

    def __init__(self, labels: np.ndarray, capacity: int, sinks: int) -> None:
        self.labels = np.zeros(capacity + 1, np.int32)
        self.labels[: len(labels)] = labels
        self.n = len(labels)
        self.sinks = sinks
        self.positions: list[np.ndarray] = []
        self.sizes: list[int] = []
        self.first: list[int] = []  # per label, its positions below the sinks
        n_labels = int(labels.max()) + 1 if len(labels) else 0
        counts = np.bincount(labels, minlength=n_labels)
        for members in np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1]):
            self._new_label(members)

    def _new_label(self, members: np.ndarray) -> None:
        row = np.empty(max(8, 2 * len(members)), np.int64)
        row[: len(members)] = members
        self.positions.append(row)
        self.sizes.append(len(members))
        self.first.append(int(np.searchsorted(members, self.sinks)))

    def add(self, position: int, label: int) -> None:
        """``position`` (after every stored one) has ``label``."""
        self.labels[position] = label
        self.n = max(self.n, position + 1)
        while label >= len(self.positions):
            self._new_label(np.zeros(0, np.int64))
        n, row = self.sizes[label], self.positions[label]
        if n == len(row):
            grown = np.empty(2 * n, np.int64)
            grown[:n] = row
            self.positions[label] = row = grown
        row[n] = position
        self.sizes[label] = n + 1
        if position < self.sinks:  # positions arrive ascending: the sinks come first
            self.first[label] += 1

    def members(self, width: int) -> GroupMembers:
        """The groups of positions ``[0, width)`` (every stored position is below it)."""
        lists = [row[:n] for row, n in zip(self.positions, self.sizes, strict=True)]
        return GroupMembers(self.labels[:width], lists, len(lists), self.first)


class GroupedOnline(BudgetedOnline):
    """Groups ranked whole (:class:`~sim.policies.base.GroupRanking`): the base's fill of
    one row of groups. Subclasses keep ``heads`` (one :class:`HeadGroups` per KV head) and
    give each step's group order (best first) and lead window start."""

    heads: list[HeadGroups]

    def _select(self, queries: np.ndarray, keys: np.ndarray) -> Selection:
        budgeted = self.budget_rows()
        if not budgeted[3]:
            return [budgeted[0][0]] * self.n_kv_heads
        orders = self.order(queries)
        lead = self.lead()
        leads = None if lead is None else np.array([lead])
        return [self.policy._fill_groups(head.members(self.stored), orders[h][None, :],
                                         self.stored, 0, leads, budgeted)[0]
                for h, head in enumerate(self.heads)]

    def order(self, queries: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def lead(self) -> int | None:
        return None


class StreamingLLMOnline(GroupedOnline):
    """StreamingLLM: the sinks, then every stored position newest first (no groups)."""

    policy: StreamingLLM

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        labels = np.zeros(self.prompt_len, np.int32)
        self.heads = [HeadGroups(labels, self.capacity, self.policy.sink_tokens)
                      for _ in range(self.n_kv_heads)]

    def _append(self, keys: np.ndarray) -> None:
        for head in self.heads:
            head.add(self.stored, 0)

    def order(self, queries: np.ndarray) -> list[np.ndarray]:
        return [np.zeros(1, np.int64)] * self.n_kv_heads

    def lead(self) -> int:
        return self.policy.sink_tokens


class StaticClustersOnline(GroupedOnline):
    """static_clusters: the prompt's k-means clusters per KV head (the pass's code and seed
    draws), each decode token joining the nearest centroid when appended; clusters ranked by
    the group-mean query against the representatives (running means with
    ``update_centroids``)."""

    policy: StaticClusters

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        from .static_clusters import cluster_space

        self.check_prompt()
        self.clusters = [self.policy.prefill_clusters(keys[h], self.rng)
                         for h in range(self.n_kv_heads)]
        self.heads = [HeadGroups(c.labels, self.capacity, self.policy.sink_tokens)
                      for c in self.clusters]
        self.space = lambda k: cluster_space(k, self.policy.distance)

    def check_prompt(self) -> None:
        if self.prompt_len <= self.policy.sink_tokens:
            raise ValueError(
                f"prompt of {self.prompt_len} tokens leaves nothing to cluster past the sinks"
            )

    def order(self, queries: np.ndarray) -> list[np.ndarray]:
        grouped = group_queries(queries, self.n_kv_heads)
        return [np.argsort(-c.scores(grouped[h]), kind="stable")
                for h, c in enumerate(self.clusters)]

    def _append(self, keys: np.ndarray) -> None:
        space = self.space(keys)
        for h, (c, head) in enumerate(zip(self.clusters, self.heads, strict=True)):
            head.add(self.stored, c.join(space[h], keys[h]))


class QuestOnline(GroupedOnline):
    """Quest: per KV head, each page's per-channel key min/max, widened as tokens are stored;
    pages ranked by the upper bound of the query group's ``q . k`` (the pass's
    :meth:`PageIndex.page_scores`: a page complete before the step's 32-step chunk of the pass
    began is scored by a matrix product, a page still growing then by an einsum, so the
    online form splits them the same way and rounds the same), the last page truncated to its
    earliest positions."""

    policy: Quest

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        from .quest import PageIndex

        t = self.policy.page_tokens
        n_kv, prompt, dim = keys.shape
        n_pages = -(-(self.capacity + 1) // t)
        self.page_min = np.zeros((n_kv, n_pages, dim), np.float32)
        self.page_max = np.zeros((n_kv, n_pages, dim), np.float32)
        low, high = PageIndex(keys, t).bounds_at(prompt)
        self.page_min[:, : low.shape[1]] = low
        self.page_max[:, : high.shape[1]] = high
        labels = (np.arange(prompt) // t).astype(np.int32)
        self.heads = [HeadGroups(labels, self.capacity, self.policy.sink_tokens)
                      for _ in range(n_kv)]

    def _append(self, keys: np.ndarray) -> None:
        t, position = self.policy.page_tokens, self.stored
        page = position // t
        if position % t:
            np.minimum(self.page_min[:, page], keys, out=self.page_min[:, page])
            np.maximum(self.page_max[:, page], keys, out=self.page_max[:, page])
        else:  # a new page
            self.page_min[:, page] = keys
            self.page_max[:, page] = keys
        for head in self.heads:
            head.add(position, page)

    def order(self, queries: np.ndarray) -> list[np.ndarray]:
        policy, n_kv, context = self.policy, self.n_kv_heads, self.stored
        t = policy.page_tokens
        grouped = queries.reshape(n_kv, queries.shape[0] // n_kv, 1, queries.shape[1])
        q_pos, q_neg = np.maximum(grouped, 0.0), np.minimum(grouped, 0.0)
        step = context - self.prompt_len
        chunk_start = self.prompt_len + (step // policy.score_chunk_steps) * \
            policy.score_chunk_steps
        n_total = -(-context // t)
        n_fixed = chunk_start // t
        out = np.full((n_kv, grouped.shape[1], 1, n_total), -np.inf, np.float32)
        if n_fixed:
            lo = self.page_min[:, :n_fixed].transpose(0, 2, 1)[:, None]
            hi = self.page_max[:, :n_fixed].transpose(0, 2, 1)[:, None]
            out[..., :n_fixed] = q_pos @ hi + q_neg @ lo
        if n_total > n_fixed:
            lo = self.page_min[:, None, n_fixed:n_total]  # (H, 1, pages, d)
            hi = self.page_max[:, None, n_fixed:n_total]
            out[..., n_fixed:] = np.einsum("hgsd,hspd->hgsp", q_pos, hi) + np.einsum(
                "hgsd,hspd->hgsp", q_neg, lo
            )
        scores = out.sum(axis=1) if policy.group_reduce == "sum" else out.max(axis=1)
        return [np.argsort(-scores[h, 0], kind="stable") for h in range(n_kv)]


class ClusterKVOnline(GroupedOnline):
    """ClusterKV: static_clusters' prompt clustering (cosine by default); decode tokens wait
    in the unclustered window (the lead, newest first) until ``update_interval`` of them are
    stored, then that window alone is clustered into ``window_clusters`` new clusters (the
    pass's k-means and per-head window seeds). Labels: 0 the sinks, 1 the unclustered
    window, ``2 + c`` cluster ``c`` in creation order (the pass's ranking ids)."""

    policy: ClusterKV

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        from .static_clusters import cluster_space, sum_by_label

        policy = self.policy
        if self.prompt_len <= policy.sink_tokens:
            raise ValueError(
                f"prompt of {self.prompt_len} tokens leaves nothing to cluster past the sinks"
            )
        self.store = KeyStore(keys, self.capacity)
        self.space = lambda k: cluster_space(k, policy.distance)
        self.window_rngs, self.reps, self.heads = [], [], []
        sinks = policy.sink_tokens
        for h in range(self.n_kv_heads):
            prefill, seed = policy.prefill_labels(keys[h], self.prompt_len, self.rng)
            n = int(prefill.max()) + 1
            self.window_rngs.append(np.random.default_rng([seed, 1]))
            size = np.bincount(prefill, minlength=n)
            self.reps.append(sum_by_label(keys[h, sinks:], prefill, n) / size[:, None])
            labels = np.zeros(self.prompt_len, np.int32)
            labels[sinks:] = prefill + 2
            self.heads.append(HeadGroups(labels, self.capacity, sinks))

    def lead(self) -> int:
        m = self.policy.update_interval
        return self.prompt_len + ((self.stored - self.prompt_len) // m) * m

    def order(self, queries: np.ndarray) -> list[np.ndarray]:
        grouped = group_queries(queries, self.n_kv_heads)
        return [np.argsort(-(grouped[h] @ rep.T), kind="stable") + 2
                for h, rep in enumerate(self.reps)]

    def _append(self, keys: np.ndarray) -> None:
        from .static_clusters import kmeans_labels, sum_by_label

        policy = self.policy
        self.store.append(keys)
        for head in self.heads:
            head.add(self.stored, 1)
        m = policy.update_interval
        steps = self.stored + 1 - self.prompt_len
        if steps % m:
            return
        lo = self.stored + 1 - m  # the window [lo, lo + m) is complete: cluster it alone
        window = self.store.keys[:, lo : lo + m]
        space = self.space(window)
        for h, head in enumerate(self.heads):
            local = kmeans_labels(space[h], policy.window_clusters, policy.max_iter,
                                  int(self.window_rngs[h].integers(2**31 - 1)))
            k = int(local.max()) + 1
            n = len(self.reps[h])
            positions = np.arange(lo, lo + m)
            head.sizes[1] -= m  # the unclustered window's label held exactly these
            for p, label in zip(positions.tolist(), (local + n + 2).tolist(), strict=True):
                head.add(p, label)
            size = np.bincount(local, minlength=k)
            rep = sum_by_label(window[h], local, k) / size[:, None]
            self.reps[h] = np.concatenate((self.reps[h], rep))


class InfiniGenOnline(OnlineLayer):
    """InfiniGen: the partial channels chosen from the prompt's queries and keys, then per
    step the speculative query's partial logits over the stored keys and the current one, the
    fetch count and the group ranking of the pass (:meth:`InfiniGen.select_layer`'s step,
    same arithmetic). Layer 0 has no previous layer: it is scored with its own query, as in
    the pass; other layers need :meth:`select`'s ``speculative``."""

    def __init__(
        self, policy: InfiniGen, layer: int, n_kv_heads: int, capacity: int,
        rng: np.random.Generator,
    ) -> None:
        super().__init__(n_kv_heads, capacity, rng)
        self.policy = policy
        self.layer_index = layer

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        from .infinigen import partial_channels

        if prompt_queries is None:
            raise ValueError("infinigen chooses its partial channels from the prompt's "
                             "queries; none were given")
        self.store = KeyStore(keys, self.capacity)
        m = self.policy.n_channels(keys.shape[2])
        self.channels = partial_channels(np.asarray(prompt_queries, np.float32), keys, m)

    def _select(self, queries: np.ndarray, keys: np.ndarray) -> Selection:
        policy, context = self.policy, self.stored
        if self.layer_index != 0:
            if self.speculative is None:
                raise ValueError("infinigen selects from speculative queries; none were given")
            queries = self.speculative
        every = self.store.with_current(keys)
        logits = policy._partial_logits(queries[:, None, :], every, self.channels, context, 0,
                                        1)
        counts = policy.fetch_counts(logits)
        ranking = policy._kv_head_ranking(logits, self.n_kv_heads,
                                          queries.shape[0] // self.n_kv_heads)
        return [policy._pick(ranking[h, 0], context, int(counts[0]))
                for h in range(self.n_kv_heads)]

    def _append(self, keys: np.ndarray) -> None:
        self.store.append(keys)


class H2OOnline(OnlineLayer):
    """H2O: the prompt's accumulated attention from its own queries (the pass's
    :meth:`H2O.prompt_scores`), the cache cut to the budget; per step the kept set is the
    selection, the softmax restricted to it and the current token adds to the accumulators,
    and the cache is cut for the next context (:meth:`H2O.kept_sets`' step, same arithmetic).
    The step's query only updates the scores: the selection was decided before it."""

    def __init__(
        self, policy: H2O, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> None:
        super().__init__(n_kv_heads, capacity, rng)
        self.policy = policy

    def _prefill(self, keys: np.ndarray, prompt_queries: np.ndarray | None) -> None:
        policy, prompt, n_kv = self.policy, self.prompt_len, self.n_kv_heads
        if prompt_queries is None:
            raise ValueError("H2O accumulates attention from every prompt query, but none "
                             "were given")
        queries = np.asarray(prompt_queries, np.float32)
        ctx = LayerContext(layer=0, keys=keys, queries=queries[:, :0], prompt_len=prompt,
                           rng=self.rng, stored_queries=queries, query_start=0)
        self.store = KeyStore(keys, self.capacity)
        self.acc = np.zeros((n_kv, self.capacity + 1), np.float64)
        self.acc[:, :prompt] = policy.prompt_scores(ctx)
        every = np.broadcast_to(np.arange(prompt, dtype=np.int64), (n_kv, prompt))
        self.kept = policy._trim(every, self.acc, prompt)
        self.heads = np.arange(n_kv)[:, None]

    def _select(self, queries: np.ndarray, keys: np.ndarray) -> Selection:
        kept, n_kv = self.kept, self.n_kv_heads
        selection = [np.sort(kept[h]).astype(np.int32) for h in range(n_kv)]
        every = self.store.with_current(keys)
        head_dim = every.shape[2]
        q = queries * np.float32(1.0 / math.sqrt(head_dim))
        q = q.reshape(n_kv, queries.shape[0] // n_kv, head_dim)
        current = np.full((n_kv, 1), self.stored, np.int64)
        cols = np.concatenate([kept, current], axis=1)  # (H_kv, n + 1)
        logits = q @ every[self.heads, cols].transpose(0, 2, 1)  # (H_kv, G, n + 1)
        logits -= logits.max(axis=-1, keepdims=True)
        np.maximum(logits, np.float32(-80.0), out=logits)  # no float32 subnormals
        w = np.exp(logits)
        w /= w.sum(axis=-1, keepdims=True)
        self.acc[self.heads, cols] += w.sum(axis=1)
        self.kept = self.policy._trim(cols, self.acc, self.stored + 1)
        return selection

    def _append(self, keys: np.ndarray) -> None:
        self.store.append(keys)


def online_layer(
    policy: RetrievalPolicy, layer: int, n_kv_heads: int, capacity: int,
    rng: np.random.Generator,
) -> OnlineLayer:
    """``policy``'s online form of trace layer ``layer`` (:meth:`RetrievalPolicy.online_layer`).

    Raises NotImplementedError if the policy has none yet."""
    made = policy.online_layer(layer, n_kv_heads, capacity, rng)
    if made is None:
        raise NotImplementedError(f"policy {policy.name!r} has no online (step-wise) form yet")
    return made


def has_online_form(policy: RetrievalPolicy) -> bool:
    """Whether ``policy`` can run step by step (closed loop)."""
    from .base import RetrievalPolicy

    return type(policy).online_layer is not RetrievalPolicy.online_layer


def drive_layer(
    policy: RetrievalPolicy, ctx: LayerContext,
    on_step: Callable[[int, Selection], None] | None = None,
) -> list[HeadSelections] | None:
    """Drive ``policy``'s online form over a trace layer ``ctx`` as a model would: prefill
    with the prompt's keys (and stored prompt queries, if any), then per decode step select
    with the step's queries and the new token's keys, then append them.

    Returns per KV head the selections (as :class:`LayerSelection.heads`; ``None`` if every
    step attended everything), to compare with the pass's; ``on_step(s, selection)`` sees
    each step's raw selection."""
    keys = np.asarray(ctx.keys, dtype=np.float32)
    queries = np.asarray(ctx.queries, dtype=np.float32)
    prompt = ctx.prompt_len
    layer = online_layer(policy, ctx.layer, ctx.n_kv_heads, keys.shape[1], ctx.rng)
    prompt_queries = None
    if ctx.stored_queries is not None and ctx.query_start == 0:
        prompt_queries = ctx.prompt_queries(0)
    layer.prefill(keys[:, :prompt], prompt_queries)
    speculative = (None if ctx.speculative_queries is None
                   else np.asarray(ctx.speculative_queries, np.float32))
    per_head: list[list[np.ndarray]] = [[] for _ in range(ctx.n_kv_heads)]
    every = True
    for s in range(ctx.decode_steps):
        current = keys[:, prompt + s]
        selection = layer.select(queries[:, s], current,
                                 None if speculative is None else speculative[:, s])
        if on_step is not None:
            on_step(s, selection)
        if selection is None:
            selection = [np.arange(prompt + s, dtype=np.int32)] * ctx.n_kv_heads
        else:
            every = False
        for h, positions in enumerate(selection):
            per_head[h].append(np.asarray(positions, dtype=np.int32))
        layer.append(current)
    if every:
        return None
    return [HeadSelections.from_lists(rows) for rows in per_head]
