"""Closed-loop runs of ``kvsim run`` (an experiment's ``closed_loop:`` block,
:class:`sim.config.ClosedLoopSpec`): each run is one policy inside the real model
(:mod:`sim.closed_loop`), scored against full attention on the same input.

* :func:`check_texts` (coordinator, before anything is written): the model loads (else the
  one-line install hint of the ``capture`` extra) and the text holds the prompt and, for
  ``perplexity``, the continuation; for ``needle``, the context (:func:`needle_suite`: the
  text holds it, the facts fit side by side, the context and a question fit the model).
* :func:`run_closed_loop_group` (worker): the runs it is given, one after another; the model,
  the prompt's prefill (:func:`sim.closed_loop.driver.prefill`) and full attention's reference
  decode are computed once per worker process and reused by every run on the same (model,
  text, prompt), whichever policy or budget it has (needle: the context with its facts, and
  full attention's answers, per (model, text, context, depths, seed)). A worker keeps one
  prompt at a time (a 32K context's KV cache is gigabytes); the runner sends the runs sharing
  a prompt one after another. Each run's files are written as it
  completes (:func:`sim.experiment.store.write_closed_loop_run`). Inside a run its phases
  report their progress to the group's :class:`~sim.experiment.group_progress.GroupProgress`
  (as a trace replay's pass and replay do): "prefill" in positions (a new prompt, per
  chunk), "reference" (full attention's decode, when new) and "closed loop" (the policy's) in
  steps (:func:`steps`: one per token), "open-loop pass" in layers.

Records per run (:mod:`sim.result_files`): ``closed_loop.csv`` (perplexity: per position
bucket and over all, the policy's and full attention's mean NLL and perplexity and their
ratio; needle: per needle its depth, position, fact, expected code and the answers and
exact matches under the policy and under full attention) and ``tokens.parquet`` (per
continuation position: the token, and its NLL under the policy and under full attention;
agreement: the policy's and full attention's greedy tokens).
A ``generation`` run (:mod:`sim.closed_loop.generation`) writes ``closed_loop.csv`` per bucket
(agreement, the full-attention model's NLL of both generated texts, attention recall in the
loop), ``tokens.parquet`` (both greedy tokens and their NLLs) and ``loop_accuracy.parquet`` (per
scored step, global layer and query head); full attention's text is scored once per worker.
torch and transformers are imported only when a run starts.

Both views (perplexity): full attention's reference decode is written as a trace
(:class:`sim.closed_loop.driver.TraceOut`, into a temporary directory of the worker),
and each run's policy is passed over it open loop by the trace replay's own pass
(:func:`sim.policy_pass.run_policy_pass`): its attention recall on exactly the tokens, keys
and queries the closed-loop quality is measured on. ``closed_loop.save_trace``: a run also
writes its own decode's trace and its selections (``selections.parquet``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.errors import CaptureError, ConfigError
from sim.experiment.runs import RunPlan, code_fingerprint
from sim.experiment.store import summary_cell, write_closed_loop_run
from sim.result_files import (
    CLOSED_LOOP_SELECTIONS,
    CLOSED_LOOP_TABLE,
    CLOSED_LOOP_TOKENS,
    CLOSED_LOOP_TRACE,
    LOOP_ACCURACY,
)

#: torch threads of a closed-loop run (its numbers then depend on neither -j nor the cores)
THREADS = 1


def load(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a model kvsim loads (kept in-process by
    :func:`sim.trace.models.load_model`); CaptureError with the install hint without the
    ``capture`` extra."""
    from sim.trace.models import load_model

    try:
        loaded = load_model(name, progress=False)
    except CaptureError as exc:  # the install hint speaks of capture: say what needs it
        raise CaptureError(f"closed_loop.model: {exc}".replace(
            "trace capture needs", "closed-loop runs need")) from None
    return loaded.model, loaded.tokenizer


def needed_tokens(task: dict[str, Any]) -> int:
    """Tokens of the text a task reads: the prompt, and the continuation if teacher-forced
    (needle: the context, which the facts then shorten)."""
    if task["task"] == "needle":
        return task["context_len"]
    return task["prompt_len"] + (task["tokens"] if task["task"] == "perplexity" else 0)


