"""Long generation in the loop (issue 9, item 4): greedy decoding of thousands of tokens under a
policy after a short prompt, so that the drift the long-decoding replays measure open-loop
(clusters built at prefill going stale as the decode outgrows the prompt) is measured where a
wrong selection changes the next token.

Per position bucket of the generated sequence:

* **attention recall in the loop** (:mod:`sim.closed_loop.recall`): at sampled decode steps and
  every global layer, the share of full attention's probability mass, over the whole context
  the loop has and with the loop's own query, that the policy's selection covers;
* **quality of the text**: the full-attention model's mean negative log-likelihood of the
  policy's generated tokens (:func:`full_attention_nll`: teacher-forced, one chunked forward
  pass over prompt + generated tokens), beside the same for full attention's own greedy
  generation from the same prompt, and agreement with that generation (tokens before the first
  divergence, share of matching positions; :func:`sim.closed_loop.agreement.agreement`).

Step ``s``'s query sits at position ``P + s`` (it feeds token ``s`` and predicts token
``s + 1``); its recall is bucketed by that position, a token's NLL and match by the token's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sim.closed_loop.agreement import agreement
from sim.closed_loop.driver import DecodeRun, Prefilled, decode, prefill
from sim.closed_loop.recall import accuracy_frame
from sim.policies.base import RetrievalPolicy

#: positions per forward pass when full attention scores a generated text (the logits of one
#: chunk, ``CHUNK x vocabulary`` float32, are the pass's largest buffer: 100 MB for SmolLM2)
CHUNK = 512


def generate(
    model: Any, prompt: Sequence[int], n_tokens: int, policy: RetrievalPolicy | None,
    seed: int = 0, recall_every: int = 8, prefilled: Prefilled | None = None,
    on_step: Callable[[], None] | None = None,
) -> DecodeRun:
    """Greedy decoding of ``n_tokens`` after ``prompt`` under ``policy`` (``None``: full
    attention), the selection scored against full attention on decode steps ``0,
    recall_every, ...`` (``run.controller.accuracy``), with one BLAS thread (as the open-loop
    pass: the scores do not depend on the cores); ``on_step()``: called once per token
    (progress)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return decode(model, prompt, n_tokens, policy, seed, prefilled=prefilled,
                      recall_every=recall_every, on_step=on_step)


def full_attention_nll(
    model: Any, prompt: Sequence[int], tokens: Sequence[int] | np.ndarray,
    prefilled: Prefilled | None = None, chunk: int = CHUNK,
) -> np.ndarray:
    """``-log p(tokens[i] | prompt, tokens[:i])`` under the model's own (full) attention, (T,)
    float64: teacher-forced, the prompt's prefill (``prefilled``, reused, or computed) then
    ``tokens[:-1]`` in forward passes of ``chunk`` positions."""
    import torch

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 positions, got {chunk}")
    ids = [int(t) for t in tokens]
    if not ids:
        raise ValueError("no tokens to score")
    if prefilled is None:
        prefilled = prefill(model, prompt, len(prompt) + len(ids))
    elif prefilled.prompt != tuple(int(t) for t in prompt):
        raise ValueError("the prefill given is of another prompt")
    if len(prompt) + len(ids) > prefilled.capacity:
        raise ValueError(f"prompt + tokens = {len(prompt) + len(ids)} exceeds the "
                         f"prefill's capacity of {prefilled.capacity} positions")
    nll = np.empty(len(ids))
    with torch.inference_mode():
        first = torch.log_softmax(prefilled.logits[0, -1].float(), dim=-1)
        nll[0] = float(-first[ids[0]])
        cache = copy.deepcopy(prefilled.cache)
        for lo in range(0, len(ids) - 1, chunk):
            hi = min(len(ids) - 1, lo + chunk)
            out = model(input_ids=torch.tensor([ids[lo:hi]], dtype=torch.long),
                        cache=cache, use_cache=True)
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            target = torch.tensor(ids[lo + 1 : hi + 1], dtype=torch.long)
            nll[lo + 1 : hi + 1] = (-logp[torch.arange(hi - lo), target]).double().numpy()
    return nll


