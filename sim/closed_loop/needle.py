"""Needle retrieval in the loop (issue 9): facts hidden at chosen depths of a long filler
context, one question at a time, exact match of the greedy answer under each policy.

The facts are key-value pairs, "The access code for <name> is <code>.": distinct names of
:data:`NAMES` with five-digit codes, drawn from a seed alone (:func:`make_facts`), each asked
as "What is the access code for <name>? The access code for <name> is" and answered by the
code (:class:`Fact`). :func:`build_suite` cuts the context from a text's tokens and hides the
facts in it (:func:`place_needles`).

The context is prefilled once (:func:`sim.closed_loop.driver.prefill`) and reused for every
question, policy and budget; each question's tokens are then fed as decode steps under the
policy (teacher-forced: the policy sees the question's queries, as in a chat turn after a
long document) and the answer is decoded greedily after them (:func:`answer_needles`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sim.closed_loop.driver import Prefilled, decode, prefill
from sim.closed_loop.perplexity import describe
from sim.policies.base import RetrievalPolicy

#: who the facts are about: one fact per name, so at most this many needles per context
NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid",
    "Jamal", "Katya", "Lorenzo", "Mireille", "Nadia", "Oskar", "Priya", "Quentin", "Rosalind",
    "Soren", "Tamsin", "Ulrich", "Vesna", "Wendell", "Yusuf",
)
#: the depths of the needle task when none are given (the issue's 0.1-0.9)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: the needle task's context when none is given
DEFAULT_CONTEXT_LEN = 2048


@dataclass(frozen=True)
class Fact:
    """One key-value pair: the fact as it sits in the context (its own line), the question
    fed after the context and the answer expected (a space and the code)."""

    name: str
    code: str

    @property
    def text(self) -> str:
        return f"\nThe access code for {self.name} is {self.code}.\n"

    @property
    def question(self) -> str:
        return (f"\nWhat is the access code for {self.name}? The access code for {self.name} "
                "is")

    @property
    def answer(self) -> str:
        return f" {self.code}"


def make_facts(n: int, seed: int) -> list[Fact]:
    """``n`` facts about distinct names of :data:`NAMES` with five-digit codes, drawn from
    ``numpy.random.default_rng(seed)`` alone."""
    if not 1 <= n <= len(NAMES):
        raise ValueError(f"between 1 and {len(NAMES)} facts (one per name), not {n}")
    rng = np.random.default_rng(seed)
    names = rng.permutation(len(NAMES))[:n]
    codes = rng.integers(10_000, 100_000, size=n)
    return [Fact(NAMES[i], str(int(c))) for i, c in zip(names, codes, strict=True)]


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


@dataclass(frozen=True)
class NeedleSuite:
    """A context with facts hidden in it and their questions: ``context`` the token ids (a
    BOS the text starts with stays first); per needle its :class:`Fact`, ``depths`` as asked,
    ``starts`` the token position of the fact's first token in the context, and ``needles``
    the token ids of fact, question and answer."""

    context: tuple[int, ...]
    facts: tuple[Fact, ...]
    depths: tuple[float, ...]
    starts: tuple[int, ...]
    needles: tuple[Needle, ...]

    @property
    def capacity(self) -> int:
        """The most positions a question and its answer reach after the context."""
        return len(self.context) + room(self.needles)


def room(needles: Sequence[Needle]) -> int:
    """Positions the longest question and its answer take after the context."""
    return max(len(n.question) + len(n.answer) for n in needles)


def steps(needles: Sequence[Needle]) -> int:
    """Tokens fed or decoded after the context to ask every needle and read its answer."""
    return sum(len(n.question) + len(n.answer) for n in needles)


def build_suite(
    tokenize: Callable[[str], Sequence[int]], ids: Sequence[int], facts: Sequence[Fact],
    depths: Sequence[float], context_len: int, keep: int = 0,
) -> NeedleSuite:
    """A ``context_len``-token context: ``ids[:keep]`` (a BOS), then :func:`place_needles` of
    each fact (``tokenize``: text -> token ids, no special tokens) at its depth of the
    remaining ``context_len - keep`` tokens, in the filler ``ids[keep:]``. So fact ``i``
    starts at token ``keep + round(depths[i] * (context_len - keep - len(fact)))``. Raises
    ValueError as :func:`place_needles` does."""
    needles = tuple(Needle(tuple(tokenize(f.text)), tuple(tokenize(f.question)),
                           tuple(tokenize(f.answer))) for f in facts)
    body, starts = place_needles(ids[keep:], [n.fact for n in needles], depths,
                                 context_len - keep)
    return NeedleSuite(tuple(int(t) for t in ids[:keep]) + tuple(body), tuple(facts),
                       tuple(float(d) for d in depths), tuple(keep + s for s in starts),
                       needles)


def exact_match(answer: Sequence[int] | np.ndarray, expected: Sequence[int]) -> bool:
    """Whether the answer's token ids are exactly the expected ones."""
    return len(answer) == len(expected) and all(
        int(a) == int(e) for a, e in zip(answer, expected, strict=True))


