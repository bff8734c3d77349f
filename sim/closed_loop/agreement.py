"""Generation agreement in the loop: greedy decoding of N tokens under a policy against full
attention from the same prompt (issue 9): how many tokens agree before the first divergence,
and the share of positions whose tokens match.

After a divergence the two continuations condition on different text, so the share counts
positions, not a re-aligned comparison: it says how much of the policy's output a reader would
see unchanged, and the first divergence how long the policy tracks the model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sim.closed_loop.driver import decode, prefill
from sim.closed_loop.perplexity import describe
from sim.policies.base import RetrievalPolicy


def agreement(reference: np.ndarray, tokens: np.ndarray) -> tuple[int, float]:
    """(tokens before the first divergence, share of equal positions) of two equally long
    token sequences; the first is ``len`` if they never diverge."""
    if len(reference) != len(tokens) or not len(tokens):
        raise ValueError(f"need two non-empty sequences of one length, got {len(reference)} "
                         f"and {len(tokens)}")
    same = np.asarray(reference) == np.asarray(tokens)
    first = int(np.argmin(same)) if not same.all() else len(same)
    return first, float(same.mean())


def compare_generation(
    model: Any, prompt: Sequence[int], n_tokens: int, policies: Sequence[RetrievalPolicy],
    seed: int = 0,
) -> pd.DataFrame:
    """Greedy decoding of ``n_tokens`` after ``prompt`` under full attention and under each of
    ``policies``: per policy the tokens before the first divergence and the share of matching
    positions (full attention's own row: ``n_tokens`` and 1)."""
    shared = prefill(model, prompt, len(prompt) + n_tokens)  # once, for every run
    reference = decode(model, prompt, n_tokens, None, seed, prefilled=shared).tokens
    rows = [{"policy": "full (model)", "first_divergence": n_tokens, "match_share": 1.0}]
    for policy in policies:
        tokens = decode(model, prompt, n_tokens, policy, seed, prefilled=shared).tokens
        first, share = agreement(reference, tokens)
        rows.append({"policy": describe(policy), "first_divergence": first,
                     "match_share": share})
    return pd.DataFrame(rows)
