"""The closed-loop decode: a prompt prefilled once, then one token per forward pass with every
global attention layer under a policy (:mod:`sim.closed_loop.attention`), the tokens fed either
given (teacher forcing: the perplexity task) or the model's own greedy choices (generation
agreement).

``tokens[i]`` is the token at position ``P + i``: given (``teacher[i]``), or the argmax of the
logits predicting it. Position ``P``'s prediction comes from the prefill (full attention for
every policy); positions ``P + 1 ..`` from decode steps under the policy.

A decode can write its own trace (``trace=``, :class:`TraceOut`): kvsim's trace format
(:mod:`sim.trace.format`) with every layer's queries, keys and values as the model computed
them under the policy, stored float32 (unrounded: the open-loop pass over it makes exactly
the loop's selections), the prompt and the ``n_tokens - 1`` tokens fed as decode steps, and
the speculative queries; recorded by the capture's :class:`sim.trace.recording.Recorder`
from inside the policy's attention function.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.closed_loop.attention import (
    ATTN_IMPLEMENTATION,
    PolicyController,
    model_sliding_windows,
    policy_attention,
    register_policy_attention,
    speculation_hooks,
)
from sim.policies.base import RetrievalPolicy


@dataclass
class DecodeRun:
    """One closed-loop decode: ``tokens`` (T,) int64 the tokens at positions ``P ..``;
    ``nll`` (T,) float64 their negative log-likelihoods under the run's own predictions;
    ``logits`` (T, vocab) float32 if kept; ``prefill_s`` / ``decode_s`` wall times of the
    prefill and of the decode steps; ``hook_s`` the time inside the policy (0 without one);
    ``controller`` the policy's state (``None`` without one)."""

    tokens: np.ndarray
    nll: np.ndarray
    logits: np.ndarray | None
    prefill_s: float
    decode_s: float
    hook_s: float
    controller: PolicyController | None


@dataclass
class TraceOut:
    """Where a decode writes its own trace and what its manifest says: ``model`` (the
    manifest's model entry, :func:`sim.trace.models.model_entry`), ``text`` (its text entry,
    :meth:`sim.trace.sources.TextSource.describe`), ``capture`` (how it was made: the closed
    loop's task, policy, seed; the decode's tokens are added). An existing trace at ``path`` is
    replaced once the new one is complete; nothing appears there if the decode fails."""

    path: Path
    model: dict[str, Any]
    text: dict[str, Any] = field(default_factory=dict)
    capture: dict[str, Any] = field(default_factory=dict)


def check_lengths(prompt_len: int, n_tokens: int, max_positions: int) -> None:
    """Raises ValueError naming the problem unless prompt and continuation fit the model."""
    if prompt_len < 2 or n_tokens < 1:
        raise ValueError(f"need a prompt of >= 2 tokens and >= 1 continuation token, got "
                         f"{prompt_len} + {n_tokens}")
    if prompt_len + n_tokens > max_positions:
        raise ValueError(f"prompt + continuation = {prompt_len + n_tokens} exceeds the model's "
                         f"{max_positions} positions")


#: positions per forward pass of a prefill (:func:`run_prompt`): one pass's attention mask is
#: ``PREFILL_CHUNK x context`` (transformers' sdpa mask, bool then float: 5 bytes a cell), so
#: a prompt's prefill takes memory linear in its length (one pass over 32K positions: 5 GB
#: per mask); a prompt of at most this many positions runs in one pass, as before chunking
PREFILL_CHUNK = 2048


def run_prompt(
    model: Any, prompt: Sequence[int], cache: Any, chunk: int | None = None,
    recorder: Any = None, on_chunk: Callable[[int], None] | None = None,
) -> Any:
    """Feed ``prompt`` into ``cache`` in forward passes of ``chunk`` consecutive positions
    (default :data:`PREFILL_CHUNK`; each attending causally to everything before it); returns
    the last pass's output (its logits: the last position's). ``recorder``: a trace recorder,
    told each pass's first position; ``on_chunk(n)``: called after each pass with its ``n``
    positions."""
    import torch

    chunk = PREFILL_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"a prefill chunk must be >= 1 positions, got {chunk}")
    out = None
    for begin in range(0, len(prompt), chunk):
        end = min(begin + chunk, len(prompt))
        if recorder is not None:
            recorder.position = begin
        out = model(input_ids=torch.tensor([[int(t) for t in prompt[begin:end]]],
                                           dtype=torch.long),
                    cache=cache, use_cache=True, logits_to_keep=1)
        if on_chunk is not None:
            on_chunk(end - begin)
    return out


