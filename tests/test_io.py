"""Atomic output: whole or nothing, and an ordinary file mode (not mkstemp's private 0600)."""
import os
import stat

import pytest

from graphopt.io import atomic_dir, atomic_path, atomic_write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_gets_the_umask_mode_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_dir_is_an_ordinary_folder(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~_umask()


def test_recent_records_keep_the_last_calls_and_count_them_all():
    from graphopt.records import RecentRecords

    records = RecentRecords(maxlen=3)
    for step in range(5):
        records.append(step)
    assert list(records) == [2, 3, 4] and records.total == 5
    records.clear()
    assert not records and records.total == 0
    import copy

    records.append("a")
    twin = copy.deepcopy(records)
    assert list(twin) == ["a"] and twin.total == 1 and twin.maxlen == 3
    assert records[-1] == "a" and records[:5] == ["a"]
