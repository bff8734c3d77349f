"""What runs inside the model while a capture records: the attention function, the speculation
hook, the recorder they feed, and the KV cache the capture allocates once.

A custom attention function (:func:`_capture_attention`), registered under one name
(:data:`ATTN_IMPLEMENTATION`) in both ``AttentionInterface`` and ``AttentionMaskInterface``
(without the mask entry transformers silently drops the masks), records the post-RoPE queries
and the new key/value slice of every layer and then calls the stock sdpa attention, so the
model computes exactly what it computes without us. The records stream to the trace files
(:class:`Recorder`); the KV cache is allocated once (:func:`make_cache`), so neither per-step
copies nor memory grow with the trace.

Speculative queries (for InfiniGen-style policies): a forward pre-hook on every layer's attention
module sees its input (the input_layernorm output) and its RoPE tables. At each decode step, layer
``l >= 1``'s hook projects layer ``l - 1``'s input through layer ``l``'s query path
(:func:`project_query`: q_proj, q_norm if the model has one, layer ``l``'s RoPE at the same
position) and records it; the trace stores these next to the true queries.

The recorder and the hooks are in place only inside :func:`recording`; outside it the
registered attention is plain sdpa. torch and transformers are imported lazily (inside the
functions that run with a model), so importing this module costs nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from sim.errors import CaptureError
from sim.trace.format import SPEC_KIND
from sim.trace.writer import ArrayStream

#: the name :func:`register_attention` gives the recording attention (``attn_implementation=``)
ATTN_IMPLEMENTATION = "kvsim_capture"
#: decode steps buffered per layer before they are written to the trace files
FLUSH_POSITIONS = 64


def project_query(attn: Any, hidden: Any, position_embeddings: tuple[Any, Any]) -> Any:
    """Post-RoPE queries (batch, n_q_heads, T, head_dim) of attention module ``attn`` for the
    attention input ``hidden`` (batch, T, hidden_size), computed as the model's own forward does:
    ``q_proj``, reshape to heads, ``q_norm`` if the module has one (Gemma 3), then the model's
    ``apply_rotary_pos_emb`` with ``position_embeddings`` = (cos, sin) of ``attn``'s layer.

    Fed a layer's own input this reproduces its queries; fed the previous layer's input it gives
    InfiniGen's speculative queries.
    """
    model_module = sys.modules[type(attn).__module__]
    rope = getattr(model_module, "apply_rotary_pos_emb", None)
    if rope is None:
        raise CaptureError(f"{model_module.__name__} has no apply_rotary_pos_emb to project with")
    query = attn.q_proj(hidden).view(*hidden.shape[:-1], -1, attn.head_dim).transpose(1, 2)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:
        query = q_norm(query)
    cos, sin = position_embeddings
    query, _ = rope(query, query, cos, sin)
    return query


class Recorder:
    """Streams one capture's q/k/v per layer (``dtype``: float16, or float32 for a closed
    loop's own trace) into the trace writer's files, and the speculative queries of the decode
    steps (layers >= 1).

    A forward pass's slice is written at once when it spans more than one position (a prefill
    chunk: the model holds it in RAM anyway); decode steps are buffered per layer and written
    every ``flush_positions`` steps, so memory stays bounded by one chunk whatever the trace
    length. ``streams[(layer, kind)]`` are :class:`sim.trace.writer.ArrayStream` objects.
    """

    def __init__(
        self,
        streams: dict[tuple[int, str], ArrayStream],
        query_start: int,
        speculative_start: int,
        flush_positions: int | None = None,
        dtype: str = "float16",
    ) -> None:
        self.streams = streams
        self.dtype = dtype
        self.query_start = query_start
        self.speculative_start = speculative_start  # first position with speculative queries
        self.flush_positions = flush_positions if flush_positions is not None else FLUSH_POSITIONS
        self.position = 0  # position of the first token of the current forward pass
        # (layer, kind) -> (index in the file of the first pending position, pending blocks)
        self._pending: dict[tuple[int, str], tuple[int, list[np.ndarray]]] = {}
        self._previous_input: Any = None  # the attention input of the layer just run

    def _put(self, layer: int, kind: str, index: int, block: np.ndarray) -> None:
        key = (layer, kind)
        start, blocks = self._pending.get(key, (index, []))
        if blocks and start + sum(b.shape[1] for b in blocks) != index:
            raise AssertionError(f"capture recorded {key} out of order")  # a bug, not input
        blocks.append(block)
        if block.shape[1] > 1 or sum(b.shape[1] for b in blocks) >= self.flush_positions:
            self._write(key, start, blocks)
        else:
            self._pending[key] = (start, blocks)

    def _write(self, key: tuple[int, str], start: int, blocks: list[np.ndarray]) -> None:
        self._pending.pop(key, None)
        data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
        self.streams[key].write(start, data)

    def flush(self) -> None:
        """Write every buffered decode step."""
        for key, (start, blocks) in list(self._pending.items()):
            self._write(key, start, blocks)

    def record_input(self, attn: Any, hidden: Any, position_embeddings: Any) -> None:
        """Pre-hook of one layer's attention: speculate its queries from the previous layer's
        input (positions >= speculative_start only), then remember its own input for the next
        layer."""
        import torch

        n_new = hidden.shape[1]
        skip = max(0, self.speculative_start - self.position)
        if skip >= n_new:
            return
        layer = attn.layer_idx
        if layer >= 1:
            cos, sin = position_embeddings
            previous = self._previous_input
            if skip:
                previous, cos, sin = previous[:, skip:], cos[:, skip:], sin[:, skip:]
            query = project_query(attn, previous, (cos, sin))
            index = self.position + skip - self.speculative_start
            block = query[0].to(getattr(torch, self.dtype), copy=True).numpy()
            self._put(layer, SPEC_KIND, index, block)
        self._previous_input = hidden

    def record(self, layer: int, query: Any, key: Any, value: Any) -> None:
        import torch

        dtype = getattr(torch, self.dtype)
        n_new = query.shape[2]
        # key/value hold the whole cache after the update; the new tokens are the last n_new
        # (copied: a float32 slice would otherwise be a view of the cache)
        for kind, array in (("keys", key), ("values", value)):
            block = array[0, :, -n_new:, :].to(dtype, copy=True).numpy()
            self._put(layer, kind, self.position, block)
        skip = max(0, self.query_start - self.position)
        if skip < n_new:
            self._put(
                layer,
                "queries",
                self.position + skip - self.query_start,
                query[0, :, skip:, :].to(dtype, copy=True).numpy(),
            )


# set only inside recording(); outside it the registered attention is plain sdpa
_ACTIVE_RECORDER: Recorder | None = None


def _capture_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
):
    """Attention function registered as ``kvsim_capture``: record, then stock sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE_RECORDER is not None:
        _ACTIVE_RECORDER.record(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _speculation_hook(module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook (with kwargs) on every attention module inside :func:`recording`."""
    if _ACTIVE_RECORDER is not None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _ACTIVE_RECORDER.record_input(module, hidden, kwargs["position_embeddings"])


@contextmanager
def recording(recorder: Recorder, layers: Iterable[Any]) -> Iterator[Recorder]:
    """Record into ``recorder`` while the block runs.

    Installs ``recorder`` as the one the registered attention function writes to and adds the
    speculation pre-hook to the attention module (``layer.self_attn``) of each of ``layers``;
    on exit, normal or by an exception, uninstalls the recorder and removes every hook added,
    so the model computes plain sdpa attention again. One capture records at a time in a process:
    entering while another recording is active raises RuntimeError.
    """
    global _ACTIVE_RECORDER
    if _ACTIVE_RECORDER is not None:
        raise RuntimeError("a capture is already recording in this process")
    hooks: list[Any] = []
    _ACTIVE_RECORDER = recorder
    try:
        for layer in layers:
            hooks.append(
                layer.self_attn.register_forward_pre_hook(_speculation_hook, with_kwargs=True)
            )
        yield recorder
    finally:
        _ACTIVE_RECORDER = None
        for hook in hooks:
            hook.remove()


def active_recorder() -> Recorder | None:
    """The recorder installed by :func:`recording`, ``None`` outside it (for instrumentation,
    e.g. ``benchmarks/bench_capture.py`` timing only the decode steps)."""
    return _ACTIVE_RECORDER


def _preallocated_layer_class() -> type:
    """The cache layer used for every full-attention layer (transformers imported lazily)."""
    global _PREALLOCATED_LAYER
    if _PREALLOCATED_LAYER is not None:
        return _PREALLOCATED_LAYER
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer whose key/value buffers are allocated once, for the
        whole capture (``max_positions``), and filled in place.

        ``keys``/``values`` are views of the filled part, so attention at each step costs what
        the positions filled so far cost, as with transformers' ``DynamicLayer`` -- which
        instead concatenates every layer's whole cache into a new tensor at every step (a copy
        growing with the position: a fifth of the CPU time in the kernel at 8K positions,
        as measured on the development machine with the DynamicCache capture). transformers'
        ``StaticLayer`` also preallocates, but returns the whole buffer and masks the unfilled
        part, so its attention costs ``max_positions`` from the first step on.

        The buffers come from ``torch.empty``: pages are touched only as positions fill.
        """

        def __init__(self, max_positions: int) -> None:
            super().__init__()
            self.max_positions = max_positions
            self.key_buffer: Any = None
            self.value_buffer: Any = None

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            self.device = key_states.device
            batch, heads, _, key_dim = key_states.shape
            shape = (batch, heads, self.max_positions)
            self.key_buffer = torch.empty(
                (*shape, key_dim), dtype=key_states.dtype, device=self.device
            )
            self.value_buffer = torch.empty(
                (*shape, value_states.shape[-1]), dtype=value_states.dtype, device=self.device
            )
            self.keys = self.key_buffer[:, :, :0]
            self.values = self.value_buffer[:, :, :0]
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            assert self.keys is not None  # lazy_initialization made it a view of the buffer
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > self.max_positions:
                raise RuntimeError(
                    f"preallocated cache of {self.max_positions} positions overflows ({end})"
                )
            self.key_buffer[:, :, start:end].copy_(key_states)
            self.value_buffer[:, :, start:end].copy_(value_states)
            self.keys = self.key_buffer[:, :, :end]
            self.values = self.value_buffer[:, :, :end]
            return self.keys, self.values

        def get_max_length(self) -> int:
            return self.max_positions

    _PREALLOCATED_LAYER = PreallocatedLayer
    return PreallocatedLayer


_PREALLOCATED_LAYER: type | None = None


def make_cache(model_config: Any, max_positions: int) -> Any:
    """The capture's KV cache: transformers' ``DynamicCache`` for the model's layer types, with
    every full-attention layer replaced by a preallocated one (:func:`_preallocated_layer_class`).
    Sliding-window layers (Gemma 3) keep transformers' ``DynamicSlidingWindowLayer``: it copies
    at most ``window`` positions per step, bounded whatever the trace length."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layer_class = _preallocated_layer_class()
    cache = DynamicCache(config=model_config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = layer_class(max_positions)
    return cache


def register_attention() -> None:
    """Register the recording attention as :data:`ATTN_IMPLEMENTATION` in transformers' attention
    and attention-mask interfaces (idempotent; transformers imported here)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
