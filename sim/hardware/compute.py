"""Decode compute cost as a plain roofline over the phone CPU and its DRAM.

``time_us = max(flops / (cpu_gflops * 1e3), bytes / dram.sustained_bandwidth_mb_s)
+ kernel_overhead_us``

(1 GFLOP/s = 1e3 FLOP/us; 1 MB/s = 1 byte/us); attention's FLOPs at ``attention_gflops``
when the device sets it. Each function below is one "kernel" and pays
the overhead once. All counts accept numpy arrays (the result is then an array of the same
shape); scalar inputs give a ``float``.

Decode runs one token at a time (batch 1), so every weight matrix is a matrix-vector product:
one multiply-add (2 FLOP) per weight, and every weight byte streamed from DRAM once per token.
Whether a kernel is compute- or memory-bound is therefore decided per preset by
``2 / cpu_gflops`` against ``weight_bits / 8 / sustained_bandwidth``; see the README section
"Compute model" for the numbers of each preset.

Weight bytes per weight (``weight_bits / 8``), from the ggml block formats (ggml-common.h):
Q4_0 = 18 bytes per block of 32 weights (an fp16 scale + 32 x 4 bits) = 4.5 bits/weight;
Q8_0 = 34 bytes per 32 (fp16 scale + 32 x 8 bits) = 8.5 bits/weight; Q6_K = 210 bytes per 256
= 6.5625 bits/weight; FP8 (E4M3, a per-tensor scale) = 8 bits/weight, DynaKV's setting
("All experiments are conducted in FP8 precision", arXiv 2511.07427 Sec. 7).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from sim.hardware.dram import DramParams
from sim.validation import STRICT_CONFIG

#: bits per weight of the formats named in the presets (see the module docstring)
Q4_0_BITS = 18 * 8 / 32
Q8_0_BITS = 34 * 8 / 32
Q6_K_BITS = 210 * 8 / 256
FP8_BITS = 8.0


class ComputeParams(BaseModel):
    """The phone's decode compute and the weight precision of the simulated model.

    - ``cpu_gflops``: effective sustained GFLOP/s of the decode kernels (llama.cpp CPU), > 0.
    - ``weight_bits``: bits per weight of the transformer blocks' matrices (Q4_0: 4.5, Q8_0:
      8.5, FP8: 8), > 0; sizes the weight stream of the dense part. An experiment sets it with
      ``device: {preset: ..., compute: {weight_bits: 8}}`` or sweeps
      ``device.compute.weight_bits``.
    - ``lm_head_min_bits``: the LM head (output matrix) is stored with
      ``max(weight_bits, lm_head_min_bits)`` bits per weight, >= 0 (default 0: as the blocks).
      llama.cpp's quantiser keeps ``output.weight`` (or the tied ``token_embd.weight``) at Q6_K
      unless the model is Q8_0 (``llama_tensor_get_type``, src/llama-quant.cpp), so a Q4_0
      preset sets 6.5625.
    - ``kernel_overhead_us``: fixed launch/thread-sync cost per kernel, >= 0 (default 0).
    - ``attention_gflops``: effective GFLOP/s of attention (:func:`attention_us`), > 0, or
      ``None`` (the default): ``cpu_gflops``. Attention multiplies many entries against a few
      query heads, with a softmax between its two products; numpy on the machine this was
      written on ran it at a quarter to a half of the cache-resident matvec rate.
      ``kvsim calibrate`` fits it to numpy's attention (:mod:`sim.calibrate.cpu`). Left out
      of the parameters' dump while ``None``, so a device without it keeps its run ids.
    """

    model_config = STRICT_CONFIG

    cpu_gflops: float = Field(gt=0)
    weight_bits: float = Field(gt=0)
    lm_head_min_bits: float = Field(0.0, ge=0)
    kernel_overhead_us: float = Field(0.0, ge=0)
    attention_gflops: float | None = Field(None, gt=0)

    @model_serializer(mode="wrap")
    def _drop_unset_rates(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The dump without ``attention_gflops`` while it is ``None`` (run ids hash the dump)."""
        data: dict[str, Any] = handler(self)
        if data.get("attention_gflops", 0.0) is None:
            del data["attention_gflops"]
        return data

    @property
    def attention_rate_gflops(self) -> float:
        """The GFLOP/s attention runs at: ``attention_gflops``, else ``cpu_gflops``."""
        return self.cpu_gflops if self.attention_gflops is None else self.attention_gflops

    @property
    def lm_head_bits(self) -> float:
        """Bits per weight of the LM head: ``max(weight_bits, lm_head_min_bits)``."""
        return max(self.weight_bits, self.lm_head_min_bits)


