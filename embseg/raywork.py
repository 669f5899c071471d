"""Running embseg's plain per-item functions as Ray tasks (the only module that imports Ray).

:func:`ray_runtime` gives a Ray to work on: an already-initialised one is reused (and left
running; ``workers`` and ``ray_address`` are then ignored), an existing cluster is joined with
``ray_address``, otherwise a new local Ray is started with ``workers`` CPUs and the dashboard
off (``RAY_ADDRESS`` and clusters from ``ray start`` are not picked up implicitly). Only a Ray
started here is shut down here.
:func:`map_unordered` runs a module-level function over many argument tuples, a bounded number
in flight, yielding results as they complete.

A local Ray is started by the driver process, and its head processes (GCS, raylet) die with the
driver, but Ray's agent processes do not: after a SIGKILL of the driver they linger for a minute
or more. So on Linux a small reaper process (``python -m embseg.raywork --reap``) is started
first; it holds the read end of a pipe whose write end only the driver holds, notes every
process that Ray starts under the driver, and when the pipe closes (normal end or the driver's
death, however it died) it terminates whatever of those is still alive.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from embseg.errors import EmbsegError

REAPER_POLL_SECONDS = 0.25
REAPER_GRACE_SECONDS = 3.0
TASK_MAX_RETRIES = 2
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class RayRuntime:
    """The Ray that work runs on: how many CPUs and nodes it offers and whether we started
    it."""

    cpus: int
    started_here: bool
    address: str | None
    nodes: int = 1


@contextmanager
def ray_runtime(*, workers: int | None = None,
                ray_address: str | None = None) -> Iterator[RayRuntime]:
    """A usable Ray for the ``with`` block (see the module docstring for which one)."""
    import ray

    if ray.is_initialized():
        yield RayRuntime(cpus=_cluster_cpus(ray), started_here=False, address=None,
                         nodes=_alive_nodes(ray))
        return
    if workers is not None and workers < 1:
        raise EmbsegError(f"--workers must be at least 1 (got {workers})")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    reaper = _Reaper.start() if ray_address is None and _has_proc() else None
    try:
        _init_ray(ray, workers=workers, ray_address=ray_address)
        if reaper is not None:
            reaper.set_roots(_ray_children(reaper))
        try:
            cpus = _cluster_cpus(ray) if ray_address else workers or os.cpu_count() or 1
            yield RayRuntime(cpus=cpus, started_here=True, address=ray_address,
                             nodes=_alive_nodes(ray))
        finally:
            ray.shutdown()
    finally:
        if reaper is not None:
            reaper.finish()


def _init_ray(ray: Any, *, workers: int | None, ray_address: str | None) -> None:
    """``ray.init`` for a new local Ray (dashboard off) or for joining ``ray_address``."""
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if ray_address is None:
        # "local": always a new Ray of our own, never one that RAY_ADDRESS or a `ray start`
        # on this machine happens to point at.
        ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, **common)
        return
    _check_reachable(ray_address)
    try:
        ray.init(address=ray_address, **common)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise EmbsegError(f"cannot connect to the Ray cluster at {ray_address!r}: "
                          f"{message}") from None


def _check_reachable(address: str) -> None:
    """Fail fast on a ``host:port`` nobody listens on (``ray.init`` would retry for minutes)."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # "auto", "local", ...: Ray resolves these itself, quickly
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EmbsegError(f"cannot reach the Ray cluster at {address!r}: {reason}") from None


def _cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _alive_nodes(ray: Any) -> int:
    """Nodes of the connected Ray that are alive (1 for a local Ray)."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def map_unordered(
    func: Callable[..., Any],
    jobs: Iterable[tuple[Hashable, tuple]],
    *,
    max_in_flight: int,
    kwargs: dict | None = None,
    return_exceptions: bool = False,
) -> Iterator[tuple[Hashable, Any]]:
    """Run ``func(*args, **kwargs)`` as a Ray task per ``(key, args)``; yield ``(key, result)``.

    ``func`` must be a module-level function (workers import it by name and run plain embseg
    code). Jobs are submitted in order, at most ``max_in_flight`` at a time, so the results
    held by the caller stay bounded; results come back in completion order. Needs an
    initialised Ray (see :func:`ray_runtime`). A task whose worker dies is retried; if it
    still fails, its Ray error is raised, or yielded as the result with ``return_exceptions``.
    """
    import ray

    remote = ray.remote(num_cpus=1, max_retries=TASK_MAX_RETRIES)(func)
    shared = kwargs or {}
    pending: dict[Any, Hashable] = {}
    job_iter = iter(jobs)
    exhausted = False
    while True:
        while not exhausted and len(pending) < max(1, max_in_flight):
            try:
                key, args = next(job_iter)
            except StopIteration:
                exhausted = True
                break
            pending[remote.remote(*args, **shared)] = key
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            key = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if not return_exceptions:
                    raise
                result = exc
            yield key, result


def task_exception(error: BaseException) -> BaseException | None:
    """The exception that a task's own code raised (from an error :func:`map_unordered`
    yielded), or None when the task died with its worker (crash, memory, lost node)."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):
        return error.cause if isinstance(error.cause, BaseException) else error
    return None


