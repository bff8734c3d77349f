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


#: Upper bounds of a geometry's sizes, about twice the largest published transformers
#: (Llama 3.1 405B: 126 layers, 128 query heads; GPT-3: 96 KV heads, multi-head attention;
#: Gemma 3 and PaLM: head_dim 256): the replay keeps a cache and a flash layout of
#: ``n_positions`` entries per simulated (layer, KV head), so an absurd geometry would exhaust
#: memory instead of failing.
GEOMETRY_LIMITS = {"n_layers": 256, "n_q_heads": 1024, "n_kv_heads": 128, "head_dim": 1024}


@dataclass(frozen=True)
class ModelGeometry:
    """Shape of a decoder-only transformer as far as the KV cache and decode cost care.

    ``params_per_layer`` is the weight count of one transformer block, used by the dense-compute
    model. For the Llama / Qwen2 blocks of ``configs/models``:
    ``hidden * (n_q * head_dim) + 2 * hidden * (n_kv * head_dim)`` (q, k, v)
    ``+ (n_q * head_dim) * hidden`` (o) ``+ 3 * hidden * intermediate`` (gate, up, down)
    ``+ 2 * hidden`` (the two RMSNorms) ``[+ n_q * head_dim + 2 * n_kv * head_dim]`` (q, k, v
    biases, Qwen2 only: ``qkv_bias``). 0 means unknown: the blocks then cost nothing (only for
    traces whose manifests lack it; an experiment refuses such a target).

    ``vocab_size`` and ``hidden_size`` size the LM head, charged once per decode token
    (:func:`sim.hardware.compute.lm_head_us`). The rule: a geometry without a vocabulary
    (``vocab_size == 0``) has no LM head. ``hidden_size == 0`` means ``n_q_heads * head_dim``
    (true of every configured model; Gemma 3 is an architecture where it is not).
    ``intermediate_size`` and ``qkv_bias`` only document ``params_per_layer`` (the cost model
    does not read them; ``tests/test_compute_model.py`` checks the formula above against them).
    """

    name: str
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    params_per_layer: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    intermediate_size: int = 0
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for field, most in GEOMETRY_LIMITS.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, got {value!r}")
            if not 0 < value <= most:
                raise ValueError(f"{field} must be in [1, {most}], got {value}")
        if self.n_q_heads % self.n_kv_heads:
            raise ValueError(
                f"n_q_heads ({self.n_q_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        for field in ("params_per_layer", "hidden_size", "vocab_size", "intermediate_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, got {value!r}")
            if not 0 <= value < 2**53:  # exact in float64, where the cost model uses them
                raise ValueError(f"{field} must be in [0, 2**53), got {value}")

    @property
    def hidden(self) -> int:
        """The residual stream's width: ``hidden_size``, or ``n_q_heads * head_dim`` if unset."""
        return self.hidden_size or self.n_q_heads * self.head_dim

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
