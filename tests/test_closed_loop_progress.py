"""Progress inside a closed-loop run: the decode's ``on_step`` and the prefill's ``on_chunk``
callbacks change no number and are called once per token / per chunk (counts worked out by
hand from the lengths), and a ``kvsim run`` closed-loop group reports each phase's
intermediate counts through its progress file (:mod:`sim.experiment.group_progress`).

Tiny random models (tests/test_closed_loop.py), so these run in seconds.
"""

from __future__ import annotations

import time
import typing

import numpy as np
import pytest

from sim.policies import POLICIES

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sim.closed_loop.driver import decode, prefill  # noqa: E402  (after the importorskips)
from sim.closed_loop.generation import generate  # noqa: E402
from sim.closed_loop.needle import Needle, answer_needles, room, steps  # noqa: E402
from sim.closed_loop.perplexity import teacher_forced  # noqa: E402
from tests.test_closed_loop import _one_thread, text, tiny_llama  # noqa: E402,F401
from tests.test_closed_loop_run import tiny  # noqa: E402,F401  (the fixture)

DYNAKV = {"type": "dynakv", "budget": 0.15, "tokens_per_cluster": 8, "buffer_max": 2}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


class Counter:
    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, *args: int) -> None:
        self.calls.append(args)


@pytest.mark.parametrize("spec", [None, DYNAKV])
def test_a_step_callback_changes_nothing_and_is_called_once_per_token(llama, spec):
    ids = text(120)
    for teacher in (ids[80:100], None):  # teacher-forced, then greedy
        plain = decode(llama, ids[:80], 20, spec and POLICIES.create(spec), seed=2,
                       teacher=teacher, keep_logits=True, record=spec is not None)
        counter = Counter()
        counted = decode(llama, ids[:80], 20, spec and POLICIES.create(spec), seed=2,
                         teacher=teacher, keep_logits=True, record=spec is not None,
                         on_step=counter)
        np.testing.assert_array_equal(counted.logits, plain.logits)
        np.testing.assert_array_equal(counted.tokens, plain.tokens)
        np.testing.assert_array_equal(counted.nll, plain.nll)
        if spec is not None:
            assert len(counted.controller.selections) == len(plain.controller.selections) == 19
            for a, b in zip(counted.controller.selections, plain.controller.selections,
                            strict=True):
                for layer in a:
                    for x, y in zip(a[layer], b[layer], strict=True):
                        np.testing.assert_array_equal(x, y)
        assert counter.calls == [()] * 20  # the prefill's token, then 19 decode steps