def _import_modules(modules: tuple[str, ...], hold_seconds: float) -> int:
    """Warm-up task body: import ``modules`` in this worker, then hold the CPU slot briefly."""
    import importlib

    for name in modules:
        importlib.import_module(name)
    time.sleep(hold_seconds)
    return os.getpid()


def warm_up(cpus: int, modules: tuple[str, ...]) -> int:
    """Start ``cpus`` workers and import ``modules`` in each; returns how many workers answered.

    Worker start-up and imports (numpy, PIL, pycocotools, ...) take about a second per worker:
    doing it before the timed work keeps throughput figures about the work itself. Each task
    holds its slot a moment, so that the tasks land on distinct workers.
    """
    import ray

    remote = ray.remote(num_cpus=1)(_import_modules)
    return len(set(ray.get([remote.remote(modules, 0.2) for _ in range(max(1, cpus))])))


# --------------------------------------------------------------------------- the reaper


def _has_proc() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir("/proc/self")


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process, from /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        try:
            table[int(entry)] = (int(fields[1]), int(fields[19]))
        except (IndexError, ValueError):
            continue
    return table


def _descendants(table: dict[int, tuple[int, int]], roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _ray_children(reaper: _Reaper) -> list[int]:
    """Children of this process that appeared since the reaper started: Ray's processes."""
    table = _proc_table()
    me = os.getpid()
    return [pid for pid, (ppid, _) in table.items()
            if ppid == me and pid != reaper.pid and pid not in reaper.children_before]


class _Reaper:
    """Driver side of the reaper: start it, tell it Ray's process roots, let it finish."""

    def __init__(self, process: subprocess.Popen, write_fd: int, children_before: set[int]):
        self.process = process
        self.pid = process.pid
        self.write_fd = write_fd
        self.children_before = children_before

    @classmethod
    def start(cls) -> _Reaper:
        table = _proc_table()
        me = os.getpid()
        children_before = {pid for pid, (ppid, _) in table.items() if ppid == me}
        read_fd, write_fd = os.pipe()  # both non-inheritable: Ray's processes never hold them
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "embseg.raywork", "--reap", str(me)],
                stdin=read_fd, stdout=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            os.close(read_fd)
        return cls(process, write_fd, children_before)

    def set_roots(self, roots: list[int]) -> None:
        os.write(self.write_fd, ("roots " + " ".join(map(str, roots)) + "\n").encode())

    def finish(self) -> None:
        """Close the pipe (the reaper then ends leftovers) and wait for the reaper to exit."""
        os.close(self.write_fd)
        try:
            self.process.wait(timeout=REAPER_GRACE_SECONDS + 5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _terminate(tracked: dict[int, int]) -> None:
    """SIGTERM the tracked processes that still run (same start time), SIGKILL stragglers."""
    def alive() -> list[int]:
        table = _proc_table()
        return [pid for pid, start in tracked.items() if table.get(pid, (0, -1))[1] == start]

    for sig, wait in ((signal.SIGTERM, REAPER_GRACE_SECONDS), (signal.SIGKILL, 1.0)):
        targets = alive()
        if not targets:
            return
        for pid in targets:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and alive():
            time.sleep(0.05)


def reap(parent: int) -> None:
    """The reaper's loop (runs in its own process, see the module docstring).

    Until the driver names Ray's root processes it tracks every new descendant of ``parent``
    (so a driver killed during ``ray.init`` is covered too); afterwards only the roots and
    their descendants. On end of input it terminates what it tracked.
    """
    me = os.getpid()
    table = _proc_table()
    before = _descendants(table, [parent]) | {me}
    roots: list[int] | None = None
    tracked: dict[int, int] = {}
    buffer = b""
    while True:
        readable, _, _ = select.select([0], [], [], REAPER_POLL_SECONDS)
        table = _proc_table()
        if roots is None:
            current = _descendants(table, [parent]) - before
        else:
            current = set(roots) | _descendants(table, roots)
        for pid in current - {me}:
            if pid in table:
                tracked.setdefault(pid, table[pid][1])
        if not readable:
            continue
        data = os.read(0, 4096)
        if not data:
            break
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            words = line.decode().split()
            if words and words[0] == "roots":
                roots = [int(w) for w in words[1:]]
                tracked = {pid: start for pid, start in tracked.items()
                           if pid in set(roots) | _descendants(table, roots)}
    _terminate(tracked)


def _reaper_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--reap":
        print("usage: python -m embseg.raywork --reap PARENT_PID", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C of the driver must not stop cleanup
    reap(int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(_reaper_main(sys.argv[1:]))
