"""The contract every KV-retrieval policy fulfils.

A policy runs **layer by layer** over a trace: given one layer's keys and decode queries it
returns, for every decode step and KV head, the positions it attends (its *selection*). The
selection is the only thing that links accuracy (``sim.metrics.accuracy``) to latency
(``sim.engine``); policies never see the device, the cache or simulated time.

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
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class LayerContext:
    """One trace layer's data handed to a policy.

    ``keys``: (n_kv_heads, P + S, head_dim) float32, every stored position;
    ``queries``: (n_q_heads, S, head_dim) float32, the decode steps' queries (post-RoPE);
    query head ``q`` belongs to KV head ``q // group_size``.
    """

    layer: int
    keys: np.ndarray
    queries: np.ndarray
    prompt_len: int
    rng: np.random.Generator

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def decode_steps(self) -> int:
        return self.queries.shape[1]

    @property
    def group_size(self) -> int:
        return self.queries.shape[0] // self.keys.shape[0]

    def context_len(self, step: int) -> int:
        """Stored positions visible at decode step ``step`` (the current token excluded)."""
        return self.prompt_len + step


@dataclass
class HeadSelections:
    """Ragged per-step position lists of one KV head, stored flat (CSR-like).

    ``positions[offsets[s]:offsets[s + 1]]`` are the positions attended at step ``s``.
    """

    positions: np.ndarray  # int32, concatenated, each step's slice sorted and unique
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
        return self.positions[self.offsets[step] : self.offsets[step + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


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
    """

    heads: list[HeadSelections] | None
    index_vectors: np.ndarray
    prefill_groups: np.ndarray | None = None
    append_groups: np.ndarray | None = None

    @property
    def is_full(self) -> bool:
        return self.heads is None


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
    """

    name: ClassVar[str]
    selection_needs_query: ClassVar[bool] = True

    @abstractmethod
    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        """Selections of every decode step and KV head of one layer."""

    def min_context(self) -> int:
        """The smallest context length the policy's settings make sense for (config check)."""
        return 1
