"""Progress bars: tqdm on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from sim.progress import LineProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_one_line_per_interval_and_a_closing_line():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(total=30, desc="dynakv: policy pass", unit="layer", stream=out,
                       interval_s=10, clock=clock)
    for _ in range(30):  # 30 updates, 2 s apart: 60 s in all
        clock.now += 2
        bar.update()
    bar.close()
    bar.close()  # a second close writes nothing
    lines = out.getvalue().splitlines()
    # a line at 10, 20, ..., 60 s (every 5th update), then the closing line
    assert len(lines) == 7
    assert lines[0] == "dynakv: policy pass: 5/30 layer (17%), 10 s elapsed, about 50 s left"
    assert lines[-1] == "dynakv: policy pass: 30/30 layer (100%), 60 s elapsed"
    assert "\r" not in out.getvalue()


def test_short_work_writes_nothing_to_a_log():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(total=1000, unit="step", stream=out, interval_s=30, clock=clock)
    for _ in range(1000):
        clock.now += 0.01  # 10 s in all, under the interval
        bar.update()
    bar.close()
    assert out.getvalue() == ""


def test_postfix_and_unknown_total():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(total=None, desc="capture", unit="token", stream=out, interval_s=5,
                       clock=clock)
    bar.set_postfix_str("decode")
    clock.now += 6
    bar.update(3)
    assert out.getvalue() == "capture: 3 token, 6 s elapsed [decode]\n"


def test_terminal_gets_tqdm_disabled_gets_silence():
    assert isinstance(progress(10, stream=FakeTerminal()), tqdm)
    assert isinstance(progress(10, stream=io.StringIO()), LineProgress)
    out = io.StringIO()
    bar = progress(10, stream=out, enabled=False)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s"):
        LineProgress(total=1, interval_s=0)
