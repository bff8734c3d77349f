"""Long-text perplexity in the loop: teacher-forced decoding of a held text after a prompt,
every global attention layer attending only the policy's selection (the evaluation StreamingLLM,
arXiv 2309.17453 §4.1, and H2O, arXiv 2306.14048 §5, report).

The prompt (``ids[:P]``) is prefilled in one forward pass under full attention (the policy
takes its keys); then the continuation's tokens are fed one per forward pass, whatever the
model would have generated (teacher forcing), so every policy is scored on the same text.
``nll[i] = -log p(ids[P + i] | ids[:P + i])`` for ``i < T``: ``i = 0`` is predicted by the
prefill (the same for every policy), ``i >= 1`` by decode steps under the policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sim.closed_loop.attention import (
    ATTN_IMPLEMENTATION,
    PolicyController,
    model_sliding_windows,
    policy_attention,
    register_policy_attention,
)
from sim.policies.base import RetrievalPolicy


@dataclass
class TeacherForced:
    """One teacher-forced run: ``nll`` (T,) float64 per continuation token; ``logits``
    (T, vocab) float32 if kept; ``prefill_s`` and ``decode_s`` the wall times of the prefill
    and of the decode steps; ``hook_s`` the time inside the policy (0 without one)."""

    nll: np.ndarray
    logits: np.ndarray | None
    prefill_s: float
    decode_s: float
    hook_s: float
    controller: PolicyController | None


def check_lengths(n_ids: int, prompt_len: int, n_tokens: int, max_positions: int) -> None:
    """Raises ValueError naming the problem unless ``ids`` hold the prompt and continuation
    and they fit the model."""
    if prompt_len < 2 or n_tokens < 1:
        raise ValueError(f"need a prompt of >= 2 tokens and >= 1 continuation token, got "
                         f"{prompt_len} + {n_tokens}")
    if n_ids < prompt_len + n_tokens:
        raise ValueError(f"the text has {n_ids} tokens, fewer than the prompt and continuation "
                         f"({prompt_len} + {n_tokens})")
    if prompt_len + n_tokens > max_positions:
        raise ValueError(f"prompt + continuation = {prompt_len + n_tokens} exceeds the model's "
                         f"{max_positions} positions")


def teacher_forced(
    model: Any, ids: Sequence[int], prompt_len: int, n_tokens: int,
    policy: RetrievalPolicy | None = None, seed: int = 0, keep_logits: bool = False,
    record: bool = False, hook: bool = True,
) -> TeacherForced:
    """Run ``model`` (a transformers causal LM, batch 1, CPU) over ``ids[:prompt_len +
    n_tokens]``: one prefill, then ``n_tokens - 1`` decode steps, every global layer under
    ``policy`` (``None``: the model's own attention through the same registered function;
    with ``hook=False`` as well, the model's own attention implementation, untouched: the
    plain model a benchmark times the hook against). Raises ValueError for lengths that do not
    fit, NotImplementedError for a policy without an online form."""
    import torch

    from sim.trace.recording import make_cache

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    check_lengths(len(ids), prompt_len, n_tokens, int(text_config.max_position_embeddings))
    if policy is not None and not hook:
        raise ValueError("a policy runs through the hook (hook=True)")
    register_policy_attention()
    previous = model.config._attn_implementation
    if hook:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    total = prompt_len + n_tokens
    controller = None
    if policy is not None:
        controller = PolicyController(policy, model_sliding_windows(model), total, seed, record)
        # fail before any forward pass if the policy has no online form or does not fit
        from sim.policies.online import online_layer

        online_layer(policy, controller.first_global(), 1, total, np.random.default_rng(0))
    nll = np.empty(n_tokens)
    logits_kept: list[np.ndarray] | None = [] if keep_logits else None

    def score(i: int, logits: Any) -> None:
        row = logits[0, -1].float()
        nll[i] = float(-torch.log_softmax(row, dim=-1)[ids[prompt_len + i]])
        if logits_kept is not None:
            logits_kept.append(row.numpy().copy())

    try:
        with torch.inference_mode(), _maybe(controller):
            cache = make_cache(model.config, total)
            start = time.perf_counter()
            out = model(input_ids=torch.tensor([list(ids[:prompt_len])], dtype=torch.long),
                        cache=cache, use_cache=True, logits_to_keep=1)
            score(0, out.logits)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(1, n_tokens):
                token = ids[prompt_len + i - 1]
                out = model(input_ids=torch.tensor([[token]], dtype=torch.long),
                            cache=cache, use_cache=True, logits_to_keep=1)
                score(i, out.logits)
            decode_s = time.perf_counter() - start
    finally:
        model.set_attn_implementation(previous)
    return TeacherForced(
        nll, None if logits_kept is None else np.stack(logits_kept), prefill_s, decode_s,
        0.0 if controller is None else controller.hook_s, controller,
    )


@contextmanager
def _maybe(controller: PolicyController | None) -> Iterator[None]:
    if controller is None:
        yield
        return
    with policy_attention(controller):
        yield


def perplexity_table(nll: np.ndarray, prompt_len: int, bucket: int) -> pd.DataFrame:
    """Mean NLL and perplexity of ``nll`` (continuation tokens from position ``prompt_len``)
    per bucket of ``bucket`` positions, and over all (``first`` = ``last`` = -1 in the last
    row's ``bucket`` column "all")."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1 tokens, got {bucket}")
    rows = []
    for lo in range(0, len(nll), bucket):
        part = nll[lo : lo + bucket]
        rows.append({"bucket": f"{prompt_len + lo}-{prompt_len + lo + len(part) - 1}",
                     "tokens": len(part), "mean_nll": float(part.mean()),
                     "perplexity": math.exp(float(part.mean()))})
    rows.append({"bucket": "all", "tokens": len(nll), "mean_nll": float(nll.mean()),
                 "perplexity": math.exp(float(nll.mean()))})
    return pd.DataFrame(rows)


def compare_perplexity(
    model: Any, ids: Sequence[int], prompt_len: int, n_tokens: int,
    policies: Sequence[RetrievalPolicy], seed: int = 0, bucket: int = 64,
) -> pd.DataFrame:
    """Per-bucket mean NLL and perplexity of full attention (``policy`` = "full (model)") and
    of each of ``policies`` on the same text, with each policy's NLL difference to full
    attention (``delta_nll``) and ``ppl_ratio`` = its perplexity over full attention's."""
    reference = teacher_forced(model, ids, prompt_len, n_tokens, None, seed)
    base = perplexity_table(reference.nll, prompt_len, bucket)
    frames = [base.assign(policy="full (model)", delta_nll=0.0, ppl_ratio=1.0)]
    for policy in policies:
        run = teacher_forced(model, ids, prompt_len, n_tokens, policy, seed)
        table = perplexity_table(run.nll, prompt_len, bucket)
        table["policy"] = describe(policy)
        table["delta_nll"] = table["mean_nll"] - base["mean_nll"]
        table["ppl_ratio"] = np.exp(table["delta_nll"])
        frames.append(table)
    columns = ["policy", "bucket", "tokens", "mean_nll", "perplexity", "delta_nll", "ppl_ratio"]
    return pd.concat(frames, ignore_index=True)[columns]


def describe(policy: RetrievalPolicy) -> str:
    """``name(budget=...)``: the policy and its budget, for tables."""
    budget = getattr(policy, "budget", None)
    return policy.name if budget is None else f"{policy.name}(budget={budget})"
