"""Folders of reports (a probe's, a benchmark's): one writer at a time, and never a file the tool did not make.

``build`` already follows both rules for build folders (its manifest says the folder is ours; a lock beside it).
A report folder keeps a record of what the tool wrote into it, ``.onex-export-files.json`` (file name -> sha256):
a file already there is replaced only when the record lists it with the same sha256, so that a user's own
``probe.json``, or our ``quality.md`` edited since, is never overwritten. A benchmark's folder (``replace=False``)
is stricter: its results, committed to the repository with their record, are replaced only on request
(``--replace``), so that a run goes to a new folder by default. The lock is the build folder's
(:func:`~onex_export.locks.exclusive`): a second writer is refused at once, naming the first.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UsageError
from .fileio import atomic_path, check_destination, sha256_file
from .locks import exclusive

RECORD = ".onex-export-files.json"
LOCK = ".onex-export.lock"


def _record(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def not_ours(folder: Path, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that exist in ``folder`` and that the tool did not write there (or that changed since)."""
    folder, record = Path(folder), _record(Path(folder))
    return [name for name in names if (folder / name).exists()
            and not ((folder / name).is_file() and record.get(name) == sha256_file(folder / name))]


def _stamp(path: Path) -> tuple[str, int]:
    """(sha256, modification time): a file rewritten with the same bytes is still this run's."""
    return sha256_file(path), path.stat().st_mtime_ns


@contextlib.contextmanager
def report_folder(folder: str | Path, names: Iterable[str], option: str = "--out", replace: bool = True
                  ) -> Iterator[Path]:
    """Hold ``folder`` for writing the files ``names`` (those a run may write): refused (:class:`UsageError`) when
    one of them is there and not ours, or, without ``replace``, there at all (an earlier run's results); or
    (:class:`~onex_export.locks.BusyError`) when another process holds it.
    Afterwards (failed or not) the record lists what the block wrote; when the block finished, files of ``names``
    from an earlier run that it did not write again are removed. Enter it before the work, so that nothing is
    lost to a refusal at the end."""
    folder, names = Path(folder), list(names)
    for name in names:
        check_destination(folder / name)  # not a folder, FIFO or device; a folder we may write to
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(folder / LOCK, f"output folder {folder}", f"wait for it to finish, or choose another {option}"):
            foreign = not_ours(folder, names)
            if foreign:
                raise UsageError(f"{folder} holds {', '.join(foreign)}, which onex-export did not write there (or "
                                 "which changed since): refusing to replace", f"choose another {option}, or move "
                                 f"{'it' if len(foreign) == 1 else 'them'} away")
            earlier = [name for name in names if (folder / name).exists()]
            if earlier and not replace:
                raise UsageError(f"{folder} holds the results of an earlier run ({', '.join(earlier)}): refusing to "
                                 "replace them", f"choose a new folder with {option} NEW_FOLDER, or pass --replace to "
                                 "replace them")
            before = {name: _stamp(folder / name) for name in names if (folder / name).is_file()}
            finished = False
            try:
                yield folder
                finished = True
            finally:  # also after a failure: a figure written before it is ours, and may be replaced next time
                now = {name: _stamp(folder / name) for name in names if (folder / name).is_file()}
                written = {name: stamp[0] for name, stamp in now.items() if before.get(name) != stamp}
                # A finished run replaces the earlier one whole: its files this run did not write (ours: checked
                # above) would pass for this run's (bench.build --no-naive beside an earlier naive.log).
                stale = [name for name in before if finished and name in now and name not in written]
                for name in stale:
                    (folder / name).unlink()
                if written or stale:
                    record = {k: v for k, v in {**_record(folder), **written}.items() if k not in stale}
                    with atomic_path(folder / RECORD) as tmp:
                        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a run that wrote nothing leaves no folder behind