_IDS: dict[tuple[str, str, int], list[int]] = {}


def text_ids(task: dict[str, Any]) -> list[int]:
    """The text's first :func:`needed_tokens` token ids (kept per process); CaptureError if the
    model cannot load, ConfigError naming ``closed_loop.text`` if the text is too short."""
    from sim.trace.capture import _tokenize_prefix
    from sim.trace.sources import load_text

    n = needed_tokens(task)
    key = (task["model"], task["text"], n)
    if key not in _IDS:
        _model, tokenizer = load(task["model"])
        try:
            ids, _bos = _tokenize_prefix(tokenizer, load_text(task["text"]), n)
        except CaptureError:
            what = {"perplexity": "prompt_len + tokens", "agreement": "prompt_len",
                    "needle": "context_len"}[task["task"]]
            raise ConfigError(
                f"closed_loop.text: {task['text']!r} has fewer than {what} = {n} tokens of "
                f"{task['model']}; use a longer text or fewer tokens"
            ) from None
        _IDS[key] = ids
    return _IDS[key]


_SUITES: dict[tuple[Any, ...], Any] = {}


def needle_suite(task: dict[str, Any], seed: int) -> Any:
    """The needle task's :class:`~sim.closed_loop.needle.NeedleSuite` for ``seed`` (kept per
    process): the text's first ``context_len`` tokens with one fact per depth hidden in them.
    ConfigError naming ``closed_loop.depths`` if facts overlap, ``closed_loop.context_len``
    if the context and a question with its answer exceed the model's positions."""
    from sim.closed_loop.needle import build_suite, make_facts
    from sim.trace.models import MODELS

    key = _suite_key(task, seed)
    if key not in _SUITES:
        ids = text_ids(task)
        _model, tokenizer = load(task["model"])
        bos = getattr(tokenizer, "bos_token_id", None)
        facts = make_facts(len(task["depths"]), seed)
        try:
            suite = build_suite(
                lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], ids,
                facts, task["depths"], task["context_len"],
                keep=int(bos is not None and ids[0] == bos),
            )
        except ValueError as exc:
            raise ConfigError(f"closed_loop.depths: {exc}") from None
        limit = MODELS[task["model"]].max_positions
        if suite.capacity > limit:
            raise ConfigError(
                f"closed_loop.context_len: {task['context_len']} tokens and "
                f"{suite.capacity - task['context_len']} of the longest question and answer "
                f"exceed {task['model']}'s {limit} positions; at most "
                f"{limit - suite.capacity + task['context_len']}"
            )
        _SUITES[key] = suite
    return _SUITES[key]


def _suite_key(task: dict[str, Any], seed: int) -> tuple[Any, ...]:
    return (task["model"], task["text"], task["context_len"], tuple(task["depths"]), seed)


def check_texts(runs: list[RunPlan], where: str) -> None:
    """Every distinct task's text, tokenised: raises one-line ConfigError / CaptureError before
    anything is written (the model is loaded here, and kept for an in-process run)."""
    seen: set[str] = set()
    for run in runs:
        key = repr((sorted(run.closed_loop.items()), run.seed))
        if key not in seen:
            seen.add(key)
            try:
                if run.closed_loop["task"] == "needle":
                    needle_suite(run.closed_loop, run.seed)
                else:
                    text_ids(run.closed_loop)
            except (ConfigError, CaptureError) as exc:
                raise type(exc)(f"{where}: {exc}") from None


# the worker's reuse: one prefill and the full-attention references made from it
_PREFILLED: dict[tuple[Any, ...], Any] = {}
_REFERENCES: dict[tuple[Any, ...], Any] = {}


