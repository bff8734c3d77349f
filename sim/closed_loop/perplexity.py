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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sim.closed_loop.driver import DecodeRun, Prefilled, TraceOut, decode, prefill
from sim.policies.base import RetrievalPolicy


def teacher_forced(
    model: Any, ids: Sequence[int], prompt_len: int, n_tokens: int,
    policy: RetrievalPolicy | None = None, seed: int = 0, keep_logits: bool = False,
    record: bool = False, hook: bool = True, prefilled: Prefilled | None = None,
    trace: TraceOut | None = None, on_step: Callable[[], None] | None = None,
) -> DecodeRun:
    """Run ``model`` over ``ids[:prompt_len + n_tokens]`` teacher-forced
    (:func:`sim.closed_loop.driver.decode` with the continuation as the tokens fed): one
    prefill, then ``n_tokens - 1`` decode steps under ``policy``; ``nll`` per continuation
    token; ``trace``: write the decode's own trace (:class:`sim.closed_loop.driver.TraceOut`);
    ``on_step()``: called once per continuation token (progress). Raises ValueError if
    ``ids`` are shorter than the prompt and continuation."""
    if prompt_len >= 2 and n_tokens >= 1 and len(ids) < prompt_len + n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the prompt and "
                         f"continuation ({prompt_len} + {n_tokens})")
    return decode(model, ids[:prompt_len], n_tokens, policy, seed,
                  teacher=ids[prompt_len : prompt_len + n_tokens], keep_logits=keep_logits,
                  record=record, hook=hook, prefilled=prefilled, trace=trace,
                  on_step=on_step)


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
    prompt = ids[:prompt_len]
    shared = prefill(model, prompt, prompt_len + n_tokens)  # once, for every run
    reference = teacher_forced(model, ids, prompt_len, n_tokens, None, seed, prefilled=shared)
    base = perplexity_table(reference.nll, prompt_len, bucket)
    frames = [base.assign(policy="full (model)", delta_nll=0.0, ppl_ratio=1.0)]
    for policy in policies:
        run = teacher_forced(model, ids, prompt_len, n_tokens, policy, seed, prefilled=shared)
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
