"""A policy inside the real model (issue 9): the hook's cost per decode step and the
long-text perplexity it leads to; with ``--task needle``, the needle suite's wall time and
accuracy per policy and budget.

One process loads the model once, tokenises a held text (``--text``, a kvsim text source) and
runs teacher-forced decoding over ``--prompt-len`` prompt tokens and ``--tokens`` continuation
tokens (:func:`sim.closed_loop.perplexity.teacher_forced`):

* ``plain``: the model's own sdpa attention, no hook (the reference step time and NLL);
* each policy of ``--policies`` at each budget of ``--budgets`` (a fraction of the context),
  its other parameters at their defaults unless ``--param`` sets them, every global layer
  attending only its selection plus the current token. Note the cluster policies' defaults
  force 16 sinks and 32 recent tokens: a budget below 48 tokens (5% of 768) holds only sinks
  and the newest tokens.

Printed per run: ms per decode step, the ratio to the plain step (the issue's goal: within
1.5x for the cluster policies), the share of the step spent inside the policy (select and
append, measured in the hook), and the mean NLL / perplexity of the continuation overall and
per bucket of ``--bucket`` positions, with the perplexity ratio to full attention.

``--task needle`` builds the needle task's context exactly as ``kvsim run`` does
(:func:`sim.experiment.closed_loop.needle_suite`: ``--context-len`` tokens of the text, one fact
per ``--depths`` entry, drawn from ``--seed``), prefills it once (timed), answers every question
under full attention (the reference) and then under each policy and budget from that prefill.
Printed per run: the suite's wall time (every question: the cache copied, the policy
prefilled from the context's keys, the question fed, the answer decoded), the decode steps'
time, the share inside the policy, and the accuracy against full attention's; and the
process's peak RSS (Linux ``VmHWM``) while loading the model, during the prefill (the peak reset
before it) and after it, to the end. The prefill runs
in passes of ``--prefill-chunk`` positions (default: the closed loop's,
:data:`sim.closed_loop.driver.PREFILL_CHUNK`; 0: the whole context in one pass, as before
chunking).

    python benchmarks/bench_closed_loop.py                    # SmolLM2, 512 + 256, 5/10/20 %
    python benchmarks/bench_closed_loop.py --prompt-len 128 --tokens 32 --budgets 0.1  # smoke
    python benchmarks/bench_closed_loop.py --task needle --context-len 2048 --threads 1
    python benchmarks/bench_closed_loop.py --task needle --model gemma3-270m \
        --context-len 32768 --threads 1 --policies token_topk --budgets 0.1

Timings depend on the machine's load: run alone for figures (the ratio still needs a quiet
machine: the policy's Python and the model's kernels compete differently for a busy core).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_POLICIES = ("token_topk", "static_clusters", "clusterkv", "dynakv", "streaming_llm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("perplexity", "needle"), default="perplexity")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="pydoc")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    parser.add_argument("--bucket", type=int, default=64)
    parser.add_argument("--context-len", type=int, default=2048, help="needle: context tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                        help="needle: one fact per depth")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="needle: positions per prefill pass (0: one pass)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a policy parameter (YAML value) for every policy that has it, "
                             "e.g. --param sink_tokens=4 --param recent_tokens=8")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: kvsim's capture setting)")
    args = parser.parse_args(argv)
    if args.prefill_chunk is not None and args.prefill_chunk < 0:
        parser.error(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")

    import numpy as np
    import yaml

    from sim.closed_loop.perplexity import describe, perplexity_table, teacher_forced
    from sim.policies import POLICIES
    from sim.trace.capture import _tokenize_prefix
    from sim.trace.models import import_capture_deps, load_model
    from sim.trace.sources import load_text

    overrides = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--param takes NAME=VALUE, got {item!r}")
        overrides[name] = yaml.safe_load(value)
    torch, _ = import_capture_deps()
    loaded = load_model(args.model, progress=True)
    if args.threads:  # after loading: kvsim's loader sets one thread per core
        torch.set_num_threads(args.threads)
    model = loaded.model
    model.set_attn_implementation("sdpa")

    def policy_for(name: str, budget: float):
        known = POLICIES.parameters(name)
        extra = {k: v for k, v in overrides.items() if k in known}
        return POLICIES.create({"type": name, "budget": budget, **extra})

    if args.task == "needle":
        return _needle(args, model, policy_for)
    total = args.prompt_len + args.tokens
    ids, _ = _tokenize_prefix(loaded.tokenizer, load_text(args.text), total)
    print(f"{args.model}, text {args.text}: prompt {args.prompt_len} + {args.tokens} "
          f"teacher-forced tokens, torch threads {torch.get_num_threads()}, seed {args.seed}")

    def step_ms(run) -> float:
        return 1e3 * run.decode_s / max(1, args.tokens - 1)

    started = time.perf_counter()
    plain = teacher_forced(model, ids, args.prompt_len, args.tokens, None, hook=False)
    plain_ms = step_ms(plain)
    base = perplexity_table(plain.nll, args.prompt_len, args.bucket)
    buckets = base["bucket"].tolist()
    header = ["run", "ms/step", "x plain", "in policy %", "mean NLL", "ppl", "ppl ratio",
              *(f"ratio {b}" for b in buckets[:-1])]
    rows = [["plain (full attention, no hook)", f"{plain_ms:.1f}", "1.00", "-",
             f"{base['mean_nll'].iloc[-1]:.4f}", f"{base['perplexity'].iloc[-1]:.3f}", "1.000",
             *("1.000" for _ in buckets[:-1])]]
    hooked = teacher_forced(model, ids, args.prompt_len, args.tokens, None)
    rows.append(["hook, no policy", f"{step_ms(hooked):.1f}",
                 f"{step_ms(hooked) / plain_ms:.2f}", "-",
                 f"{hooked.nll.mean():.4f}", f"{np.exp(hooked.nll.mean()):.3f}",
                 f"{np.exp(hooked.nll.mean() - plain.nll.mean()):.3f}",
                 *("" for _ in buckets[:-1])])
    for name in args.policies:
        for budget in args.budgets:
            policy = policy_for(name, budget)
            run = teacher_forced(model, ids, args.prompt_len, args.tokens, policy,
                                 seed=args.seed)
            table = perplexity_table(run.nll, args.prompt_len, args.bucket)
            ratio = np.exp(table["mean_nll"] - base["mean_nll"])
            rows.append([describe(policy), f"{step_ms(run):.1f}",
                         f"{step_ms(run) / plain_ms:.2f}",
                         f"{100 * run.hook_s / run.decode_s:.0f}",
                         f"{table['mean_nll'].iloc[-1]:.4f}",
                         f"{table['perplexity'].iloc[-1]:.3f}", f"{ratio.iloc[-1]:.3f}",
                         *(f"{r:.3f}" for r in ratio.iloc[:-1])])
            print(f"  {rows[-1][0]}: {rows[-1][1]} ms/step, ppl {rows[-1][5]}", flush=True)
    print()
    _table(header, rows, started)
    return 0


def _table(header: list[str], rows: list[list[str]], started: float) -> None:
    """The runs as a markdown table, and the wall time since ``started``."""
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nwall time {time.perf_counter() - started:.0f} s (after loading the model)")


def _needle(args: argparse.Namespace, model: Any, policy_for: Callable[[str, float], Any]
            ) -> int:
    """The needle suite per policy and budget (see the module docstring)."""
    import torch

    from sim.closed_loop.driver import PREFILL_CHUNK, prefill
    from sim.closed_loop.needle import answer_needles
    from sim.closed_loop.perplexity import describe
    from sim.experiment.closed_loop import needle_suite

    task = {"task": "needle", "model": args.model, "text": args.text,
            "context_len": args.context_len, "depths": list(args.depths)}
    suite = needle_suite(task, args.seed)
    chunk = (len(suite.context) if args.prefill_chunk == 0 else args.prefill_chunk
             or PREFILL_CHUNK)
    print(f"{args.model}, text {args.text}: needle context {args.context_len} tokens, "
          f"{len(suite.needles)} facts at token positions {list(suite.starts)}, torch threads "
          f"{torch.get_num_threads()}, seed {args.seed}, prefill in passes of {chunk} "
          f"positions; peak RSS loading the model {_peak_rss_gib(reset=True):.2f} GiB",
          flush=True)
    started = time.perf_counter()
    shared = prefill(model, suite.context, suite.capacity, chunk=chunk)
    prefill_s = time.perf_counter() - started
    print(f"prefill {prefill_s:.1f} s, peak RSS {_peak_rss_gib(reset=True):.2f} GiB",
          flush=True)
    rows = []
    for name, budget in [(None, None)] + [(n, b) for n in args.policies for b in args.budgets]:
        policy = None if name is None else policy_for(name, budget)
        start = time.perf_counter()
        run = answer_needles(model, suite.context, suite.needles, policy, args.seed,
                             prefilled=shared)
        wall = time.perf_counter() - start
        if policy is None:
            full = run.accuracy
        rows.append(["full attention (reference)" if policy is None else describe(policy),
                     f"{wall:.1f}", f"{run.decode_s:.1f}",
                     "-" if policy is None else f"{100 * run.hook_s / run.decode_s:.0f}",
                     f"{run.accuracy:.2f}", f"{run.accuracy / full:.2f}" if full else "-"])
        print(f"  {rows[-1][0]}: {rows[-1][1]} s, accuracy {rows[-1][4]}", flush=True)
    header = ["run", "suite wall s", "decode s", "in policy %", "accuracy", "x full"]
    print(f"\nprefill of the context (once, for every run): {prefill_s:.1f} s\n")
    _table(header, rows, started)
    print(f"peak RSS {_peak_rss_gib():.2f} GiB")
    return 0


def _peak_rss_gib(reset: bool = False) -> float:
    """The process's peak resident set since the last reset (Linux: ``VmHWM`` of
    /proc/self/status; ``reset``: then start a new peak, writing 5 to /proc/self/clear_refs).
    NaN where there is no /proc."""
    try:
        status = Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmHWM:"))
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration, ValueError):
        return float("nan")
    return peak / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