@dataclass
class NeedleAnswers:
    """One policy's answers to a context's questions: per needle the greedy answer's token
    ids (as many as the expected answer has) and whether they match it exactly; ``decode_s``
    / ``hook_s`` the decode steps' and the policy's time, summed over the questions."""

    answers: list[np.ndarray]
    correct: list[bool]
    decode_s: float
    hook_s: float

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))


def answer_needles(
    model: Any, context: Sequence[int], needles: Sequence[Needle],
    policy: RetrievalPolicy | None = None, seed: int = 0, prefilled: Prefilled | None = None,
    on_step: Callable[[], None] | None = None,
) -> NeedleAnswers:
    """Ask each needle's question after ``context`` under ``policy`` (``None``: full
    attention) and decode its answer greedily, from ``prefilled`` (the context's
    :func:`~sim.closed_loop.driver.prefill` with room for the longest question and answer;
    computed here if not given). ``on_step()``: called once per token of each question and
    answer (:func:`steps` in all), for progress reports."""
    shared = prefilled or prefill(model, context, len(context) + room(needles))
    answers, correct, decode_s, hook_s = [], [], 0.0, 0.0
    for needle in needles:
        run = decode(model, context, len(needle.question) + len(needle.answer), policy, seed,
                     teacher=needle.question, prefilled=shared, on_step=on_step)
        answer = run.tokens[len(needle.question):]
        answers.append(answer)
        correct.append(exact_match(answer, needle.answer))
        decode_s += run.decode_s
        hook_s += run.hook_s
    return NeedleAnswers(answers, correct, decode_s, hook_s)


def needle_table(
    suite: NeedleSuite, run: NeedleAnswers, reference: NeedleAnswers,
    detokenize: Callable[[Sequence[int]], str],
) -> pd.DataFrame:
    """Per needle: its depth and start token, the fact, the expected code, the answer under
    the policy and under full attention (``detokenize``: token ids -> text) and whether each
    is exactly right."""
    return pd.DataFrame({
        "needle": range(len(suite.needles)),
        "depth": suite.depths,
        "position": suite.starts,
        "fact": [f.text.strip() for f in suite.facts],
        "expected": [f.code for f in suite.facts],
        "answer": [detokenize(a.tolist()).strip() for a in run.answers],
        "correct": run.correct,
        "answer_full": [detokenize(a.tolist()).strip() for a in reference.answers],
        "correct_full": reference.correct,
    })


def needle_accuracy(
    model: Any, context: Sequence[int], needles: Sequence[Needle],
    policies: Sequence[RetrievalPolicy | None], seed: int = 0,
) -> pd.DataFrame:
    """Per policy (``None``: full attention) and needle: whether the greedy answer after the
    question is the expected answer (:func:`exact_match`), from one prefill of ``context``.
    Columns: policy, needle, correct; the answer decoded as ``answer_ids``."""
    shared = prefill(model, context, len(context) + room(needles))
    rows = []
    for policy in policies:
        run = answer_needles(model, context, needles, policy, seed, prefilled=shared)
        for index, (answer, correct) in enumerate(zip(run.answers, run.correct, strict=True)):
            rows.append({
                "policy": "full (model)" if policy is None else describe(policy),
                "needle": index,
                "correct": correct,
                "answer_ids": answer.tolist(),
            })
    return pd.DataFrame(rows)
