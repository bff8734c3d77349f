"""Attention recall in the loop: how much of full attention's probability mass the policy's
selection covers at a decode step, measured on what the model actually computes in the loop
(its own query and every key the loop has stored), not on a recorded trace.

The definition is kvsim's open-loop one, and so is the code: :func:`step_accuracy` hands one
decode step of one layer to :func:`sim.metrics.accuracy.layer_accuracy` (the exact softmax over
the stored positions and the current token, scaled by ``1 / sqrt(d)``, weights floored at
``e^-80`` of the row maximum; recall is the mass on the selected positions plus the current
token; top-k recall and the attention output's relative error come with it). Per query head:
grouped-query heads read their KV head's selection. Averages are taken over (step, global layer,
query head) as the open-loop summary's ``retrieval_recall_mean`` (a model's sliding-window
layers keep their window in the loop and are not scored).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.metrics.accuracy import layer_accuracy
from sim.policies.base import HeadSelections, LayerSelection

#: the columns of one scored (step, layer): per query head, :func:`step_accuracy`'s metrics
METRICS = ("attention_recall", "topk_recall", "output_rel_error", "n_selected")


def step_accuracy(
    queries: np.ndarray, keys: np.ndarray, values: np.ndarray,
    selection: list[np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """kvsim's accuracy metrics of one decode step's selection at one layer, each (H_q,).

    ``queries`` (H_q, d): the step's queries; ``keys`` / ``values`` (H_kv, N, d): the layer's
    whole context, the current token last (stored positions ``[0, N - 1)``); ``selection``:
    per KV head the attended stored positions (sorted, unique), or ``None`` for every stored
    position (recall 1 by definition, as full attention's in the open loop)."""
    stored = keys.shape[1] - 1
    if selection is None:
        heads = None
    else:
        if len(selection) != keys.shape[0]:
            raise ValueError(f"selection has {len(selection)} KV heads, the layer "
                             f"{keys.shape[0]}")
        heads = [HeadSelections(np.asarray(p), np.array([0, len(p)], np.int64))
                 for p in selection]
    layer = LayerSelection(heads=heads, index_vectors=np.zeros((keys.shape[0], 1, 0,
                                                                keys.shape[2]), np.float32))
    metrics = layer_accuracy(queries[:, None], keys, values, stored, layer)
    return {name: metrics[name][:, 0] for name in METRICS}


def accuracy_frame(records: list[tuple[int, int, dict[str, np.ndarray]]],
                   prompt_len: int) -> pd.DataFrame:
    """``(step, layer, metrics)`` records (:func:`step_accuracy`'s) as one row per (step,
    layer, query head): ``step``, ``position`` (of the step's query: ``prompt_len + step``),
    ``layer``, ``q_head`` and the metrics, sorted by step and layer."""
    columns = ["step", "position", "layer", "q_head", *METRICS]
    if not records:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c in ("step", "position", "layer",
                                                                     "q_head", "n_selected")
                                          else float) for c in columns})
    ordered = sorted(records, key=lambda r: (r[0], r[1]))
    n_q = len(ordered[0][2]["attention_recall"])
    steps = np.repeat([r[0] for r in ordered], n_q).astype(np.int64)
    frame = {
        "step": steps,
        "position": prompt_len + steps,
        "layer": np.repeat([r[1] for r in ordered], n_q).astype(np.int64),
        "q_head": np.tile(np.arange(n_q, dtype=np.int64), len(ordered)),
    }
    for name in METRICS:
        frame[name] = np.concatenate([r[2][name] for r in ordered])
    frame["n_selected"] = frame["n_selected"].astype(np.int64)
    return pd.DataFrame(frame)
