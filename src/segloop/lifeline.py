"""Children that die with the process that runs the loop: a killed monitor (even `kill -9`)
leaves no DVC, training or Prefect server process behind.

Two mechanisms, both set up before anything can go wrong:
- `child()` starts each command the loop runs (git, dvc, and through `dvc repro` the
  training) in a process group of its own; whatever it starts stays in that group. The
  group is killed if the caller fails while it runs (Ctrl-C included: the group is not the
  terminal's, so it does not see the terminal's signals itself), and once it has exited
  (nothing it started outlives it).
- A guardian process per loop process (`guard()`), started once: a tiny Python (stdlib
  only, no segloop import) that learns of its parent's death at once (the pipe from its
  parent reaches EOF, the kernel's parent-death signal, or a new parent id) and then
  kills the groups of the children still running and every other child the parent had:
  Prefect's temporary API server is a plain child process that Prefect only stops from
  an `atexit` hook, which a killed process never runs.

Linux only (it reads /proc); elsewhere `guard()` does nothing and `child()` keeps only
the process group. Must not import anything of segloop (the guardian runs this file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

POLL_S = 0.5  # how often the guardian notes its parent's children (and checks the parent)
_lock = threading.Lock()
_guardian: dict[int, subprocess.Popen] = {}  # by the pid it guards (a forked child needs its own)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's: a child belongs to the thread that forked it)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(x) for x in fh.read().split()]
        except OSError:
            continue
    return out


def _tree(pid: int) -> list[int]:
    """`pid`'s descendants, children first found first."""
    found, todo = [], _children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += _children(p)
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


# ---------------------------------------------------------------- in the loop's process


def guard() -> None:
    """Start this process's guardian (once; Linux only). Safe to call from any thread."""
    if not sys.platform.startswith("linux"):
        return
    with _lock:
        if os.getpid() in _guardian and _guardian[os.getpid()].poll() is None:
            return
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            process_group=0,
        )
        _guardian[os.getpid()] = proc


def _tell(line: str) -> None:
    proc = _guardian.get(os.getpid())
    if proc is not None and proc.stdin is not None:
        try:
            os.write(proc.stdin.fileno(), f"{line}\n".encode())  # one short write: atomic on a pipe
        except OSError:
            pass


@contextmanager
def child(cmd: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """`subprocess.Popen(cmd, **popen)` in a process group of its own, known to the guardian.

    The caller waits for it inside the block. Leaving the block kills what is left of the
    group: everything, if the block raised (the caller gave up on it); stragglers the
    command left behind, if it exited."""
    guard()
    proc = subprocess.Popen(cmd, process_group=0, **popen)
    _tell(f"+{proc.pid} {_start_time(proc.pid) or '-'}")
    try:
        yield proc
    except BaseException:
        _killpg(proc.pid)
        proc.wait()
        raise
    finally:
        if proc.returncode is not None:  # reaped: its pid (the group's id) is not reused while the group lives
            _killpg(proc.pid)
        _tell(f"-{proc.pid}")


def run(cmd: list[str], **popen: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, ...)` through `child`.

    Output goes to files, not pipes: a straggler holding a pipe open would keep the
    caller waiting for its end after the command itself has exited."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with child(cmd, stdout=out, stderr=err, **popen) as proc:
            proc.wait()
        texts = []
        for fh in (out, err):
            fh.seek(0)
            texts.append(fh.read().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n"))  # as text=True
    return subprocess.CompletedProcess(cmd, proc.returncode, *texts)


# ---------------------------------------------------------------- the guardian process


class _ParentGone(Exception):
    pass


def _on_parent_death(signum: int, frame: Any) -> None:
    raise _ParentGone


def _watch(parent: int) -> None:
    """Until `parent` dies: note its children and the groups it registers; then kill them all."""
    import ctypes
    import select

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, _on_parent_death)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    me, parent_start = os.getpid(), _start_time(parent)
    groups: dict[int, str] = {}  # pgid -> start time of its leader
    known: dict[int, str] = {}  # the parent's other children, as last seen
    buffer = b""
    while os.getppid() == parent and _start_time(parent) == parent_start:
        try:
            ready, _, _ = select.select([0], [], [], POLL_S)
            if ready:
                data = os.read(0, 65536)
                if not data:
                    break  # the parent's end of the pipe closed: it exited or was killed
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    pgid_text, _, start = line.decode()[1:].partition(" ")
                    if line.startswith(b"+"):
                        groups[int(pgid_text)] = start
                    else:
                        groups.pop(int(pgid_text), None)
            known = {p: s for p in _children(parent) if p != me and (s := _start_time(p))}
        except _ParentGone:
            # The signal also comes when the *thread* that started this guardian ends
            # (e.g. a worker thread of Prefect's): the loop's condition tells which.
            continue
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for pgid, start in groups.items():
        if _start_time(pgid) in (None, start):  # the leader, or gone with its group maybe still there
            _killpg(pgid)
    for pid, start in known.items():
        if _start_time(pid) == start:
            victims = [pid, *_tree(pid)]  # found before any dies: an orphan's parent id changes
            for p in victims:
                _kill(p)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
