"""The atomic writer replaces regular files only (issue 14, case 6: `generate --out /dev/null` as root
replaced the device node with a PNG; a FIFO likewise). Real FIFOs, folders and symlinks here; /dev/null
itself is only tried read-only, since replacing it is the very harm being tested."""
import os

import pytest
import torch

from onex_export.errors import UsageError
from onex_export.fileio import atomic_path, save_png


def test_a_regular_file_is_replaced_and_no_temp_is_left(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_non_regular_destination_is_refused_and_kept(tmp_path, kind):
    target = tmp_path / "out.png"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    with pytest.raises(UsageError, match="exists and is not a regular file") as exc:
        save_png(torch.zeros(3, 4, 4), target)
    assert exc.value.exit_code == 2
    assert (target.is_fifo() if kind == "fifo" else target.is_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp left behind


def test_a_device_node_is_refused():
    with pytest.raises(UsageError, match="/dev/null exists and is not a regular file"):
        save_png(torch.zeros(3, 4, 4), "/dev/null")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(real)
    save_png(torch.ones(3, 4, 4), link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
