"""``kvsim``: run experiments, capture traces, inspect traces, calibrate a device, replay a
run's flash I/O on real storage, redraw plots, list components.

User errors (any :class:`sim.errors.KvsimError`) and file-system refusals (an ``OSError``: a
full disk, a read-only directory) print one line and exit with code 2; Ctrl-C exits with 130,
SIGTERM with 143, both after stopping the workers and discarding partial results.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from sim import __version__
from sim.atomic import os_error_text
from sim.errors import KvsimError, Terminated

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Parser(argparse.ArgumentParser):
    # argparse prints usage + message; keep it to one line
    def error(self, message: str) -> NoReturn:
        raise KvsimError(message)


def _cmd_run(args: argparse.Namespace) -> int:
    from sim.experiment.planning import plan
    from sim.experiment.runner import execute
    from sim.metrics.records import format_table

    if args.jobs is not None and args.jobs < 1:
        raise KvsimError(f"--jobs must be >= 1, got {args.jobs}")
    if args.output and len(args.config) > 1:
        raise KvsimError("--output takes one experiment; each of several uses its own")
    # every experiment and every point of its sweep is validated before any work starts
    plans = [plan(path, output=args.output) for path in args.config]
    for planned in plans:
        summary, _report = execute(
            planned,
            jobs=args.jobs,
            scheduler=args.scheduler,
            force=args.force,
            progress=not args.quiet,
        )
        print(format_table(summary, planned.axes))
        print(f"\nresults: {planned.output_dir}/summary.csv")
        if not args.no_plot:
            from sim.figures.plots import plot_results

            paths = plot_results(planned.output_dir)
            if paths:
                print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from sim.paths import trace_cache_dir
    from sim.trace.capture import CaptureSettings, capture, get_or_capture

    try:
        settings = CaptureSettings(
            model=args.model,
            text=args.text,
            prompt_len=args.prompt_len,
            decode_steps=args.decode_steps,
            queries=args.queries,
            seed=args.seed,
            mode=args.mode,
            sampling=args.sampling,
            temperature=args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            prefill_chunk=args.prefill_chunk,
        )
    except (TypeError, ValueError) as exc:
        raise KvsimError(f"capture: {exc}") from None
    if args.out:
        path = capture(settings, Path(args.out), progress=True)
    else:
        path = get_or_capture(settings, trace_cache_dir(), progress=True)
    print(path)
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from sim.trace.format import open_trace
    from sim.trace.verified import verify_once

    trace = open_trace(args.path)
    if args.action == "verify":
        verify_once(trace, again=True)  # and remember the verdict: runs need not verify again
    model = trace.model
    print(
        f"{trace.path}: {model.name} ({model.n_layers} layers, {model.n_q_heads} query heads, "
        f"{model.n_kv_heads} KV heads, head_dim {model.head_dim}); {trace.prompt_len} prompt + "
        f"{trace.decode_steps} decode positions; {trace.size_bytes / 2**20:.1f} MiB"
        + ("; checksums OK, values finite" if args.action == "verify" else "")
    )
    decode_line = _describe_decode(trace.manifest.get("capture", {}))
    if decode_line:
        print(decode_line)
    return 0


def _describe_decode(capture: dict) -> str:
    """One line on how the decode steps' tokens were chosen and whether they degenerated
    (manifests from before the sampling settings say greedy and carry no statistic)."""
    decode = capture.get("decode") or {}
    if not decode:
        return ""
    sampling = decode.get("sampling") or {}
    method = sampling.get("method", "greedy" if decode.get("greedy") else "unknown")
    if method == "sample":
        how = (
            f"sampled (temperature {sampling.get('temperature')}, top_p {sampling.get('top_p')}, "
            f"seed {sampling.get('seed')})"
        )
    elif method == "teacher_forced":
        how = "teacher-forced (the text's tokens)"
    else:
        how = method
    penalty = sampling.get("repetition_penalty", 1.0)
    if penalty not in (None, 1.0) and method != "teacher_forced":
        how += f", repetition_penalty {penalty}"
    line = f"  decode: mode {capture.get('mode', 'generate')}, {how}"
    stats = decode.get("degeneration")
    if stats:
        share = stats.get("distinct_4gram_share")
        line += (
            f"; distinct 4-grams {'n/a' if share is None else f'{100 * share:.1f}%'}"
            f", longest repeated span {stats.get('longest_repeated_span')} tokens"
        )
        if share is not None and share < 0.5:
            line += " (the decode looped: most 4-grams repeat)"
    rate = capture.get("decode_tokens_per_s")
    if rate:
        line += f"; {rate:.1f} tok/s"
    return line


def _cmd_plot(args: argparse.Namespace) -> int:
    from sim.figures.plots import plot_results

    for path in plot_results(Path(args.results)):
        print(path)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from sim.calibrate import DEFAULT_SIZE_BYTES, calibrate
    from sim.config import parse_size_bytes

    try:
        size = DEFAULT_SIZE_BYTES if args.size is None else parse_size_bytes(args.size)
    except ValueError as exc:
        raise KvsimError(f"calibrate --size: {exc}") from None
    result = calibrate(
        Path(args.path), Path(args.out), seconds=args.seconds, size_bytes=size,
        measurer=args.measurer, model=args.model, show_progress=not args.quiet,
    )
    print(result.report)
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from sim.io_replay import load_schedule, replay_run
    from sim.progress import progress

    run_dir = Path(args.run_dir)
    schedule = load_schedule(run_dir)  # a bad run directory stops before the bar
    bar = progress(len(schedule.steps), desc="replay", unit="step", enabled=not args.quiet)
    try:
        result = replay_run(
            run_dir, Path(args.path), out=Path(args.out) if args.out else None,
            on_step=bar.update, schedule=schedule,
        )
    finally:
        bar.close()
    print(result.report)
    return 0


def _cmd_list(_args: argparse.Namespace) -> int:
    from sim.config import model_names
    from sim.hardware import preset_names
    from sim.kv.layouts import LAYOUTS
    from sim.kv.replacement import REPLACEMENTS
    from sim.policies import POLICIES
    from sim.trace.models import MODELS
    from sim.trace.sources import list_sources

    # two model namespaces: the sizes a run simulates, and the real models traces come from
    rows = [
        ("policies", ", ".join(POLICIES.names())),
        ("layouts", ", ".join(LAYOUTS.names())),
        ("replacement", ", ".join(REPLACEMENTS.names())),
        ("devices", ", ".join(preset_names()) + "  (or a preset file: kvsim calibrate)"),
        ("simulated models", ", ".join(model_names()) + "  (model: in an experiment)"),
        ("capturable models", ", ".join(MODELS)
         + "  (kvsim capture --model, trace.capture.model)"),
        ("texts", ", ".join(list_sources()) + ", file:PATH"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    for label, names in rows:
        print(f"{label + ':':<{width}}{names}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvsim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvsim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run", help="run an experiment YAML (and its sweep); print and save its results"
    )
    run.add_argument("config", nargs="+", help="experiment YAML(s) (see experiments/)")
    run.add_argument("--output", help="results directory (default: the config's, or results/NAME)")
    run.add_argument("--no-plot", action="store_true", help="skip the plots")
    run.add_argument(
        "--jobs", "-j", type=int, help="local worker processes (default: one per core)"
    )
    run.add_argument(
        "--scheduler", help="Dask scheduler address (tcp://host:port): run on that cluster"
    )
    run.add_argument(
        "--force", action="store_true", help="rerun runs whose results are already complete"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    cap = sub.add_parser("capture", help="capture a trace from a real model (capture extra)")
    cap.add_argument("--model", default="smollm2-135m",
                     help="a capturable model (kvsim list): smollm2-135m | gemma3-270m")
    cap.add_argument("--text", default="pydoc", help="built-in text name or file:PATH")
    cap.add_argument("--prompt-len", type=int, default=2048)
    cap.add_argument("--decode-steps", type=int, default=128)
    cap.add_argument(
        "--queries",
        choices=["all", "decode"],
        default="all",
        help="store queries of every position or of decode steps only",
    )
    cap.add_argument("--seed", type=int, default=0, help="seeds the sampling (sample)")
    cap.add_argument(
        "--mode",
        choices=["generate", "teacher_forced"],
        default="generate",
        help="generate: the model chooses the decode tokens; teacher_forced: read "
        "prompt_len + decode_steps tokens of the text in chunked prefill passes (fast)",
    )
    cap.add_argument("--sampling", choices=["greedy", "sample"], default="greedy")
    cap.add_argument("--temperature", type=float, default=1.0, help="> 0 (sample only)")
    cap.add_argument("--top-p", type=float, default=1.0, help="in (0, 1] (sample only)")
    cap.add_argument("--repetition-penalty", type=float, default=1.0, help=">= 1")
    cap.add_argument(
        "--prefill-chunk",
        type=int,
        help="positions per prefill pass (default: the whole prompt; 512 for teacher_forced)",
    )
    cap.add_argument("--out", help="write here instead of the trace cache")
    cap.set_defaults(func=_cmd_capture)

    tr = sub.add_parser("trace", help="describe or verify a trace directory")
    tr.add_argument("action", choices=["info", "verify"])
    tr.add_argument("path")
    tr.set_defaults(func=_cmd_trace)

    cal = sub.add_parser(
        "calibrate",
        help="measure the storage under a directory and this CPU; write a device preset",
    )
    cal.add_argument("--path", required=True,
                     help="a directory on the storage to measure (a file is made and removed)")
    cal.add_argument("--out", required=True, help="the device preset to write (a .yaml)")
    cal.add_argument("--seconds", type=float, default=180.0,
                     help="time budget of the whole measurement (default 180, at least 5)")
    cal.add_argument("--size", help="measurement file size, e.g. 8GiB (the default)")
    cal.add_argument("--measurer", default="auto", choices=["auto", "builtin", "fio", "both"],
                     help="storage measurer: fio when installed (auto), the built-in one, or "
                     "both, alternating, compared in the report")
    cal.add_argument("--model", default="llama-3.2-1b",
                     help="simulated model whose kernel sizes the CPU is timed at")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.set_defaults(func=_cmd_calibrate)

    rep = sub.add_parser(
        "replay",
        help="execute a run's recorded flash schedule on real storage; measured vs simulated",
    )
    rep.add_argument("run_dir", help="a run directory (results/NAME/runs/RUN_ID) that recorded "
                     "its flash schedule (record_io: in the experiment)")
    rep.add_argument("--path", required=True,
                     help="a directory on the storage to replay on (a file is made and removed)")
    rep.add_argument("--out", help="write the tables and figure here (default: the run "
                     "directory)")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.set_defaults(func=_cmd_replay)

    plot = sub.add_parser("plot", help="redraw the plots of a results directory")
    plot.add_argument("results")
    plot.set_defaults(func=_cmd_plot)

    lst = sub.add_parser("list", help="list policies, layouts, devices, models and texts")
    lst.set_defaults(func=_cmd_list)
    return parser


def _terminate(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup finish
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code: 0, 2 (one-line error), 130 (Ctrl-C) or 143
    (SIGTERM). A bug escapes as a traceback (Python's exit code 1)."""
    handles_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_sigterm else None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KvsimError as exc:
        print(f"kvsim: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        # the file system refused (full, read-only, a name too long, ...): the user's to fix,
        # in one line; KVSIM_DEBUG=1 keeps the traceback
        if os.environ.get("KVSIM_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kvsim: error: {where}{os_error_text(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print("kvsim: terminated; completed runs are saved, partial ones discarded",
              file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(
            "kvsim: interrupted; completed runs are saved, partial ones discarded", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    finally:
        if handles_sigterm and previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