@dataclass
class Prefilled:
    """A prompt's prefill, computed once and reused by every policy and budget (the model's
    own attention: no policy acts at prefill). ``cache``: the KV cache after the prompt, for
    ``capacity`` positions in all; ``logits``: the prompt's last position's (its prediction
    of position ``P``); ``keys`` / ``queries``: each global layer's post-RoPE prompt keys
    (H_kv, P, d) and queries (H_q, P, d), what each policy prefills from."""

    prompt: tuple[int, ...]
    capacity: int
    cache: Any
    logits: Any
    keys: dict[int, np.ndarray]
    queries: dict[int, np.ndarray]


def prefill(
    model: Any, prompt: Sequence[int], capacity: int, chunk: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Prefilled:
    """Run the prompt once (see :class:`Prefilled`), in passes of ``chunk`` positions
    (:func:`run_prompt`; ``on_chunk(n)`` after each); ``capacity``: the most positions a
    decode from it will reach."""
    import torch

    from sim.policies.full import FullAttention
    from sim.trace.recording import make_cache

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    check_lengths(len(prompt), capacity - len(prompt), int(text_config.max_position_embeddings))
    controller = PolicyController(FullAttention(), model_sliding_windows(model), capacity,
                                  record=True)
    register_policy_attention()
    previous = config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        with torch.inference_mode(), policy_attention(controller):
            cache = make_cache(config, capacity)
            out = run_prompt(model, prompt, cache, chunk, on_chunk=on_chunk)
            controller.end_prefill()
    finally:
        model.set_attn_implementation(previous)
    return Prefilled(
        tuple(int(t) for t in prompt), capacity, cache, out.logits,
        {layer: keys[0] for layer, keys in controller.recorded_keys.items()},
        {layer: queries[0] for layer, queries in controller.recorded_queries.items()},
    )


def decode(
    model: Any, prompt: Sequence[int], n_tokens: int, policy: RetrievalPolicy | None = None,
    seed: int = 0, teacher: Sequence[int] | None = None, keep_logits: bool = False,
    record: bool = False, hook: bool = True, prefilled: Prefilled | None = None,
    recall_every: int = 0,
    trace: TraceOut | None = None,
    on_step: Callable[[], None] | None = None,
) -> DecodeRun:
    """Decode ``n_tokens`` after ``prompt`` with ``model`` (a transformers causal LM, batch 1,
    CPU): the tokens ``teacher`` as far as given, then greedy (a question fed, its answer
    generated). Every global layer attends under
    ``policy`` (``None``: the model's own attention through the registered function; with
    ``hook=False`` the model's own attention implementation untouched, the plain model a
    benchmark times the hook against). ``prefilled``: the prompt's :func:`prefill`, reused
    (its cache copied, each global layer's policy prefilled from its recorded keys and
    queries) instead of running the prompt again. ``recall_every``: with a policy, score its
    selection against full attention in the loop on decode steps ``0, k, 2k, ...``
    (:meth:`PolicyController.score`; 0: never). ``trace``: write the decode's own trace
    there (see the module docstring; the prompt is run here, so not with ``prefilled``).
    ``on_step()``: called once per token of the ``n_tokens`` (the first after the prefill,
    then after each decode step), for progress reports. Raises ValueError for lengths that
    do not fit or a prefill of another prompt, NotImplementedError for a policy without an
    online form, before any forward pass."""
    import torch

    from sim.trace.recording import make_cache

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    prompt_len = len(prompt)
    check_lengths(prompt_len, n_tokens, int(text_config.max_position_embeddings))
    if policy is not None and not hook:
        raise ValueError("a policy runs through the hook (hook=True)")
    if prefilled is not None:
        if prefilled.prompt != tuple(int(t) for t in prompt):
            raise ValueError("the prefill given is of another prompt")
        if prompt_len + n_tokens > prefilled.capacity:
            raise ValueError(f"prompt + continuation = {prompt_len + n_tokens} exceeds the "
                             f"prefill's capacity of {prefilled.capacity} positions")
    if trace is not None:
        if prefilled is not None:
            raise ValueError("a decode that writes its trace runs its own prefill (no prefilled)")
        if n_tokens < 2:
            raise ValueError("a trace needs at least one decode step (n_tokens >= 2)")
        if not hook:
            raise ValueError("a decode records its trace through the hook (hook=True)")
    total = prompt_len + n_tokens
    controller = None
    if policy is not None:
        controller = PolicyController(policy, model_sliding_windows(model), total, seed, record,
                                      recall_every=recall_every)
        # fail before any forward pass if the policy has no online form
        from sim.policies.online import online_layer

        online_layer(policy, controller.first_global(), 1, total, np.random.default_rng(0))
    register_policy_attention()
    previous = config._attn_implementation
    if hook:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    tokens = np.empty(n_tokens, np.int64)
    nll = np.empty(n_tokens)
    logits_kept: list[np.ndarray] | None = [] if keep_logits else None

    def take(i: int, logits: Any) -> int:
        row = logits[0, -1].float()
        if teacher is not None and i < len(teacher):
            token = int(teacher[i])
        else:
            token = int(torch.argmax(row))
        tokens[i] = token
        nll[i] = float(-torch.log_softmax(row, dim=-1)[token])
        if logits_kept is not None:
            logits_kept.append(row.numpy().copy())
        if on_step is not None:
            on_step()
        return token

    try:
        with torch.inference_mode(), _active(controller, model), \
                _tracing(trace, model, prompt, tokens, seed,
                         0 if teacher is None else min(len(teacher), n_tokens)) as recorder:
            start = time.perf_counter()
            if prefilled is None:
                cache = make_cache(config, total)
                out = run_prompt(model, prompt, cache, recorder=recorder)
                if controller is not None:
                    controller.end_prefill()
                token = take(0, out.logits)
            else:
                cache = copy.deepcopy(prefilled.cache)
                if controller is not None:
                    for layer, keys in sorted(prefilled.keys.items()):
                        controller.prefill(layer, keys, prefilled.queries[layer])
                token = take(0, prefilled.logits)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(1, n_tokens):
                if recorder is not None:
                    recorder.position = prompt_len + i - 1
                out = model(input_ids=torch.tensor([[token]], dtype=torch.long),
                            cache=cache, use_cache=True, logits_to_keep=1)
                token = take(i, out.logits)
            decode_s = time.perf_counter() - start
    finally:
        model.set_attn_implementation(previous)
    return DecodeRun(
        tokens, nll, None if logits_kept is None else np.stack(logits_kept), prefill_s,
        decode_s, 0.0 if controller is None else controller.hook_s, controller,
    )


@contextmanager
def _tracing(trace: TraceOut | None, model: Any, prompt: Sequence[int], tokens: np.ndarray,
             seed: int, teacher_tokens: int) -> Iterator[Any]:
    """Record the decode into ``trace`` (yields the recorder, or ``None`` without a trace):
    every layer's queries, keys and values from position 0 (the recorder's ``position`` is set
    per forward pass by the caller), the speculative queries of the decode steps, and on a
    clean exit the tokens (the prompt and every token fed, ``tokens[:-1]``; the last one,
    predicted by the last step, in the manifest, with how the tokens were chosen: the first
    ``teacher_tokens`` given, the rest greedy). On an exception nothing is written."""
    from sim.trace.decoding import degeneration

    if trace is None:
        yield None
        return
    from sim.trace.format import SPEC_KIND
    from sim.trace.recording import Recorder, recording
    from sim.trace.writer import TraceWriter

    prompt_len, steps = len(prompt), len(tokens) - 1
    capture = dict(trace.capture)
    with TraceWriter(trace.path, trace.model, prompt_len, steps, 0, trace.text, capture,
                     overwrite=True, dtype="float32") as writer:
        streams = {(layer, kind): writer.stream(layer, kind)
                   for layer in range(int(trace.model["n_layers"]))
                   for kind in ("keys", "values", "queries", SPEC_KIND)
                   if kind != SPEC_KIND or layer >= 1}
        recorder = Recorder(streams, 0, prompt_len, dtype="float32")
        with recording(recorder, model.model.layers):
            yield recorder
        recorder.flush()
        writer.write_tokens(np.asarray([*prompt, *tokens[:-1]], np.int32))
        capture["seed"] = seed
        forced = teacher_tokens >= len(tokens)
        capture["decode"] = {
            **capture.get("decode", {}),
            "greedy": teacher_tokens == 0,
            "source": "the tokens given (teacher forcing)" if forced else (
                f"{teacher_tokens} tokens given, then the model's greedy choices under the "
                "policy"),
            "sampling": {"method": "teacher_forced" if forced else "greedy", "seed": seed},
            "degeneration": degeneration([int(t) for t in tokens[:-1]]),
            "next_token_after_last_step": int(tokens[-1]),
        }
        writer.manifest["capture"] = capture


@contextmanager
def _active(controller: PolicyController | None, model: Any) -> Iterator[None]:
    if controller is None:
        yield
        return
    with policy_attention(controller):
        if not getattr(controller.policy, "needs_speculative_queries", False):
            yield
            return
        with speculation_hooks(controller, model.model.layers):
            yield
