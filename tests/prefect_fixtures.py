"""Session fixtures of the flow tests: one real Prefect server, and a deployed process worker.

``prefect_server`` starts ``prefect server start --host 127.0.0.1 --port <free port>`` with its
own PREFECT_HOME (tmp dir, analytics off), points this pytest process at it (so flows run
in-process are tracked there) and gives subprocesses the environment to do the same.
``prefect_worker`` creates the ``embseg-process`` work pool, runs
``prefect --no-prompt deploy --all`` from the repository root (prefect.yaml) and starts a worker.
Everything started is stopped at the end of the session by terminating its process group.

Imported by tests/conftest.py so that every test module shares the same server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_BIN = Path(sys.executable).with_name("prefect")
WORK_POOL = "embseg-process"
SERVER_START_TIMEOUT_S = 90


@dataclass
class PrefectServer:
    """A running Prefect server: its API URL and the environment for processes that use it."""

    api_url: str
    home: Path
    env: dict[str, str]
    log_path: Path

    def cli(self, *args: str, timeout: float = 120, check: bool = True,
            cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
        """Run ``prefect <args>`` against this server (from the repository root by default)."""
        env = dict(self.env, PWD=str(cwd))
        result = subprocess.run([str(PREFECT_BIN), *args], cwd=cwd, env=env, text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(args: list[str], *, env: dict[str, str], log_path: Path,
                  cwd: Path = REPO_ROOT) -> subprocess.Popen:
    """Start ``args`` in its own process group (so it can be stopped with all its children)."""
    log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_process_group(proc: subprocess.Popen, *, first_signal: int = signal.SIGTERM,
                       grace_s: float = 15.0) -> None:
    """Signal the process group of ``proc``, then kill it if it has not exited in time."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, first_signal)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    try:  # children that outlived the leader (flow-run processes, Ray workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_health(api_url: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Poll ``/health`` until the server answers; fail with its log if it dies or hangs."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT_S}s:\n"
                       f"{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server on 127.0.0.1, used by this process and by the subprocesses."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    root = tmp_path_factory.mktemp("prefect")
    home = root / "home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
    })
    log_path = root / "server.log"
    proc = start_process([str(PREFECT_BIN), "server", "start", "--host", "127.0.0.1",
                          "--port", str(port)], env=env, log_path=log_path)
    try:
        wait_for_health(api_url, proc, log_path)
        with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_HOME: home}):
            yield PrefectServer(api_url=api_url, home=home, env=env, log_path=log_path)
            # Send the flow-run logs still queued while the server is up: queued for a
            # stopped server, they make the interpreter's exit retry for over a minute.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
    finally:
        stop_process_group(proc)


@dataclass
class PrefectWorker:
    """The deployed repository and the worker that runs its flow runs."""

    server: PrefectServer
    log_path: Path


@pytest.fixture(scope="session")
def prefect_worker(prefect_server: PrefectServer) -> Iterator[PrefectWorker]:
    """The work pool, every deployment of prefect.yaml, and a process worker polling the pool."""
    prefect_server.cli("work-pool", "create", "--type", "process", WORK_POOL)
    prefect_server.cli("--no-prompt", "deploy", "--all", timeout=300)
    log_path = prefect_server.home.parent / "worker.log"
    env = dict(prefect_server.env, PREFECT_WORKER_QUERY_SECONDS="2")
    proc = start_process([str(PREFECT_BIN), "worker", "start", "--pool", WORK_POOL, "--limit", "1"],
                         env=env, log_path=log_path)
    try:
        yield PrefectWorker(server=prefect_server, log_path=log_path)
    finally:
        # SIGINT: the worker's own shutdown path, which also stops its flow-run processes.
        stop_process_group(proc, first_signal=signal.SIGINT)


def run_artifacts(flow_run_id) -> dict[str, str]:
    """Markdown of every keyed artifact of a flow run and of its subflow runs (key -> data).

    Reads them through the Prefect client from the server the current settings point at.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        run_ids = [flow_run_id]
        frontier = [flow_run_id]
        while frontier:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [run.id for run in children if run.id not in run_ids]
            run_ids += frontier
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)))
    return {artifact.key: str(artifact.data) for artifact in artifacts if artifact.key}
