"""The io_uring issuer (sim/calibrate/uring.py): it issues exactly the commands it is given
(checked by what lands in the file and what comes back), honours release times, and
``kvsim replay --issuer io_uring`` replays a hand-built schedule with the recorded byte counts.
Skipped where the liburing binding or io_uring is unavailable, or O_DIRECT is refused."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

from sim.calibrate.storage import ALIGN, DirectFile
from sim.calibrate.uring import UringIssuer, choose_issuer, uring_available
from sim.errors import StorageError

pytestmark = pytest.mark.skipif(uring_available() is not None,
                                reason=f"io_uring unusable here: {uring_available()}")


@pytest.fixture
def direct_file(tmp_path: Path):
    try:
        file = DirectFile(tmp_path, 64 * ALIGN)
    except StorageError as exc:
        pytest.skip(f"O_DIRECT unusable on the test directory: {exc}")
    with file:
        yield file


def _blocks(path: Path) -> np.ndarray:
    """The file's 4 KiB blocks as uint64 words, read through the page cache (coherent with
    O_DIRECT writes once they have completed)."""
    data = Path(path).read_bytes()
    return np.frombuffer(data, dtype=np.uint64).reshape(-1, ALIGN // 8)


def test_writes_land_exactly_where_they_were_sent(direct_file: DirectFile) -> None:
    commands = [(True, 5 * ALIGN, ALIGN), (True, 9 * ALIGN, 3 * ALIGN), (True, 40 * ALIGN, ALIGN)]
    before = _blocks(direct_file.path).copy()
    with UringIssuer(direct_file.fd, 2, 4 * ALIGN) as issuer:
        result = issuer.run(iter(commands), timeline=True)
    assert result.commands == 3 and result.bytes == 5 * ALIGN
    assert result.timeline_us is not None and result.timeline_us.shape == (3, 2)
    assert (result.timeline_us[:, 1] >= result.timeline_us[:, 0]).all()
    after = _blocks(direct_file.path)
    written = {5, 9, 10, 11, 40}
    changed = {int(b) for b in np.nonzero((after != before).any(axis=1))[0]}
    assert changed == written
    # each command's first word: its stamp << 20 | the block's index within the command
    stamps = {int(after[5, 0]) >> 20, int(after[9, 0]) >> 20, int(after[40, 0]) >> 20}
    assert len(stamps) == 3
    assert [int(after[b, 0]) & 0xFFFFF for b in (9, 10, 11)] == [0, 1, 2]


def test_reads_move_the_bytes_asked_for_and_a_short_read_fails(direct_file: DirectFile) -> None:
    with UringIssuer(direct_file.fd, 4, 8 * ALIGN) as issuer:
        sizes = [ALIGN, 2 * ALIGN, 8 * ALIGN, ALIGN]
        offsets = [0, 10 * ALIGN, 20 * ALIGN, 63 * ALIGN]
        result = issuer.run(iter([(False, o, s) for o, s in zip(offsets, sizes, strict=True)]))
        assert result.commands == 4 and result.bytes == sum(sizes)
        # past the end of the file: a read returns fewer bytes than asked
        with pytest.raises(OSError, match="short I/O"):
            issuer.run(iter([(False, 63 * ALIGN, 2 * ALIGN)]))


def test_release_times_hold_commands_back(direct_file: DirectFile) -> None:
    releases = [0.0, 0.0, 0.004, 0.004, 0.010]
    with UringIssuer(direct_file.fd, 8, ALIGN) as issuer:
        result = issuer.run(iter([(False, i * ALIGN, ALIGN) for i in range(5)]),
                            timeline=True, releases_s=releases)
    assert result.timeline_us is not None
    issued_us = result.timeline_us[:, 0]
    assert (issued_us >= np.array(releases) * 1e6).all()


def test_queue_depth_bounds_commands_in_flight(direct_file: DirectFile) -> None:
    with UringIssuer(direct_file.fd, 2, ALIGN) as issuer:
        result = issuer.run(iter([(False, i * ALIGN, ALIGN) for i in range(30)]),
                            queue_depth=2, timeline=True)
    assert result.timeline_us is not None
    issued, completed = result.timeline_us[:, 0], result.timeline_us[:, 1]
    for t in issued:  # at any issue, at most 2 commands issued and not yet completed
        assert int(((issued <= t) & (completed > t)).sum()) <= 2


def test_choose_issuer() -> None:
    assert choose_issuer("threads", "replay") == "threads"
    assert choose_issuer("auto", "replay") == "io_uring"
    assert choose_issuer("io_uring", "replay") == "io_uring"
    with pytest.raises(StorageError, match="--issuer"):
        choose_issuer("aio", "replay")


def test_no_io_uring_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    uring = importlib.import_module("sim.calibrate.uring")
    monkeypatch.setattr(uring, "uring_available", lambda: "io_uring is refused here")
    assert uring.choose_issuer("auto", "replay") == "threads"
    with pytest.raises(StorageError, match="replay --issuer io_uring: io_uring is refused"):
        uring.choose_issuer("io_uring", "replay")


def test_fd_is_left_open(direct_file: DirectFile) -> None:
    with UringIssuer(direct_file.fd, 1, ALIGN) as issuer:
        issuer.run(iter([(False, 0, ALIGN)]))
    os.fstat(direct_file.fd)  # the issuer closes its ring, never the caller's descriptor