def generation_table(
    tokens: np.ndarray, tokens_full: np.ndarray, nll: np.ndarray, nll_full: np.ndarray,
    accuracy: pd.DataFrame, prompt_len: int, bucket: int,
) -> pd.DataFrame:
    """Per bucket of ``bucket`` generated positions and over all (``bucket`` "all"):

    ``tokens`` (positions), ``match_share`` (the policy's token equals full attention's),
    ``mean_nll`` / ``mean_nll_full`` (the full-attention model's NLL of the policy's / of full
    attention's own generated tokens), ``ppl_ratio`` = exp(their difference), and from
    ``accuracy`` (:func:`sim.closed_loop.recall.accuracy_frame`, bucketed by the query's
    position) ``loop_recall``, ``loop_topk_recall``, ``loop_output_rel_error`` (means over
    scored step, global layer and query head; NaN where no step was scored) and
    ``scored_steps``."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1 tokens, got {bucket}")
    n = len(tokens)
    if not n or not len(tokens_full) == len(nll) == len(nll_full) == n:
        raise ValueError("tokens, full attention's tokens and both NLLs need one length >= 1")
    same = np.asarray(tokens) == np.asarray(tokens_full)
    offset = accuracy["position"].to_numpy() - prompt_len

    def row(label: str, part: slice, scored: np.ndarray) -> dict[str, Any]:
        acc = accuracy[scored]
        mean_nll, mean_full = float(nll[part].mean()), float(nll_full[part].mean())
        return {
            "bucket": label, "tokens": len(same[part]),
            "match_share": float(same[part].mean()),
            "mean_nll": mean_nll, "mean_nll_full": mean_full,
            "ppl_ratio": math.exp(mean_nll - mean_full),
            "loop_recall": float(acc["attention_recall"].mean()) if len(acc) else math.nan,
            "loop_topk_recall": float(acc["topk_recall"].mean()) if len(acc) else math.nan,
            "loop_output_rel_error": (float(acc["output_rel_error"].mean()) if len(acc)
                                      else math.nan),
            "scored_steps": int(acc["step"].nunique()),
        }

    rows = []
    for lo in range(0, n, bucket):
        hi = min(n, lo + bucket)
        rows.append(row(f"{prompt_len + lo}-{prompt_len + hi - 1}", slice(lo, hi),
                        (offset >= lo) & (offset < hi)))
    rows.append(row("all", slice(0, n), np.ones(len(accuracy), bool)))
    return pd.DataFrame(rows)


def generation_results(
    run: DecodeRun, reference: DecodeRun, nll: np.ndarray, nll_full: np.ndarray,
    prompt_len: int, bucket: int,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One long generation against full attention's: (summary metrics, per-bucket table,
    per-token table, per (step, layer, query head) accuracy in the loop). ``nll`` /
    ``nll_full``: :func:`full_attention_nll` of the run's / the reference's tokens."""
    records = [] if run.controller is None else run.controller.accuracy
    accuracy = accuracy_frame(records, prompt_len)
    table = generation_table(run.tokens, reference.tokens, nll, nll_full, accuracy,
                             prompt_len, bucket)
    first, share = agreement(reference.tokens, run.tokens)
    total, last = table.iloc[-1], table.iloc[-2]
    metrics = {
        "first_divergence": first,
        "match_share": share,
        "mean_nll": float(total["mean_nll"]),
        "mean_nll_full": float(total["mean_nll_full"]),
        "ppl_ratio": float(total["ppl_ratio"]),
        "loop_recall": float(total["loop_recall"]),
        "loop_recall_last": float(last["loop_recall"]),
        "loop_topk_recall": float(total["loop_topk_recall"]),
        "recall_s": round(0.0 if run.controller is None else run.controller.recall_s, 3),
    }
    tokens = pd.DataFrame({
        "position": prompt_len + np.arange(len(run.tokens)), "token": run.tokens,
        "token_full": reference.tokens, "match": run.tokens == reference.tokens,
        "nll": nll, "nll_full": nll_full, "nll_self": run.nll,
    })
    return metrics, table, tokens, accuracy


def compare_long_generation(
    model: Any, prompt: Sequence[int], n_tokens: int, policies: Sequence[RetrievalPolicy],
    seed: int = 0, bucket: int = 256, recall_every: int = 8,
) -> pd.DataFrame:
    """Per policy and bucket, :func:`generation_table` of a greedy generation of ``n_tokens``
    after ``prompt`` against full attention's (``policy`` = "full (model)": match 1, ratio 1,
    no recall scored), from one prefill."""
    from sim.closed_loop.perplexity import describe

    shared = prefill(model, prompt, len(prompt) + n_tokens)
    reference = generate(model, prompt, n_tokens, None, seed, recall_every, shared)
    nll_full = full_attention_nll(model, prompt, reference.tokens, shared)
    frames = [generation_results(reference, reference, nll_full, nll_full, len(prompt),
                                 bucket)[1].assign(policy="full (model)")]
    for policy in policies:
        run = generate(model, prompt, n_tokens, policy, seed, recall_every, shared)
        nll = full_attention_nll(model, prompt, run.tokens, shared)
        table = generation_results(run, reference, nll, nll_full, len(prompt), bucket)[1]
        frames.append(table.assign(policy=describe(policy)))
    frame = pd.concat(frames, ignore_index=True)
    return frame[["policy", *[c for c in frame.columns if c != "policy"]]]
