"""The optional per-run records of an experiment's ``record:`` block
(:class:`sim.config.RecordSpec`), computed once per policy pass from the pass and its trace.

Everything a record-based figure needs from the trace or the policy is computed here, while
both are at hand, so figures read result files only:

* ``cluster_labels.parquet``: one KV head's cluster label of every position after each of
  ``cluster_steps`` (DynaKV Fig. 4);
* ``cluster_keys.parquet``: that head's keys projected on their first two principal components
  (fitted on every key past the policy's sinks), the axes of Fig. 4;
* ``coretrieval.npy``: that head's prefill-cluster co-retrieval counts, if the policy measured
  them (DynaKV Fig. 7);
* ``cluster_record.json``: what reading those needs: the prompt length, the sinks left out of
  the fit, the PCA's variance shares and the number of co-retrieval queries measured;
* ``update_retrieval.csv``: the probability that a just-updated cluster is retrieved within
  t = 1..horizon steps, over every layer and KV head (DynaKV Table 2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sim.config import RecordSpec
from sim.errors import KvsimError
from sim.metrics.clusters import labels_after, update_retrieval
from sim.result_files import (
    CLUSTER_KEYS,
    CLUSTER_LABELS,
    CLUSTER_RECORD,
    CORETRIEVAL,
    UPDATE_RETRIEVAL,
)


def pca_basis(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, two principal directions (2, d), their shares of the variance) by SVD."""
    mean = points.mean(axis=0)
    _, singular, vt = np.linalg.svd(points - mean, full_matrices=False)
    share = singular**2 / max(float((singular**2).sum()), 1e-300)
    return mean, vt[:2], share[:2]


def _cluster_keys(trace: Any, layer: int, head: int, sinks: int) -> tuple[pd.DataFrame, list]:
    """Every key of (layer, KV head) on the first two principal components of the keys past
    the sinks (sinks are outliers that would dominate the fit); and the components' shares of
    the key variance."""
    keys = np.asarray(trace.keys(layer)[head], dtype=np.float64)
    mean, axes, share = pca_basis(keys[sinks:])
    projected = (keys - mean) @ axes.T
    frame = pd.DataFrame({
        "position": np.arange(len(keys), dtype=np.int32),
        "pc1": projected[:, 0],
        "pc2": projected[:, 1],
    })
    return frame, [float(s) for s in share]


def _cluster_records(pp: Any, spec: RecordSpec, trace: Any) -> dict[str, Any]:
    layer, head = spec.cluster_layer, spec.cluster_kv_head
    assert layer is not None  # extra_records only asks for cluster records when it is set
    if layer >= trace.model.n_layers:
        raise KvsimError(
            f"record.cluster_layer: {layer} >= the trace's {trace.model.n_layers} layers"
        )
    out: dict[str, Any] = {}
    selection = pp.selections[layer]
    sinks = int(getattr(pp.policy, "sink_tokens", 0) or 0)
    about: dict[str, Any] = {"prompt_len": int(trace.prompt_len), "sink_tokens": sinks}
    if selection.prefill_groups is not None and spec.cluster_steps:
        if head >= len(selection.prefill_groups):
            raise KvsimError(f"record.cluster_kv_head: {head} >= the trace's KV heads")
        frames = []
        for step in spec.cluster_steps:
            step = min(step, pp.decode_steps - 1)
            labels = labels_after(pp.prompt_len, selection, head, step)
            frames.append(pd.DataFrame({
                "step": np.full(len(labels), step, dtype=np.int32),
                "position": np.arange(len(labels), dtype=np.int32),
                "group": labels.astype(np.int32),
            }))
        out[CLUSTER_LABELS] = pd.concat(frames, ignore_index=True)
        out[CLUSTER_KEYS], about["pca_variance_share"] = _cluster_keys(trace, layer, head, sinks)
    if selection.coretrieval is not None and head < len(selection.coretrieval):
        out[CORETRIEVAL] = np.asarray(selection.coretrieval[head])
        # the policy measures co-retrieval on its last prompt queries, at most all but one
        queries = int(getattr(pp.policy, "coretrieval_queries", 0))
        about["coretrieval_queries"] = min(queries, int(trace.prompt_len) - 1)
    if out:
        out[CLUSTER_RECORD] = about
    return out


def _update_retrieval(pp: Any, horizon: int) -> pd.DataFrame | None:
    def tail(step: int) -> int:
        return pp.policy.kept_tail_start(pp.prompt_len, step)

    total = None
    for selection in pp.selections:
        counts = update_retrieval(pp.prompt_len, selection, horizon, tail)
        if counts is not None:
            total = counts if total is None else total + counts
    if total is None:
        return None
    return pd.DataFrame({
        "within_steps": np.arange(1, horizon + 1),
        "probability": total[1:] / max(int(total[0]), 1),
        "updates": int(total[0]),
    })


def extra_records(pp: Any, record: dict[str, Any], trace: Any) -> dict[str, Any]:
    """The records ``record`` (a :class:`RecordSpec` as a mapping) asks for, from the policy
    pass ``pp`` over ``trace``: file name -> frame, array or (``.json``) mapping."""
    spec = RecordSpec(**record)
    out: dict[str, Any] = {}
    if spec.cluster_layer is not None:
        out.update(_cluster_records(pp, spec, trace))
    if spec.update_horizon:
        table = _update_retrieval(pp, spec.update_horizon)
        if table is not None:
            out[UPDATE_RETRIEVAL] = table
    return out
