"""Report folders (issue 24, case 4): `probe --out DIR` and `bench.quality --out DIR` never replace a file they did not
write, and two writers into one folder at once are refused. Real probes of the embedded tiny model."""
import json

import pytest
from click.testing import CliRunner

from bench.quality.__main__ import main as quality_main
from onex_export.cli import main
from onex_export.errors import UsageError
from onex_export.locks import BusyError, exclusive
from onex_export.outputs import LOCK, RECORD, not_ours, report_folder

PROBE = ["probe", "--model", "tiny-sd3", "--max-prompts", "1", "--lengths", "8", "--nfe", "1.667"]


def test_a_probe_replaces_its_own_files_but_never_a_users(tmp_path):
    out = tmp_path / "probe"
    first = CliRunner().invoke(main, [*PROBE, "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert sorted(json.loads((out / RECORD).read_text())) == ["blocks.png", "heatmap.png", "probe.json"]
    assert not (out / LOCK).exists()  # released
    again = CliRunner().invoke(main, [*PROBE, "--out", str(out)])  # ours, unchanged: replaced
    assert again.exit_code == 0, again.output
    (out / "probe.json").write_text('{"mine": "edited by hand"}\n')  # now the user's
    refused = CliRunner().invoke(main, [*PROBE, "--out", str(out)])
    assert refused.exit_code == 2, refused.output
    assert "holds probe.json, which onex-export did not write there (or which changed since)" in refused.output
    assert "choose another --out" in refused.output
    assert (out / "probe.json").read_text() == '{"mine": "edited by hand"}\n'


def test_a_users_own_file_is_refused_before_the_work_and_a_new_folder_left_by_a_refusal_is_removed(tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "probe.json").write_text("my notes\n")
    refused = CliRunner().invoke(main, [*PROBE, "--out", str(own)])
    assert refused.exit_code == 2 and "holds probe.json, which onex-export did not write" in refused.output
    assert "reuse error" not in refused.output  # nothing was measured
    assert sorted(p.name for p in own.iterdir()) == ["probe.json"] and (own / "probe.json").read_text() == "my notes\n"
    with pytest.raises(RuntimeError):
        with report_folder(tmp_path / "new", ["a.json"]):
            raise RuntimeError("the run failed before writing anything")
    assert not (tmp_path / "new").exists()


def test_two_writers_into_one_folder_the_second_is_refused_at_once(tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    with exclusive(out / LOCK, "a probe in progress", "wait"):  # another process's probe, as the kernel sees it
        busy = CliRunner().invoke(main, [*PROBE, "--out", str(out)])
    assert busy.exit_code == 1 and "is being written by another onex-export process" in busy.output, busy.output
    assert not (out / "probe.json").exists()


def test_the_record_is_per_file_and_by_content(tmp_path):
    folder = tmp_path / "r"
    with report_folder(folder, ["a.md", "b.md"]):
        (folder / "a.md").write_text("ours\n")
    assert not_ours(folder, ["a.md", "b.md"]) == []
    (folder / "b.md").write_text("a user's\n")
    (folder / "a.md").write_text("ours, edited\n")
    assert not_ours(folder, ["a.md", "b.md"]) == ["a.md", "b.md"]
    with pytest.raises(UsageError, match="holds a.md, b.md"):
        with report_folder(folder, ["a.md", "b.md"]):
            pytest.fail("entered a folder holding a user's files")
    with pytest.raises(BusyError):
        with report_folder(folder, ["c.md"]), report_folder(folder, ["d.md"]):
            pass


def test_a_finished_run_replaces_the_earlier_one_whole_and_a_failed_one_keeps_it(tmp_path):
    """bench.build --no-naive --replace once left the earlier run's naive.log beside its own results, recorded as
    ours. A run that finishes removes the earlier run's files it did not write again (a file rewritten with the
    same bytes is kept); a run that fails removes nothing; a file of another name is never touched."""
    import json
    import os

    folder = tmp_path / "r"
    names = ["build.md", "naive.log", "same.md"]
    with report_folder(folder, names):
        for name in names:
            (folder / name).write_text(f"first run: {name}\n")
    (folder / "notes.txt").write_text("a user's\n")
    os.utime(folder / "same.md", ns=(10**18, 10**18))  # runs are seconds apart, not within the clock's tick
    with pytest.raises(RuntimeError):
        with report_folder(folder, names):
            (folder / "build.md").write_text("second run, failed half way\n")
            raise RuntimeError("failed")
    assert (folder / "naive.log").read_text() == "first run: naive.log\n"  # a failed run keeps the earlier files
    with report_folder(folder, names):
        (folder / "build.md").write_text("third run\n")
        (folder / "same.md").write_text("first run: same.md\n")  # the same bytes, written again
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["build.md", "notes.txt", "same.md"]
    assert sorted(json.loads((folder / ".onex-export-files.json").read_text())) == ["build.md", "same.md"]
    assert not_ours(folder, names) == []


def test_bench_quality_refuses_a_users_own_report_before_any_model_loads(tmp_path):
    out = tmp_path / "quality"
    out.mkdir()
    (out / "quality.md").write_text("my table\n")
    with pytest.raises(UsageError, match="holds quality.md, which onex-export did not write there"):
        quality_main(["--model", "tiny-sd3", "--random-metrics", "--max-prompts", "1", "--seeds", "2",
                      "--teacher-steps", "2", "--out", str(out)])  # the CLI's run_main reports it with exit 2
    assert (out / "quality.md").read_text() == "my table\n" and sorted(p.name for p in out.iterdir()) == ["quality.md"]
