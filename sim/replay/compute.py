"""What the CPU takes in a simulated layer: the dense time split around attention, the scoring
of an index and the attention over the attended entries, and once per token the LM head.

The costs are the roofline functions of :mod:`sim.hardware.compute`; this module splits a
layer's dense time where the decode process needs it and keeps the times by size (pure
functions of it: each distinct size is computed once).
"""

from __future__ import annotations

from sim.hardware import (
    ComputeParams,
    DramParams,
    attention_us,
    dense_layer_us,
    lm_head_us,
    scoring_us,
)
from sim.model import ModelGeometry


def dense_split(target: ModelGeometry, compute: ComputeParams, dram: DramParams
                ) -> tuple[float, float, float]:
    """A layer's dense time split around attention: (QKV projection, Q's part of it, output
    projection + MLP), in us."""
    dense = float(dense_layer_us(target.params_per_layer, compute, dram))
    # The QKV projection runs before attention; its share of a block's weights is
    # hidden * (n_q + 2 n_kv) * head_dim (hidden: hidden_size, else n_q * head_dim).
    qkv_params = target.hidden * (target.n_q_heads + 2 * target.n_kv_heads) * target.head_dim
    share = min(1.0, qkv_params / target.params_per_layer) if target.params_per_layer else 0.0
    pre_us = dense * share
    # Q's part of the QKV projection (for overlap_transfer, which splits it from K/V's)
    q_us = pre_us * target.n_q_heads / (target.n_q_heads + 2 * target.n_kv_heads)
    return pre_us, q_us, dense - pre_us


class ComputeTimes:
    """The compute times of one run's layers, in us."""

    def __init__(
        self,
        target: ModelGeometry,
        entry_bytes: int,
        vector_bytes: int,
        compute: ComputeParams,
        dram: DramParams,
    ) -> None:
        self.compute, self.dram = compute, dram
        self.head_dim, self.queries_per_kv_head = target.head_dim, target.queries_per_kv_head
        self.entry_bytes, self.vector_bytes = entry_bytes, vector_bytes
        #: before attention (the QKV projection), Q's part of it, after (output projection +
        #: MLP)
        self.dense_pre_us, self.dense_q_us, self.dense_post_us = dense_split(
            target, compute, dram
        )
        #: once per token, after the last layer: final norm + LM head (none without a vocab)
        self.lm_head_us = lm_head_us(target.vocab_size, target.hidden, compute, dram)
        self._scoring: dict[int, float] = {}
        self._attention: dict[int, float] = {}

    def scoring_us(self, vectors: int) -> float:
        """Scoring the query heads against ``vectors`` index vectors."""
        score_us = self._scoring.get(vectors)
        if score_us is None:
            score_us = self._scoring[vectors] = float(
                scoring_us(vectors, self.head_dim, self.queries_per_kv_head, self.vector_bytes,
                           self.compute, self.dram)
            )
        return score_us

    def attention_us(self, attended: int) -> float:
        """Attention of the query heads over ``attended`` entries."""
        attend_us = self._attention.get(attended)
        if attend_us is None:
            attend_us = self._attention[attended] = float(
                attention_us(attended, self.head_dim, self.queries_per_kv_head,
                             self.entry_bytes, self.compute, self.dram)
            )
        return attend_us