def roofline_us(
    flops: float | np.ndarray,
    size_bytes: float | np.ndarray,
    compute: ComputeParams,
    dram: DramParams,
    gflops: float | None = None,
) -> float | np.ndarray:
    """``max(compute time, DRAM time) + kernel_overhead_us`` in microseconds; the DRAM time at
    the bandwidth the CPU sustains (:attr:`DramParams.sustained_bandwidth_mb_s`), the compute
    time at ``gflops`` (default ``compute.cpu_gflops``)."""
    rate = compute.cpu_gflops if gflops is None else gflops
    compute_us = np.asarray(flops, dtype=np.float64) / (rate * 1e3)
    memory_us = np.asarray(size_bytes, dtype=np.float64) / dram.sustained_bandwidth_mb_s
    total = np.maximum(compute_us, memory_us) + compute.kernel_overhead_us
    return float(total) if total.ndim == 0 else total


def dense_layer_us(
    params_per_layer: float | np.ndarray, compute: ComputeParams, dram: DramParams
) -> float | np.ndarray:
    """One decode token through one transformer block (projections + MLP), excluding attention.

    FLOPs ``2 * params_per_layer`` (one multiply-add per weight); bytes
    ``params_per_layer * weight_bits / 8`` (every weight streamed from DRAM once per token).
    ``params_per_layer`` includes the block's two RMSNorm vectors (and biases, if any), which
    llama.cpp keeps in F32 rather than quantised: counting them at ``weight_bits`` under-counts
    the bytes by ``2 * hidden * (4 - weight_bits / 8)``, under 0.05% for the simulated models.
    """
    params = np.asarray(params_per_layer, dtype=np.float64)
    return roofline_us(2.0 * params, params * compute.weight_bits / 8.0, compute, dram)


def lm_head_us(
    vocab_size: int, hidden_size: int, compute: ComputeParams, dram: DramParams
) -> float:
    """The once-per-token tail of decode: the final RMSNorm and the LM head, as one kernel.

    The LM head is a ``vocab_size x hidden_size`` matrix-vector product whether or not its
    weights are tied to the input embedding (tying saves memory, not the product): FLOPs
    ``2 * vocab * hidden``, bytes ``vocab * hidden * lm_head_bits / 8``. The final norm adds
    ``hidden`` F32 weights (4 bytes each) and about 4 FLOP per element (square, sum, scale,
    weight). Not counted: the embedding lookup (one row, ``hidden`` weights) and sampling over
    the vocabulary, both under 0.1% of the product. ``vocab_size == 0``: no LM head, 0 us.
    """
    if vocab_size < 0 or hidden_size < 0:
        raise ValueError(
            f"vocab_size and hidden_size must be >= 0, got {vocab_size}, {hidden_size}"
        )
    if vocab_size == 0:
        return 0.0
    weights = float(vocab_size) * hidden_size
    flops = 2.0 * weights + 4.0 * hidden_size
    size_bytes = weights * compute.lm_head_bits / 8.0 + 4.0 * hidden_size
    return float(roofline_us(flops, size_bytes, compute, dram))


def scoring_us(
    n_vectors: float | np.ndarray,
    head_dim: int,
    queries_per_kv_head: int,
    vector_bytes: float,
    compute: ComputeParams,
    dram: DramParams,
) -> float | np.ndarray:
    """Scoring ``n_vectors`` key-sized index vectors (centroids...), each against the
    ``queries_per_kv_head`` query heads that share its KV head (GQA).

    FLOPs ``2 * n_vectors * head_dim * queries_per_kv_head``; bytes ``n_vectors * vector_bytes``.
    """
    n = np.asarray(n_vectors, dtype=np.float64)
    return roofline_us(2.0 * n * head_dim * queries_per_kv_head, n * vector_bytes, compute, dram)


def attention_us(
    n_entries: float | np.ndarray,
    head_dim: int,
    queries_per_kv_head: int,
    entry_bytes: float,
    compute: ComputeParams,
    dram: DramParams,
) -> float | np.ndarray:
    """Attention over ``n_entries`` KV entries (QK^T and softmax-V), each attended by the
    ``queries_per_kv_head`` query heads that share its KV head (GQA).

    FLOPs ``4 * n_entries * head_dim * queries_per_kv_head`` (2 for the scores, 2 for the
    weighted sum) at :attr:`ComputeParams.attention_rate_gflops`; bytes
    ``n_entries * entry_bytes`` (each entry's key and value read once from DRAM, shared by
    those query heads).
    """
    n = np.asarray(n_entries, dtype=np.float64)
    return roofline_us(4.0 * n * head_dim * queries_per_kv_head, n * entry_bytes, compute, dram,
                       compute.attention_rate_gflops)
