"""segloop.lifeline: what the loop starts dies with it, even under `kill -9` (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from segloop import lifeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guardian reads /proc")
psutil = pytest.importorskip("psutil")


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still running (zombies count as gone) after up to `seconds`."""
    deadline = time.time() + seconds
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


# A loop process: a plain child (as Prefect's temporary server is), then a command through
# lifeline.child whose shell starts a background grandchild, then it is killed with -9.
# With FROM_THREAD, the guardian is started by a thread that ends at once (as Prefect's
# worker threads do): the kernel's parent-death signal then comes, yet the parent lives on.
KILLED = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    from segloop import lifeline
    server = subprocess.Popen(["sleep", "300"])
    if FROM_THREAD:
        t = threading.Thread(target=lambda: (lifeline.guard(), time.sleep(1)))  # ends after the guardian is set up
        t.start()
        t.join()
    else:
        lifeline.guard()
    time.sleep(2 * lifeline.POLL_S)  # the guardian has seen the server
    assert lifeline._guardian[os.getpid()].poll() is None, "the guardian left"
    with lifeline.child(["sh", "-c", "sleep 301 & sleep 302"]) as p:
        time.sleep(0.5)
        print(server.pid, p.pid, lifeline._guardian[os.getpid()].pid, *lifeline._tree(p.pid), flush=True)
        os.kill(os.getpid(), 9)
""")


@pytest.mark.parametrize("from_thread", [False, True])
def test_kill_9_of_a_loop_process_takes_its_children_and_their_children_with_it(from_thread):
    proc = subprocess.run(
        [sys.executable, "-c", f"FROM_THREAD = {from_thread}\n{KILLED}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(x) for x in proc.stdout.split()]
    assert len(pids) == 5  # server, sh, guardian, and sh's two sleeps
    assert _gone_within(pids, 5) == []


def test_a_command_given_up_on_is_killed_with_what_it_started():
    with pytest.raises(KeyboardInterrupt):
        with lifeline.child(["sh", "-c", "sleep 304 & sleep 305"]) as p:
            time.sleep(0.5)
            started = [p.pid, *lifeline._tree(p.pid)]
            raise KeyboardInterrupt  # Ctrl-C reaches only the loop (the group is not the terminal's)
    assert len(started) == 3 and _gone_within(started, 5) == []


def test_run_returns_the_command_result_and_leaves_no_straggler():
    start = time.time()
    r = lifeline.run(["sh", "-c", "echo out; echo err >&2; (sleep 306 &); exit 3"])
    assert time.time() - start < 30  # not held up by the straggler's copy of its output
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "306"]]
