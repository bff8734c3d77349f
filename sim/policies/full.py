"""Full attention from DRAM: the accuracy reference and the latency baseline without flash."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import POLICIES
from .base import LayerContext, LayerSelection, RetrievalPolicy

if TYPE_CHECKING:
    from .online import OnlineLayer


@POLICIES.register("full")
@dataclass
class FullAttention(RetrievalPolicy):
    """Every stored position at every step; no index (``index_vectors`` all 0).

    The reference every accuracy metric is measured against (recall 1, output error 0). It has
    no parameters.
    """

    # Full attention reads everything regardless of the query, so reads may start early.
    selection_needs_query = False

    def is_dense_layer(self, layer: int) -> bool:
        return True

    def select_layer(self, ctx: LayerContext) -> LayerSelection:
        return LayerSelection.full(ctx)

    def online_layer(
        self, layer: int, n_kv_heads: int, capacity: int, rng: np.random.Generator
    ) -> OnlineLayer:
        from .online import FullOnline

        return FullOnline(n_kv_heads, capacity, rng)
