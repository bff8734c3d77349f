"""Choosing the next token of a generated trace (greedy or seeded sampling, :class:`NextToken`)
and the degeneration statistics of the tokens chosen (:func:`degeneration`), recorded in the
manifest so a looping trace is visible. transformers is imported only when a NextToken is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: how generate-mode captures choose tokens (``CaptureSettings.sampling``)
SAMPLINGS = ("greedy", "sample")


class NextToken:
    """Chooses decode step tokens from the last position's logits: greedy argmax or a seeded
    draw, after transformers' own logits processors (``RepetitionPenaltyLogitsProcessor``,
    ``TemperatureLogitsWarper``, ``TopPLogitsWarper``, applied in that order as
    ``generate()`` does). ``tokens`` is a preallocated (1, n_positions) id tensor holding every
    token so far (the repetition penalty's history).

    ``sampling`` is one of :data:`SAMPLINGS`; ``temperature`` and ``top_p`` apply only when
    sampling, ``repetition_penalty`` (1.0: none) to both; ``seed`` seeds the draw's
    ``torch.Generator`` (the fields of :class:`sim.trace.capture.CaptureSettings`)."""

    def __init__(
        self,
        torch: Any,
        n_positions: int,
        *,
        sampling: str,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        seed: int,
    ) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        self.torch = torch
        self.sample = sampling == "sample"
        self.processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if self.sample:
            if temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.processors.append(TopPLogitsWarper(top_p))
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
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
