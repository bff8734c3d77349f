"""Atomic writes: the destination is the old content or the new, never a half-written file."""

from __future__ import annotations

import pytest

from sim.atomic import TEMPORARY_GLOB, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".csv"
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert not list(tmp_path.glob(TEMPORARY_GLOB))


def test_a_directory_replaces_the_old_one_whole(tmp_path):
    run_dir = tmp_path / "runs" / "abc"
    for content in ("first", "second"):
        with atomic_write(run_dir) as tmp:
            tmp.mkdir()
            (tmp / content).write_text(content)
    assert [p.name for p in run_dir.iterdir()] == ["second"]
    with pytest.raises(ValueError), atomic_write(run_dir) as tmp:
        tmp.mkdir()
        (tmp / "third").write_text("third")
        raise ValueError("a run failed")
    assert [p.name for p in run_dir.iterdir()] == ["second"]
    assert not list(run_dir.parent.glob(TEMPORARY_GLOB))
