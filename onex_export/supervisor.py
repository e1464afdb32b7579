"""`onex-export serve`'s guardian: the server runs in a child process, so that nothing it started outlives it.

A process killed with SIGKILL (``kill -9``, the OOM killer) runs no cleanup, and what it started lives on: Triton,
its Python stub and proxies kept serving (or holding clients without an answer) for 300 s and more, with files in
the temporary folder and segments in ``/dev/shm``. So the command forks before it loads anything:

- the **guardian** (the pid the user started) holds nothing but the child's pid. It is a child subreaper
  (``PR_SET_CHILD_SUBREAPER``): whatever the server started is re-parented to it, not to init, when the server
  dies. It forwards SIGINT and SIGTERM to the server (a first one drains, a second stops at once, as before) and
  waits. When the server is gone, however it went, it stops what is left of the server's process group and of its
  own children (SIGTERM, then SIGKILL after a grace period: Python's resource tracker unlinks the shared memory
  it tracks when it is let go), removes the server's workspace, and exits with the server's code (128 + the
  signal that killed it).
- the **server** runs in a process group of its own (a terminal's Ctrl-C reaches the guardian, which forwards
  it once), and dies with SIGTERM, that is drains and stops, if the guardian is killed (``PR_SET_PDEATHSIG``).

Each server's workspace is ``<tmp>/onex-serve-<guardian pid>-*``; a start removes those whose guardian is gone
(a ``kill -9`` of both processes at once).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
PREFIX = "onex-serve-"
GRACE_SECONDS = 5.0


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_workspaces(root: Path | None = None) -> list[Path]:
    """Workspaces of servers whose guardian is gone (both killed at once): ours by name, safe to remove."""
    root = Path(root or tempfile.gettempdir())
    stale = []
    for path in root.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            stale.append(path)
    return stale


def _leftovers(guardian: int, group: int) -> list[int]:
    """Living processes (from /proc) that are the guardian's children (adopted when the server died) or in the
    server's process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != guardian:
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
                if state != "Z" and (int(ppid) == guardian or int(pgrp) == group):
                    found.append(int(entry.name))
    return found


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _stop_leftovers(server: int) -> int:
    """Stop what is left of the server's process group and the guardian's adopted children (SIGTERM, then SIGKILL
    after the grace period); returns how many there were."""
    guardian = os.getpid()
    left = _leftovers(guardian, server)
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, 2.0)):
        for pid in _leftovers(guardian, server):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap()
            if not _leftovers(guardian, server):
                return len(left)
            time.sleep(0.1)
    return len(left)


def supervise(log: Callable[[str], None]) -> Path | None:
    """Fork the server. Returns in the server process, with the workspace it is to use; the guardian never
    returns (it exits with the server's code). Without Linux's prctl (another OS) nothing is forked, the command
    runs as one process, and None is returned (PyTriton's own workspace)."""
    if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        return None
    for stale in stale_workspaces():
        shutil.rmtree(stale, ignore_errors=True)
        log(f"removed   {stale}, the workspace of a server killed before it could clean up")
    workspace = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    sys.stdout.flush()
    sys.stderr.flush()
    guardian = os.getpid()
    server = os.fork()
    if server == 0:
        os.setpgid(0, 0)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != guardian:  # the guardian died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
        return workspace
    log(f"server    pid {server} (this process, {guardian}, stops what it leaves if it is killed)")
    _guard(server, workspace)


def _guard(server: int, workspace: Path) -> None:
    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.waitpid(server, 0)
        except InterruptedError:
            continue
        if pid == server:
            break
    code = os.waitstatus_to_exitcode(status)
    killed = code < 0
    left = _stop_leftovers(server)
    shutil.rmtree(workspace, ignore_errors=True)
    if killed:
        print(f"error: the server (pid {server}) was killed by {signal.Signals(-code).name}: stopped the {left} "
              f"process(es) it had left (Triton, its stub and proxies) and removed its workspace {workspace}",
              file=sys.stderr)
        print("FAILED", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 - code if killed else code)
