"""Processes forked from one interpreter that has imported torch once.

The bench's points and the study's memory probes and training runs each need a process of
their own: a peak of its own and allocations that die with it. A fresh interpreter spends
~2.5 s of a 2-core CPU importing torch and embseg before its first step. On CPU they are
therefore forked from a :class:`ForkServer` that did the imports once. A forked child is
still a process of its own. Its peak (VmHWM) starts at what the server held at the fork, a
Python + torch process like a fresh one. The server never runs torch work itself, so no
OpenMP thread pool exists to be broken by the fork. CUDA work is not forked (fork + CUDA is
untested here): run it in a fresh interpreter.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ChildResult:
    """How one forked job ended: its exit code (negative: killed by that signal) and what it
    printed."""

    returncode: int
    stdout: str
    stderr: str


class ForkServerExited(RuntimeError):
    """The server process ended while a job was being run."""


class ForkServer:
    """Runs jobs, each in a child forked from one server process.

    ``entry`` is ``"module:function"``; each child imports it and calls it with the job's
    text (one line, e.g. JSON). ``preload`` are the modules the server imports once, so that
    every child starts with them. ``env`` is added to the server's environment (and so to
    every child's): allocator variables such as ``MALLOC_ARENA_MAX`` are read when a process
    starts, and a child inherits the server's.
    """

    def __init__(self, entry: str, *, preload: Sequence[str] = ("torch",),
                 env: Mapping[str, str] | None = None) -> None:
        code = "import sys; from embseg.forkserver import _serve; _serve(sys.argv[1], sys.argv[2:])"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, entry, *preload], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})),
            start_new_session=True)

    def run(self, job: str, *, timeout: float | None = None) -> ChildResult:
        """Run one job in a forked child and wait for it (``subprocess.TimeoutExpired`` after
        ``timeout`` seconds, with the server and its child stopped)."""
        if "\n" in job:
            raise ValueError("a fork-server job is one line of text")
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(job + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise subprocess.TimeoutExpired(f"fork-server job {job[:200]}", timeout or 0)
        line = self._proc.stdout.readline()
        if not line:
            raise ForkServerExited(f"the fork server exited ({self._proc.wait()}) while "
                                   f"running {job[:200]}")
        answer = json.loads(line)
        return ChildResult(answer["returncode"], answer["stdout"], answer["stderr"])

    def close(self) -> None:
        """Stop the server and any child it is running."""
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(entry: str, preload: Sequence[str]) -> None:
    """The server process: one job per line in, one JSON answer per line out."""
    for name in preload:
        importlib.import_module(name)
    module_name, _, function_name = entry.partition(":")
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing else printed here can reach the answers
    for line in sys.stdin:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the job
                code = 1
                try:
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    function = getattr(importlib.import_module(module_name), function_name)
                    function(line.rstrip("\n"))
                    code = 0
                except BaseException:  # noqa: BLE001 - reported through stderr and the code
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            answers.write(json.dumps({
                "returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}) + "\n")
            answers.flush()
