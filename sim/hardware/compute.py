"""Decode compute cost as a plain roofline over the phone CPU and its DRAM.

``time_us = max(flops / (cpu_gflops * 1e3), bytes / bandwidth_mb_s) + kernel_overhead_us``

(1 GFLOP/s = 1e3 FLOP/us; 1 MB/s = 1 byte/us). Each function below is one "kernel" and pays
the overhead once. All counts accept numpy arrays (the result is then an array of the same
shape); scalar inputs give a ``float``.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sim.hardware.dram import DramParams


class ComputeParams(BaseModel):
    """The phone's decode compute.

    - ``cpu_gflops``: effective sustained GFLOP/s of the decode kernels (llama.cpp CPU), > 0.
    - ``weight_bits``: bits per weight of the quantised model (Q4_0: 18 bytes per 32 weights =
      4.5), > 0; sizes the weight stream of the dense part.
    - ``kernel_overhead_us``: fixed launch/thread-sync cost per kernel, >= 0 (default 0).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_gflops: float = Field(gt=0)
    weight_bits: float = Field(gt=0)
    kernel_overhead_us: float = Field(0.0, ge=0)


def roofline_us(
    flops: float | np.ndarray,
    size_bytes: float | np.ndarray,
    compute: ComputeParams,
    dram: DramParams,
) -> float | np.ndarray:
    """``max(compute time, DRAM time) + kernel_overhead_us`` in microseconds."""
    compute_us = np.asarray(flops, dtype=np.float64) / (compute.cpu_gflops * 1e3)
    memory_us = np.asarray(size_bytes, dtype=np.float64) / dram.bandwidth_mb_s
    total = np.maximum(compute_us, memory_us) + compute.kernel_overhead_us
    return float(total) if total.ndim == 0 else total


def dense_layer_us(
    params_per_layer: float | np.ndarray, compute: ComputeParams, dram: DramParams
) -> float | np.ndarray:
    """One decode token through one transformer block (projections + MLP), excluding attention.

    FLOPs ``2 * params_per_layer`` (one multiply-add per weight); bytes
    ``params_per_layer * weight_bits / 8`` (every weight streamed from DRAM once per token, which
    makes phone decode memory-bound).
    """
    params = np.asarray(params_per_layer, dtype=np.float64)
    return roofline_us(2.0 * params, params * compute.weight_bits / 8.0, compute, dram)


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
    weighted sum); bytes ``n_entries * entry_bytes`` (each entry's key and value read once from
    DRAM, shared by those query heads).
    """
    n = np.asarray(n_entries, dtype=np.float64)
    return roofline_us(4.0 * n * head_dim * queries_per_kv_head, n * entry_bytes, compute, dram)