def test_the_task_functions_pass_the_callback_on(llama):
    ids = text(120)
    shared = prefill(llama, ids[:80], 110)
    policy = POLICIES.create(DYNAKV)

    counter = Counter()
    run = teacher_forced(llama, ids, 80, 30, policy, seed=1, prefilled=shared, on_step=counter)
    assert len(counter.calls) == 30
    np.testing.assert_array_equal(
        run.nll, teacher_forced(llama, ids, 80, 30, POLICIES.create(DYNAKV), seed=1,
                                prefilled=shared).nll)

    counter = Counter()
    run = generate(llama, ids[:80], 12, policy, seed=1, recall_every=4, prefilled=shared,
                   on_step=counter)
    assert len(counter.calls) == 12
    np.testing.assert_array_equal(
        run.tokens, generate(llama, ids[:80], 12, POLICIES.create(DYNAKV), seed=1,
                             recall_every=4, prefilled=shared).tokens)

    # two needles: questions of 3 and 2 tokens, answers of 4 and 6: 7 + 8 = 15 tokens
    needles = [Needle((1,), (20, 21, 22), (1, 2, 3, 4)), Needle((2,), (30, 31), (1,) * 6)]
    assert steps(needles) == 15
    context = ids[:80]
    shared = prefill(llama, context, len(context) + room(needles))
    counter = Counter()
    answers = answer_needles(llama, context, needles, policy, prefilled=shared,
                             on_step=counter)
    assert len(counter.calls) == 15
    again = answer_needles(llama, context, needles, POLICIES.create(DYNAKV), prefilled=shared)
    for a, b in zip(answers.answers, again.answers, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_prefill_reports_each_chunk_s_positions(llama):
    counter = Counter()
    prefill(llama, text(80), 100, chunk=32, on_chunk=counter)
    assert counter.calls == [(32,), (32,), (16,)]  # 80 = 32 + 32 + 16
    counter = Counter()
    prefill(llama, text(80), 100, on_chunk=counter)
    assert counter.calls == [(80,)]  # at most PREFILL_CHUNK positions: one pass


PERPLEXITY = """\
name: cl
closed_loop: {task: perplexity, model: smollm2-135m, text: pydoc, prompt_len: 40,
              tokens: 12, bucket: 5}
policies:
  - {type: token_topk, budget: 8}
  - {type: streaming_llm, budget: 8, sink_tokens: 2}
"""

NEEDLE = """\
name: cl
closed_loop: {task: needle, context_len: 120, depths: [0.2, 0.8]}
policies:
  - {type: streaming_llm, budget: 16, sink_tokens: 2}
  - {type: token_topk, budget: 16}
"""


def _states(tmp_path, monkeypatch, experiment: str) -> tuple[list[dict], list]:
    """Every state a closed-loop group's progress file held, read back after each write
    (reports not rate-limited, the prefill in chunks of 16), and the runs."""
    from sim.closed_loop import driver
    from sim.experiment import group_progress
    from sim.experiment.closed_loop import run_closed_loop_group
    from sim.experiment.planning import plan

    monkeypatch.setattr(driver, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(group_progress.GroupProgress.__init__, "__defaults__",
                        (0.0, time.monotonic))
    seen: list[dict] = []

    class Reading(group_progress.ProgressFile):
        def __call__(self, state: dict[str, typing.Any]) -> None:
            super().__call__(state)
            read = group_progress.read_progress(self.path)
            assert read is not None
            seen.append(read)

    monkeypatch.setattr(group_progress, "ProgressFile", Reading)
    path = tmp_path / "exp.yaml"
    path.write_text(experiment)
    runs = plan(path, tmp_path / "out").runs
    (tmp_path / "runs").mkdir()
    run_closed_loop_group(runs, "", str(tmp_path / "runs"),
                          progress_file=str(tmp_path / "progress.json"))
    return seen, runs


def _phases(states: list[dict]) -> list[tuple[str, str, str, list[int]]]:
    """(run, phase, unit, the counts reported in order) per phase, in order."""
    phases: list[tuple[str, str, str, list[int]]] = []
    for state in states:
        key = (state["run"], state["phase"], state["unit"])
        if not phases or phases[-1][:3] != key or state["done"] == 0:
            phases.append((*key, []))
        phases[-1][3].append(state["done"])
        assert state["done"] <= state["total"]
    return phases


@pytest.mark.usefixtures("tiny")
def test_a_perplexity_group_reports_every_phase_s_counts(tmp_path, monkeypatch):
    states, runs = _states(tmp_path, monkeypatch, PERPLEXITY)
    first, second = (run.label for run in runs)
    steps = list(range(13))  # 12 tokens: 0, 1, ..., 12
    assert _phases(states) == [
        (first, "prefill", "position", [0, 16, 32, 40]),  # 40 positions in chunks of 16
        (first, "reference", "step", steps),
        (first, "closed loop", "step", steps),
        (first, "open-loop pass", "layer", [0, 1, 2, 3]),  # the tiny Llama's 3 layers
        # the second run reuses the prefill and the reference
        (second, "closed loop", "step", steps),
        (second, "open-loop pass", "layer", [0, 1, 2, 3]),
    ]


@pytest.mark.usefixtures("tiny")
def test_a_needle_group_reports_the_questions_steps(tmp_path, monkeypatch):
    from sim.experiment.closed_loop import needle_suite

    states, runs = _states(tmp_path, monkeypatch, NEEDLE)
    suite = needle_suite(runs[0].closed_loop, runs[0].seed)
    # one character a token: each question and its answer (a space and five digits)
    total = sum(len(f.question) + len(f.answer) for f in suite.facts)
    assert all(len(f.answer) == 6 for f in suite.facts)
    first, second = (run.label for run in runs)
    assert _phases(states) == [
        (first, "prefill", "position", [0, *range(16, 120, 16), 120]),
        (first, "reference", "step", list(range(total + 1))),
        (first, "closed loop", "step", list(range(total + 1))),
        (second, "closed loop", "step", list(range(total + 1))),
    ]
