"""Atomic writes: the result appears whole or not at all, with the permissions of a plain open / mkdir."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from minirec.io import atomic_dir, atomic_file, atomic_write_text


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_get_the_umask_permissions(tmp_path: Path) -> None:
    (tmp_path / "plain.md").write_text("x")  # what a plain open / mkdir gives under this process's umask
    (tmp_path / "plain").mkdir()
    atomic_write_text(tmp_path / "a" / "report.md", "hello")
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
    assert (tmp_path / "a" / "report.md").read_text() == "hello"
    assert mode(tmp_path / "a" / "report.md") == mode(tmp_path / "plain.md")  # not mkstemp's private 0o600
    assert mode(tmp_path / "adapter") == mode(tmp_path / "plain")  # not mkdtemp's private 0o700
    assert (tmp_path / "adapter" / "weights.bin").read_bytes() == b"x"


def test_a_failed_write_keeps_the_old_version_and_leaves_no_temp(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "table.csv", "old")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "v").write_text("old")
    for context, target in ((atomic_file, "table.csv"), (atomic_dir, "folder")):
        with pytest.raises(RuntimeError), context(tmp_path / target) as tmp:
            (tmp / "v").write_text("new") if tmp.is_dir() else tmp.write_text("new")
            raise RuntimeError("killed mid-write")
    assert (tmp_path / "table.csv").read_text() == "old" and (tmp_path / "folder" / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "table.csv"]
