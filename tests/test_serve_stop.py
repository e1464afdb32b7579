"""Stopping `onex-export serve`: SIGTERM drains and stops cleanly (every request answered or refused as
UNAVAILABLE, nothing in the log that says otherwise), a second SIGTERM stops at once, and a kill -9 of the server or
of its guardian leaves nothing running."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serving import Server, flooded, infer, tiny_build


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tiny_build(tmp_path_factory.mktemp("serve-stop") / "tiny")


def test_sigterm_lets_queued_requests_finish_then_exits_0(build_dir, tmp_path):
    """16 requests of 2 prompts are sent at once; SIGTERM comes while most still wait in Triton's queue (a batch
    takes about 0.1 s here). All 16 must succeed, some after the signal, and the server must exit 0."""
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        with flooded(server, 16, 2) as futures:
            signalled = time.monotonic()
            code = server.stop(signal.SIGTERM)
            stopped = time.monotonic()
            done = [f.result(timeout=60) for f in futures]  # the clients keep their connections open
        assert code == 0, server.output()[-3000:]
        assert all(image.shape == (2, 1, 128, 128, 3) for image, _ in done)
        assert sum(t > signalled for _, t in done) >= 1  # the drain was needed: work was left at the signal
        out = server.output()
        assert "stopping  finishing the requests in flight" in out and "PASSED serve: 32 image(s)" in out
        assert not [line for line in out.splitlines() if any(w in line for w in UNCLEAN)], out[-3000:]
        print(f"\nSIGTERM to exit 0: {stopped - signalled:.1f} s, {sum(t > signalled for _, t in done)} of 16 "
              "requests finished after the signal")
    finally:
        server.kill()


UNCLEAN = ("failed to stop server", "exited with failure", "leaked", "Traceback")


def test_a_stop_under_steady_load_answers_or_refuses_every_request_and_is_clean(build_dir, tmp_path):
    """16 gRPC clients send requests back to back; SIGTERM with a 0.5 s drain. Every request is answered or refused
    (none lost), the server exits 0, and its log has no failed stop, no leaked shared memory, no traceback. The
    refusals are UNAVAILABLE (ours after the drain, then Triton's "Server is stopping") except in Triton's last
    moment: between its unload of the model and the close of its endpoints (at most its 1 s poll), it answers
    NOT_FOUND, and nothing else comes after that in any client's sequence. (The HTTP clients of the test above
    stay connected through the stop: its clean log is the case of an idle keep-alive client.)"""
    server = Server(build_dir, tmp_path, "--drain-seconds", "0.5")
    try:
        server.wait_ready()
        signalled = threading.Event()

        def client_loop(k):
            client, seen = server.grpc_client(), []
            while True:
                try:
                    infer(client, ["a red cube"], [k])
                    seen.append("ok")
                except Exception as exc:  # tritonclient's, or the connection once the server is gone
                    status = exc.status() if hasattr(exc, "status") else type(exc).__name__
                    if signalled.is_set() and "connect" in str(exc).lower():
                        break  # the server has gone: nothing more to send to
                    seen.append(f"{status} {exc.message() if hasattr(exc, 'message') else exc}"[:120])
                if signalled.is_set() and len(seen) > 300:
                    break
            return [o if o == "ok" else o.split(" ", 1)[0] for o in seen]

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client_loop, k) for k in range(16)]
            time.sleep(1.0)
            signalled.set()
            code = server.stop(signal.SIGTERM)
            sequences = [f.result(timeout=120) for f in futures]
        counts = Counter(o for seq in sequences for o in seq)
        assert code == 0, server.output()[-3000:]
        assert set(counts) <= {"ok", "StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND"}, counts
        assert counts["ok"] >= 16 and counts["StatusCode.UNAVAILABLE"] >= 1  # the load outlasted the drain
        for seq in sequences:  # NOT_FOUND only at the very end, once the model is unloaded
            first = seq.index("StatusCode.NOT_FOUND") if "StatusCode.NOT_FOUND" in seq else len(seq)
            assert set(seq[first:]) <= {"StatusCode.NOT_FOUND"}, seq[first - 3:first + 3]
        out = server.output()
        assert not [line for line in out.splitlines() if any(w in line for w in UNCLEAN)], out[-3000:]
        assert "PASSED serve" in out and "successfully unloaded 'onex'" in out
        print(f"\nstop under load: {dict(counts)}")
    finally:
        server.kill()


def test_a_second_sigterm_during_the_drain_stops_at_once_with_143(build_dir, tmp_path):
    """32 requests of 4 rows keep the drain busy for seconds (a call takes about 0.15 s here); a second SIGTERM
    0.5 s into it must stop the server without waiting, and say so."""
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        with flooded(server, 32, 4) as futures:  # the requests cut off by the second signal fail: the point
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            start = time.monotonic()
            code = server.stop(signal.SIGTERM, timeout=60)
            seconds = time.monotonic() - start
        assert code == 143, server.output()[-3000:]
        assert sum(f.exception() is not None for f in futures) >= 1  # it did not wait for the queue to drain
        assert "interrupted (SIGTERM)" in server.output() and "PASSED serve" not in server.output()
        print(f"\nsecond SIGTERM to exit: {seconds:.1f} s")
    finally:
        server.kill()


def _server_pid(server) -> int:
    line = next(l for l in server.output().splitlines() if l.startswith("server    pid "))
    return int(line.split()[2])


def _group(pgid: int) -> list[str]:
    """Living processes of process group ``pgid`` (from /proc): what a server leaves behind."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = open(f"/proc/{entry}/stat").read()
                state, _, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
                if int(pgrp) == pgid and state != "Z":
                    found.append(stat[stat.index("(") + 1:stat.rindex(")")])
    return found