def _prefilled(model: Any, task: dict[str, Any], ids: list[int], seed: int,
               tracker: Any, label: str) -> Any:
    """The run's prompt prefilled (kept per worker); a new one reported to ``tracker``
    (a :class:`~sim.experiment.group_progress.GroupProgress`) as phase "prefill" of ``label``,
    in positions."""
    from sim.closed_loop.driver import prefill

    if task["task"] == "needle":  # the context with its facts
        suite = needle_suite(task, seed)
        key, prompt, capacity = ("needle", *_suite_key(task, seed)), suite.context, suite.capacity
    else:
        key = (task["model"], task["text"], task["prompt_len"],
               task["prompt_len"] + task["tokens"])
        prompt, capacity = ids[: task["prompt_len"]], key[-1]
    if key not in _PREFILLED:
        _PREFILLED.clear()  # one prompt's KV at a time (a 32K context's is gigabytes)
        _REFERENCES.clear()
        tracker.start(label, "prefill", len(prompt), "position")
        _PREFILLED[key] = prefill(model, prompt, capacity, on_chunk=tracker.advance)
    return _PREFILLED[key]


def steps(task: dict[str, Any], seed: int) -> int:
    """Tokens one decode of the task produces (its ``on_step`` calls): the continuation, or
    for needle every question and answer."""
    if task["task"] == "needle":
        from sim.closed_loop.needle import steps as needle_steps

        return needle_steps(needle_suite(task, seed).needles)
    return int(task["tokens"])


def _decode(model: Any, task: dict[str, Any], ids: list[int], policy: Any, seed: int,
            shared: Any, on_step: Callable[[], None] | None = None) -> Any:
    from sim.closed_loop.driver import decode
    from sim.closed_loop.needle import answer_needles
    from sim.closed_loop.perplexity import teacher_forced

    if task["task"] == "needle":
        suite = needle_suite(task, seed)
        return answer_needles(model, suite.context, suite.needles, policy, seed,
                              prefilled=shared, on_step=on_step)
    if task["task"] == "perplexity":
        return teacher_forced(model, ids, task["prompt_len"], task["tokens"], policy, seed,
                              prefilled=shared, on_step=on_step)
    if task["task"] == "generation":
        from sim.closed_loop.generation import generate

        return generate(model, ids[: task["prompt_len"]], task["tokens"], policy, seed,
                        task["recall_every"], shared, on_step=on_step)
    return decode(model, ids[: task["prompt_len"]], task["tokens"], policy, seed,
                  prefilled=shared, on_step=on_step)


def _saving_decode(model: Any, task: dict[str, Any], ids: list[int], policy: Any, run: RunPlan,
                   path: Path, on_step: Callable[[], None] | None = None) -> Any:
    """:func:`_decode` writing its own trace to ``path`` and recording its selections (with
    its own prefill: the same numbers as the shared one, ``tests/test_closed_loop.py``)."""
    from sim.closed_loop.driver import decode
    from sim.closed_loop.perplexity import teacher_forced

    trace = trace_out(model, task, path, {"policy": run.policy, "seed": run.seed})
    if task["task"] == "perplexity":
        return teacher_forced(model, ids, task["prompt_len"], task["tokens"], policy, run.seed,
                              record=True, trace=trace, on_step=on_step)
    # agreement (planning refuses save_trace for the other tasks: SAVES_TRACE)
    return decode(model, ids[: task["prompt_len"]], task["tokens"], policy, run.seed,
                  record=True, trace=trace, on_step=on_step)


def _reference(model: Any, task: dict[str, Any], ids: list[int], seed: int, shared: Any,
               tracker: Any, label: str) -> Any:
    """Full attention's decode (kept per worker); a new one reported to ``tracker`` as phase
    "reference" of ``label``, in steps."""
    key = (task["task"], task.get("tokens"), seed)
    _drop_reference_traces(keep=_REFERENCES)  # those of references dropped with their prefill
    if key not in _REFERENCES:
        tracker.start(label, "reference", steps(task, seed), "step")
        if task["task"] == "perplexity" and task["tokens"] >= 2:  # written as a trace too:
            # the open-loop recall's (one token has no decode step: nothing to recall)
            _REFERENCES[key] = _traced_reference(model, task, ids, seed, key, tracker.advance)
        else:
            _REFERENCES[key] = _decode(model, task, ids, None, seed, shared, tracker.advance)
    return _REFERENCES[key]


