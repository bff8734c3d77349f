"""A long decode end to end, on a small generated fixture: ten times more decode steps than
prompt positions, and decode keys that move to topics the prompt never had, so that clusters
built at prefill drift (the regime of DynaKV, arXiv 2511.07427, Sec. 1).

The fixture is built so the expected behaviour follows from its construction, not from a run:

* the prompt's keys lie around 4 prefill centres; the decode walks through 8 new topics, one
  per 60 steps, each a fresh direction far from every prefill centre;
* a decode query points at its own topic, so exact attention concentrates on that topic's keys
  (written since the topic began, up to 60 entries); a 10% budget of the context (29-53 entries
  in the second half of the decode) holds all of them for most of a topic's 60 steps, so
  token-level top-k's recall stays high;
* static update (PQCache-style) assigns every new key to its nearest *prefill* cluster, so a
  topic's keys are scattered over clusters whose centroids never moved: a query finds them only
  through the recent window, and static update's recall must fall far below token-level top-k's;
* DynaKV splits a cluster whose new members lie far from it, so a topic gets clusters of its
  own: its recall must stay close to token-level top-k's;
* ClusterKV's local update clusters each window of ``m`` steps on its own, so its index must
  grow by ``window_clusters`` exactly at every ``m``-th step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sim.cli import main
from sim.policies import POLICIES
from sim.policy_pass import run_policy_pass
from sim.trace.format import open_trace
from sim.trace.writer import TraceWriter

MODEL = {
    "name": "toy", "source": "synthetic", "n_layers": 2, "n_q_heads": 2, "n_kv_heads": 1,
    "head_dim": 16, "params_per_layer": 50_000, "rope_theta": 10000.0, "sliding_window": None,
}
TEXT = {"source": "synthetic", "name": "drifting-topics", "sha256": "0" * 64, "n_chars": 0}
PROMPT, STEPS, TOPIC_STEPS = 48, 480, 60
N_POS = PROMPT + STEPS
ACCURACY_EVERY = 4


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _write_fixture(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    dim = MODEL["head_dim"]
    with TraceWriter(path, MODEL, PROMPT, STEPS, 0, TEXT, {"seed": seed}) as writer:
        writer.write_tokens(rng.integers(0, 1000, N_POS))
        for layer in range(MODEL["n_layers"]):
            prefill_centres = 4.0 * _unit(rng, 4, dim)
            topics = 4.0 * _unit(rng, STEPS // TOPIC_STEPS, dim)
            keys = np.empty((N_POS, dim))
            keys[:PROMPT] = prefill_centres[rng.integers(0, 4, PROMPT)]
            topic_of_step = np.arange(STEPS) // TOPIC_STEPS
            keys[PROMPT:] = topics[topic_of_step]
            keys += 0.3 * rng.standard_normal(keys.shape)
            queries = np.empty((MODEL["n_q_heads"], N_POS, dim))
            queries[:, :PROMPT] = prefill_centres[rng.integers(0, 4, PROMPT)]
            queries[:, PROMPT:] = 2.5 * topics[topic_of_step]
            queries += 0.3 * rng.standard_normal(queries.shape)
            values = rng.standard_normal((1, N_POS, dim))
            writer.write_layer(layer, keys[None].astype(np.float32),
                               values.astype(np.float32), queries.astype(np.float32), None)
    return path


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """One ``kvsim run`` of the long-decode experiment on the fixture (all techniques on)."""
    root = tmp_path_factory.mktemp("long")
    trace = _write_fixture(root / "trace")
    model_path = root / "toy.yaml"  # simulated at the fixture's own sizes: a quick replay
    model_path.write_text(yaml.safe_dump({
        **{key: MODEL[key] for key in ("name", "n_layers", "n_q_heads", "n_kv_heads",
                                       "head_dim", "params_per_layer")},
        "hidden_size": 32, "intermediate_size": 64, "vocab_size": 1000}))
    common = {"budget": 0.1, "tokens_per_cluster": 8, "sink_tokens": 2, "recent_tokens": 4}
    config = {
        "name": "long_fixture",
        "seed": 0,
        "trace": {"path": str(trace)},
        "accuracy_every": ACCURACY_EVERY,
        "device": {"preset": "ufs40-flagship", "compute": {"weight_bits": 8}},
        "model": str(model_path),
        "kv_dtype": "fp8",
        "cache": {"replacement": "lru", "capacity": 0.05},
        "plot": False,
        "policies": [
            {"type": "token_topk", "budget": 0.1},
            {"type": "static_clusters", "layout": "sequence", **common},
            {"type": "clusterkv", "layout": "sequence", "update_interval": 96,
             "window_clusters": 2, "full_layers": 0, **common},
            {"type": "dynakv", "layout": "dual_head", "buffer_max": 8,
             "cache": {"replacement": "cluster_aligned"},
             "pipeline": {"stream_index": True, "overlap_transfer": True}, **common},
        ],
    }
    config_path = root / "long.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = root / "results"
    assert main(["run", str(config_path), "--output", str(out), "--jobs", "1", "--quiet"]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("policy")
    runs = {policy: out / "runs" / run_id for policy, run_id in summary["run_id"].items()}
    return trace, summary, runs


def _late_recall(run_dir: Path) -> float:
    """Mean attention recall over the second half of the decode."""
    accuracy = pd.read_parquet(run_dir / "accuracy.parquet")
    return float(accuracy.loc[accuracy["step"] >= STEPS // 2, "attention_recall"].mean())


def test_every_decode_step_is_replayed_and_every_kth_is_scored(long_run):
    _trace, summary, runs = long_run
    assert len(summary) == 4
    assert (summary["accuracy_every"] == ACCURACY_EVERY).all()
    for run_dir in runs.values():
        steps = pd.read_parquet(run_dir / "steps.parquet")
        assert steps["step"].tolist() == list(range(STEPS))
        assert np.isfinite(steps["latency_us"]).all() and (steps["latency_us"] > 0).all()
        scored = sorted(pd.read_parquet(run_dir / "accuracy.parquet")["step"].unique())
        assert scored == list(range(0, STEPS, ACCURACY_EVERY))


def test_drift_hurts_static_update_and_not_dynakv(long_run):
    _trace, _summary, runs = long_run
    recall = {policy: _late_recall(run_dir) for policy, run_dir in runs.items()}
    # the 10% budget (29-53 entries late) holds a topic's keys for most of its 60 steps
    assert recall["token_topk"] > 0.9
    assert recall["dynakv"] > recall["token_topk"] - 0.15
    assert recall["static_clusters"] < recall["dynakv"] - 0.2


def test_clusterkv_index_grows_by_its_window_clusters_every_m_steps(long_run):
    trace_path, _summary, _runs = long_run
    policy = POLICIES.create({"type": "clusterkv", "budget": 0.1, "tokens_per_cluster": 8,
                             "sink_tokens": 2, "recent_tokens": 4, "update_interval": 96,
                             "window_clusters": 2, "full_layers": 0})
    passed = run_policy_pass(open_trace(trace_path), policy, seed=0, accuracy_every=8)
    prefill_clusters = round((PROMPT - 2) / 8)
    expected = prefill_clusters + 2 * (np.arange(STEPS) // 96)
    for selection in passed.selections:
        np.testing.assert_array_equal(selection.index_vectors[0], expected)