def _workspace(server) -> str:
    return next(l.split("|")[2].strip() for l in server.output().splitlines() if "model_repository_path[0]" in l)


def test_kill_9_of_the_server_with_requests_in_flight_leaves_nothing_running(build_dir, tmp_path):
    """What the OOM killer does. Before, Triton, its stub and two proxies kept running for 300 s and more and 18 of
    24 clients got no answer; now the guardian (the pid the user started) stops them, every client gets an answer
    or a closed connection, and the workspace is gone."""
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        pid = _server_pid(server)
        assert "tritonserver" in _group(pid)  # what there is to leave behind
        workspace = _workspace(server)
        assert os.path.basename(os.path.dirname(os.path.dirname(workspace))).startswith("onex-serve-")
        with flooded(server, 24, 2) as futures:
            os.kill(pid, signal.SIGKILL)
            code = server.process.wait(timeout=60)
            outcomes = [f.exception(timeout=60) for f in futures]  # none hangs
        assert code == 137, server.output()[-3000:]
        assert f"the server (pid {pid}) was killed by SIGKILL: stopped the" in server.output()
        assert _group(pid) == [] and not os.path.exists(os.path.dirname(os.path.dirname(workspace)))
        failed = [e for e in outcomes if e is not None]
        assert failed and all("connection" in str(e).lower() or "closed" in str(e).lower() for e in failed), failed
        print(f"\nkill -9 with 24 requests in flight: {len(outcomes) - len(failed)} answered, {len(failed)} saw the "
              "connection close")
    finally:
        server.kill()


def test_kill_9_of_the_guardian_drains_and_stops_the_server(build_dir, tmp_path):
    server = Server(build_dir, tmp_path)
    try:
        server.wait_ready()
        pid = _server_pid(server)
        with flooded(server, 8, 2) as futures:
            server.process.kill()  # the guardian, as `kill -9` of the command the user started
            done = [f.result(timeout=60) for f in futures]  # the server drains: every request is answered
        deadline = time.monotonic() + 60
        while _group(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group(pid) == [], server.output()[-3000:]
        assert len(done) == 8 and "PASSED serve: 16 image(s)" in server.output()
    finally:
        server.kill()


def test_a_start_removes_the_workspaces_of_servers_killed_before_they_could(tmp_path):
    from onex_export.supervisor import PREFIX, stale_workspaces

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{PREFIX}{finished.stdout.strip()}-abc"
    alive = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / "onex-serve-notes"  # not ours by its name: left alone
    for folder in (dead, alive, other):
        folder.mkdir()
    assert stale_workspaces(tmp_path) == [dead]