def _generation_results(
    model: Any, task: dict[str, Any], ids: list[int], seed: int, shared: Any, run: Any,
    reference: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary metrics, record files) of a long generation against full attention's, both
    texts scored by the full-attention model (full attention's once per worker)."""
    from sim.closed_loop.generation import full_attention_nll, generation_results

    prompt = ids[: task["prompt_len"]]
    key = ("nll", task["tokens"], seed)
    if key not in _REFERENCES:
        _REFERENCES[key] = full_attention_nll(model, prompt, reference.tokens, shared)
    nll = full_attention_nll(model, prompt, run.tokens, shared)
    metrics, table, tokens, accuracy = generation_results(
        run, reference, nll, _REFERENCES[key], task["prompt_len"], task["bucket"])
    metrics["recall_every"] = task["recall_every"]
    return metrics, {CLOSED_LOOP_TABLE: table, CLOSED_LOOP_TOKENS: tokens,
                     LOOP_ACCURACY: accuracy}


# the worker's reference traces (full attention's teacher-forced decode, for the open-loop
# recall): reference key -> a temporary directory holding it as ``trace`` (removed when the
# prefill changes or the process ends)
_REFERENCE_TRACES: dict[tuple[Any, ...], Path] = {}


def _drop_reference_traces(keep: Any = ()) -> None:
    """Remove the reference traces whose key is not in ``keep`` (all by default)."""
    for key in [key for key in _REFERENCE_TRACES if key not in keep]:
        shutil.rmtree(_REFERENCE_TRACES.pop(key), ignore_errors=True)


atexit.register(_drop_reference_traces)


def trace_out(model: Any, task: dict[str, Any], path: Path, what: dict[str, Any]) -> Any:
    """Where and as what a closed-loop decode writes its own trace: the manifest's model and
    text entries read from ``model`` and ``closed_loop.text``, ``capture`` = the task and
    ``what`` (policy, seed)."""
    from sim.closed_loop.driver import TraceOut
    from sim.trace.models import MODELS, model_entry
    from sim.trace.sources import load_text

    spec = MODELS[task["model"]]
    return TraceOut(
        path, model_entry(model, spec.name, f"{spec.package} (closed loop)",
                          spec.max_positions),
        load_text(task["text"]).describe(),
        {"mode": "closed_loop", "closed_loop": task, **what,
         "method": "kvsim closed loop (sim.closed_loop): one forward pass per token, every "
                   "global attention layer under the policy; float32 as the model computed "
                   "them"},
    )


def _traced_reference(model: Any, task: dict[str, Any], ids: list[int], seed: int,
                      key: tuple[Any, ...], on_step: Callable[[], None] | None = None) -> Any:
    """Full attention's teacher-forced decode, written as a trace (its own prefill: the same
    numbers as from the shared one, ``tests/test_closed_loop.py``)."""
    from sim.closed_loop.perplexity import teacher_forced

    where = Path(tempfile.mkdtemp(prefix="kvsim-reference-"))
    _REFERENCE_TRACES[key] = where
    return teacher_forced(model, ids, task["prompt_len"], task["tokens"], None, seed,
                          trace=trace_out(model, task, where / "trace",
                                          {"policy": None, "seed": seed}), on_step=on_step)


def open_loop_recall(trace_path: Path, policy_spec: dict[str, Any], seed: int,
                     tracker: Any = None, label: str = "") -> dict[str, float]:
    """The policy's open-loop recall on a trace (the trace replay's pass and summary
    metrics): ``recall_open_loop`` (attention recall over the layers the policy decides,
    :func:`sim.metrics.records.retrieval_recall`) and ``topk_recall_open_loop``; the pass
    reported to ``tracker`` as phase "open-loop pass" of ``label``, in layers."""
    from sim.metrics.records import retrieval_recall
    from sim.policies import POLICIES
    from sim.policy_pass import run_policy_pass
    from sim.trace.format import open_trace

    trace = open_trace(trace_path)
    if tracker is not None:
        tracker.start(label, "open-loop pass", trace.model.n_layers, "layer")
    passed = run_policy_pass(trace, POLICIES.create(policy_spec), seed, workers=1,
                             on_layer=None if tracker is None else tracker.advance)
    return {"recall_open_loop": retrieval_recall(passed),
            "topk_recall_open_loop": float(passed.accuracy["topk_recall"].mean())}


def selection_records(controller: Any) -> pd.DataFrame:
    """A recorded controller's selections, one row per decode step, global layer and KV head:
    ``positions`` (the stored positions attended, the current token aside; null: all of
    them, the policy attended everything)."""
    rows: dict[str, list[Any]] = {"step": [], "layer": [], "kv_head": [], "positions": []}
    for step, layers in enumerate(controller.selections):
        for layer, selection in sorted(layers.items()):
            heads = selection if selection is not None else [None] * _kv_heads(controller,
                                                                                 layer)
            for head, positions in enumerate(heads):
                rows["step"].append(step)
                rows["layer"].append(layer)
                rows["kv_head"].append(head)
                rows["positions"].append(None if positions is None
                                         else np.asarray(positions, np.int32).tolist())
    return pd.DataFrame(rows).astype({"step": np.int32, "layer": np.int16,
                                      "kv_head": np.int16})


def _kv_heads(controller: Any, layer: int) -> int:
    return int(controller.recorded_keys[layer][0].shape[0])


def perplexity_records(
    nll: np.ndarray, nll_full: np.ndarray, prompt_len: int, bucket: int
) -> pd.DataFrame:
    """Per bucket of ``bucket`` positions and over all (``bucket`` "all"): the policy's and
    full attention's mean NLL and perplexity, and ``ppl_ratio`` = exp(mean NLL difference)."""
    from sim.closed_loop.perplexity import perplexity_table

    table = perplexity_table(nll, prompt_len, bucket)
    full = perplexity_table(nll_full, prompt_len, bucket)
    table["mean_nll_full"] = full["mean_nll"]
    table["perplexity_full"] = full["perplexity"]
    table["ppl_ratio"] = np.exp(table["mean_nll"] - table["mean_nll_full"])
    return table


def _task_results(task: dict[str, Any], run: Any, reference: Any, seed: int) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """(summary metrics, record files) of one decode against full attention's."""
    from sim.closed_loop.agreement import agreement

    if task["task"] == "needle":
        return _needle_results(task, run, reference, seed)
    positions = task["prompt_len"] + np.arange(task["tokens"])
    if task["task"] == "perplexity":
        table = perplexity_records(run.nll, reference.nll, task["prompt_len"], task["bucket"])
        total = table.iloc[-1]
        metrics = {
            "mean_nll": float(total["mean_nll"]),
            "perplexity": float(total["perplexity"]),
            "mean_nll_full": float(total["mean_nll_full"]),
            "perplexity_full": float(total["perplexity_full"]),
            "ppl_ratio": float(total["ppl_ratio"]),
            # normalised to full attention as DynaKV's Fig. 10 normalises accuracy: 1 = full
            "quality": float(total["perplexity_full"] / total["perplexity"]),
        }
        tokens = pd.DataFrame({"position": positions, "token": run.tokens, "nll": run.nll,
                               "nll_full": reference.nll})
        return metrics, {CLOSED_LOOP_TABLE: table, CLOSED_LOOP_TOKENS: tokens}
    first, share = agreement(reference.tokens, run.tokens)
    metrics = {"first_divergence": first, "match_share": share}
    tokens = pd.DataFrame({"position": positions, "token": run.tokens,
                           "token_full": reference.tokens,
                           "match": run.tokens == reference.tokens})
    return metrics, {CLOSED_LOOP_TOKENS: tokens}


def _needle_results(task: dict[str, Any], run: Any, reference: Any, seed: int) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """The needle task's metrics: exact-match accuracy under the policy and under full
    attention on the same questions, and their ratio (the policy's accuracy normalised to full
    attention's, as DynaKV's Fig. 10 normalises accuracy; NaN if full attention answers
    none); its record: :func:`sim.closed_loop.needle.needle_table`."""
    from sim.closed_loop.needle import needle_table

    _model, tokenizer = load(task["model"])
    table = needle_table(needle_suite(task, seed), run, reference, tokenizer.decode)
    accuracy, full = run.accuracy, reference.accuracy
    metrics = {"context_len": task["context_len"], "needles": len(table),
               "accuracy": accuracy, "accuracy_full": full,
               "accuracy_ratio": accuracy / full if full else float("nan")}
    return metrics, {CLOSED_LOOP_TABLE: table}


def run_closed_loop_group(
    runs: list[RunPlan],
    trace_path: str,
    runs_dir: str,
    threads: int = 1,
    pass_cache: str | None = None,
    progress_file: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    verified: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run and write each of ``runs`` (closed-loop runs); the signature of
    :func:`sim.experiment.pass_group.run_group`, whose trace, pass cache and verification
    arguments a closed-loop run has no use for (``threads`` too: see :data:`THREADS`).
    Returns ``{"pass_s", "pass_cached", "sim_s", "rows"}`` (``pass_s``: the decodes' wall
    time)."""
    import torch

    from sim.experiment.group_progress import GroupProgress, ProgressFile
    from sim.policies import POLICIES

    sink = on_progress or (ProgressFile(progress_file) if progress_file else None)
    tracker = GroupProgress(sink)
    code = code_fingerprint()
    rows, decode_s = [], 0.0
    for run in runs:
        task = run.closed_loop
        model, _tokenizer = load(task["model"])
        # one intra-op thread whatever the worker count: torch's reductions differ in the last
        # bits with the thread count, and a run's numbers must not depend on -j (measured:
        # perplexity differed by ~1e-7 relative between one and two threads)
        torch.set_num_threads(THREADS)
        ids = text_ids(task)
        start = time.perf_counter()
        shared = _prefilled(model, task, ids, run.seed, tracker, run.label)
        reference = _reference(model, task, ids, run.seed, shared, tracker, run.label)
        policy = POLICIES.create(run.policy, where=f"run {run.label}")
        own_trace = _own_trace_path(task, runs_dir, run.run_id)
        tracker.start(run.label, "closed loop", steps(task, run.seed), "step")
        result = (_decode(model, task, ids, policy, run.seed, shared, tracker.advance)
                  if own_trace is None
                  else _saving_decode(model, task, ids, policy, run, own_trace,
                                      tracker.advance))
        wall_s = time.perf_counter() - start
        decode_s += wall_s
        metrics, records = (
            _generation_results(model, task, ids, run.seed, shared, result, reference)
            if task["task"] == "generation" else _task_results(task, result, reference, run.seed))

        key = (task["task"], task.get("tokens"), run.seed)
        if key in _REFERENCE_TRACES:  # both views: the policy open loop on the reference
            metrics.update(open_loop_recall(_REFERENCE_TRACES[key] / "trace", run.policy,
                                            run.seed, tracker, run.label))
        if own_trace is not None:
            records[CLOSED_LOOP_SELECTIONS] = selection_records(result.controller)
        row = {
            "run_id": run.run_id,
            "run": run.label,
            "trace": run.trace.name,
            "model": task["model"],
            "task": task["task"],
            **({"tokens": task["tokens"]} if "tokens" in task else {}),
            **metrics,
            "decode_s": round(result.decode_s, 3),
            "hook_s": round(result.hook_s, 3),
            **{key: summary_cell(value) for key, value in run.point.items()},
        }
        settings = {
            "experiment": run.experiment,
            "run": run.label,
            "run_id": run.run_id,
            "point": run.point,
            "closed_loop": task,
            "seed": run.seed,
            "policy": run.policy,
            "timing_s": {"run": round(wall_s, 3), "decode": round(result.decode_s, 3),
                         "hook": round(result.hook_s, 3)},
            "code": code,
        }
        inside = own_trace if task.get("save_trace") is True else None
        write_closed_loop_run(Path(runs_dir) / run.run_id, settings, row, records,
                              {CLOSED_LOOP_TRACE: inside} if inside else None)
        rows.append(row)
    return {"pass_s": decode_s, "pass_cached": False, "sim_s": [], "rows": rows}


def _own_trace_path(task: dict[str, Any], runs_dir: str, run_id: str) -> Path | None:
    """Where a run writes its own trace (``closed_loop.save_trace``): ``<dir>/<run_id>`` for a
    directory; for ``true`` a hidden temporary beside the runs, moved into the run directory
    with its other files (``None``: no trace)."""
    save = task.get("save_trace")
    if not save:
        return None
    if save is True:
        return Path(runs_dir) / f".{run_id}-{os.getpid()}.tmp-trace"
    return Path(save) / run_id
