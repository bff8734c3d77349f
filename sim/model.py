"""Model geometry, KV byte sizes and the mapping from a simulated (target) model to a trace.

A trace captured from a small model (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64) can drive
the *sizes* of a phone-class model (say Llama-3.2-3B: 28 layers, 8 KV heads, head_dim 128):

* taken from the trace: which positions each (layer, KV head) selects at each decode step, and
  every accuracy figure (computed on the trace's own layers and heads, never rescaled);
* taken from the target geometry: the number of layers and KV heads that issue I/O, the bytes of
  one KV entry (``2 * head_dim * kv_dtype_bytes``), the dense compute per layer, and the query
  heads per KV head used by the scoring and attention cost model.

Target layer ``i`` replays trace layer ``round(i * (L_trace - 1) / (L_target - 1))`` and target
KV head ``j`` replays trace KV head ``j % H_trace``. Positions (context length, prompt length,
decode steps) always come from the trace. A target layer also inherits the attention kind of the
trace layer it replays: global, or a sliding window of the trace's ``w`` positions (Gemma 3's
local layers; see :mod:`sim.replay`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KV_DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5,
}


@dataclass(frozen=True)
class ModelGeometry:
    """Shape of a decoder-only transformer as far as the KV cache and decode cost care.

    ``params_per_layer`` is the weight count of one transformer block (attention + MLP), used by
    the dense-compute model; 0 means "derive from hidden sizes" is not possible, so the dense part
    then costs nothing (only for traces whose manifests lack it).
    """

    name: str
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    params_per_layer: int = 0

    def __post_init__(self) -> None:
        for field in ("n_layers", "n_q_heads", "n_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")
        if self.n_q_heads % self.n_kv_heads:
            raise ValueError(
                f"n_q_heads ({self.n_q_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.params_per_layer < 0:
            raise ValueError(f"params_per_layer must be >= 0, got {self.params_per_layer}")

    @property
    def queries_per_kv_head(self) -> int:
        """Query heads sharing one KV head (GQA's "group size"; kvsim's groups are clusters)."""
        return self.n_q_heads // self.n_kv_heads

    def entry_bytes(self, kv_dtype: str) -> int:
        """Bytes of one KV entry: the key and value of one token for one (layer, KV head)."""
        return int(round(2 * self.head_dim * kv_dtype_bytes(kv_dtype)))

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        return self.entry_bytes(kv_dtype) * self.n_layers * self.n_kv_heads


def kv_dtype_bytes(kv_dtype: str) -> float:
    try:
        return KV_DTYPE_BYTES[kv_dtype]
    except KeyError:
        raise ValueError(
            f"unknown kv_dtype {kv_dtype!r}; valid: {', '.join(KV_DTYPE_BYTES)}"
        ) from None


def trace_layer_for(target_layer: int, n_target_layers: int, n_trace_layers: int) -> int:
    """The trace layer a target layer replays (evenly spread, first and last layers kept)."""
    if n_target_layers == 1:
        return 0
    return int(round(target_layer * (n_trace_layers - 1) / (n_target_layers - 1)))


def trace_layer_map(target: ModelGeometry, trace: ModelGeometry) -> np.ndarray:
    return np.array(
        [trace_layer_for(i, target.n_layers, trace.n_layers) for i in range(target.n_layers)],
        dtype=np.int64,
    )


def trace_head_map(target: ModelGeometry, trace: ModelGeometry) -> np.ndarray:
    return np.arange(target.n_kv_heads, dtype=np.int64) % trace.n_kv_heads
