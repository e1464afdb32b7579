"""Installing a build folder: one atomic swap, the fallback's recovery, and only our own folders replaced."""
import json
import os
import subprocess
import sys

import pytest

from onex_export.errors import UsageError
from onex_export.export import install as inst
from onex_export.export import manifest as mf


def fake_build(folder, tag):
    """A folder that passes for a build of ours (only the manifest's schema is looked at), tagged."""
    folder.mkdir(parents=True)
    (folder / mf.FILENAME).write_text(json.dumps({"schema": mf.SCHEMA, "schema_version": mf.SCHEMA_VERSION, "tag": tag}))
    return folder


def tag(folder) -> str:
    return json.loads((folder / mf.FILENAME).read_text())["tag"]


def dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("exchange", [True, False])
def test_install_replaces_an_old_build_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    calls = []
    real = inst._exchange
    if exchange:  # the real renameat2 call, watched: it must have done the swap
        monkeypatch.setattr(inst, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    else:  # the path taken where renameat2(RENAME_EXCHANGE) is missing (a real branch, forced here)
        monkeypatch.setattr(inst, "_exchange", lambda a, b: False)
    dest = fake_build(tmp_path / "b", "old")
    tmp = fake_build(inst.temp_name(dest), "new")
    inst.install(tmp, dest)
    assert tag(dest) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert calls == ([True] if exchange else [])
    inst.install(fake_build(tmp_path / "t2", "first"), tmp_path / "fresh")  # no previous build: a plain rename
    assert tag(tmp_path / "fresh") == "first"


def test_recover_restores_a_build_whose_replacement_never_arrived(tmp_path):
    pid = dead_pid()
    older = fake_build(tmp_path / f".b.old-{pid}-00000001", "older")
    os.utime(older, (1, 1))
    fake_build(tmp_path / f".b.old-{pid}-ffffffff", "old")
    fake_build(tmp_path / f".b.tmp-{pid}-12345678", "half-done")
    done = inst.recover(tmp_path / "b")
    assert tag(tmp_path / "b") == "old"  # the newest, not the first by name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and len(done) == 3


def test_a_temp_folder_with_our_own_pid_is_a_killed_run_of_an_earlier_process(tmp_path):
    """Containers often give every run the same pid: a folder named with ours cannot be this run's yet."""
    fake_build(tmp_path / f".b.tmp-{os.getpid()}-0badf00d", "killed earlier, same pid")
    assert len(inst.recover(tmp_path / "b")) == 1 and list(tmp_path.iterdir()) == []


def test_a_failed_fallback_install_puts_the_previous_build_back(tmp_path, monkeypatch):
    monkeypatch.setattr(inst, "_exchange", lambda a, b: False)
    dest = fake_build(tmp_path / "b", "old")
    with pytest.raises(OSError):
        inst.install(tmp_path / "missing-tmp", dest)
    assert tag(dest) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_recover_keeps_what_a_live_build_is_writing(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_build(tmp_path / f".b.tmp-{live.pid}-abcdef01", "another build, in progress")
        fake_build(tmp_path / "b", "current")
        assert inst.recover(tmp_path / "b") == []
        assert (tmp_path / f".b.tmp-{live.pid}-abcdef01").is_dir()
    finally:
        live.kill()
        live.wait()


def test_only_empty_folders_and_our_builds_are_replaceable(tmp_path):
    inst.check_replaceable(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    inst.check_replaceable(tmp_path / "empty")
    inst.check_replaceable(fake_build(tmp_path / "ours", "x"))
    old_schema = tmp_path / "v1"
    old_schema.mkdir()
    (old_schema / "manifest.json").write_text('{"schema": "onex-export/build-manifest", "schema_version": 1}')
    inst.check_replaceable(old_schema)  # an older build of ours may be replaced
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("x")
    with pytest.raises(UsageError, match="holds no onex-export build"):
        inst.check_replaceable(tmp_path / "theirs")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        inst.check_replaceable(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path / "ours")
    with pytest.raises(UsageError, match="is not a folder"):
        inst.check_replaceable(tmp_path / "link")
