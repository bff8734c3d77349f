"""Needle retrieval in the loop (issue 9): facts hidden at chosen depths of a long filler
context, one question at a time, exact match of the greedy answer under each policy.

The context is prefilled once (:func:`sim.closed_loop.driver.prefill`) and reused for every
question, policy and budget; each question's tokens are then fed as decode steps under the
policy (teacher-forced: the policy sees the question's queries, as in a chat turn after a
long document) and the answer is decoded greedily after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sim.closed_loop.driver import decode, prefill
from sim.closed_loop.perplexity import describe
from sim.policies.base import RetrievalPolicy


@dataclass(frozen=True)
class Needle:
    """One fact and how it is asked: token ids of the fact as it sits in the context, of
    the question fed after the context, and of the expected answer."""

    fact: tuple[int, ...]
    question: tuple[int, ...]
    answer: tuple[int, ...]


def place_needles(
    filler: Sequence[int], facts: Sequence[Sequence[int]], depths: Sequence[float],
    context_len: int,
) -> tuple[list[int], list[int]]:
    """A context of ``context_len`` tokens: ``filler`` (its first tokens, in order) with fact
    ``i`` inserted whole so that it starts at token ``round(depths[i] * (context_len -
    len(fact)))``: depth 0 opens the context, depth 1 ends it. Returns (context, starts).

    Raises ValueError for a depth outside [0, 1], facts that would overlap, or too little
    filler.
    """
    if len(facts) != len(depths):
        raise ValueError(f"{len(facts)} facts but {len(depths)} depths")
    for depth in depths:
        if not 0.0 <= float(depth) <= 1.0:
            raise ValueError(f"a needle depth must be in [0, 1], got {depth}")
    starts = [round(float(d) * (context_len - len(f))) for f, d in zip(facts, depths,
                                                                         strict=True)]
    order = sorted(range(len(facts)), key=lambda i: starts[i])
    for a, b in zip(order, order[1:], strict=False):
        if starts[b] < starts[a] + len(facts[a]):
            raise ValueError(f"needles at depths {depths[a]} and {depths[b]} overlap in "
                             f"{context_len} tokens")
    need = context_len - sum(len(f) for f in facts)
    if len(filler) < need:
        raise ValueError(f"the filler has {len(filler)} tokens; {need} are needed")
    context: list[int] = []
    used = 0
    for i in order:
        gap = starts[i] - len(context)
        context.extend(int(t) for t in filler[used : used + gap])
        used += gap
        context.extend(int(t) for t in facts[i])
    context.extend(int(t) for t in filler[used : used + context_len - len(context)])
    return context, starts


def needle_accuracy(
    model: Any, context: Sequence[int], needles: Sequence[Needle],
    policies: Sequence[RetrievalPolicy | None], seed: int = 0,
) -> pd.DataFrame:
    """Per policy (``None``: full attention) and needle: whether the greedy answer after the
    question starts with the expected answer (exact match), from one prefill of ``context``.
    Columns: policy, needle, correct; the answer decoded as ``answer_ids``."""
    longest = max(len(n.question) + len(n.answer) for n in needles)
    shared = prefill(model, context, len(context) + longest)
    rows = []
    for policy in policies:
        for index, needle in enumerate(needles):
            n_tokens = len(needle.question) + len(needle.answer)
            run = decode(model, context, n_tokens, policy, seed, teacher=needle.question,
                         prefilled=shared)
            answer = run.tokens[len(needle.question):]
            rows.append({
                "policy": "full (model)" if policy is None else describe(policy),
                "needle": index,
                "correct": bool(np.array_equal(answer, needle.answer)),
                "answer_ids": answer.tolist(),
            })
    return pd.DataFrame(rows)
