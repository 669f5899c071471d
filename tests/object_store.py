"""Real servers on 127.0.0.1 for the tests of URL sources: an S3-compatible store and HTTP.

``s3_server`` (session): moto's S3 in server mode (``ThreadedMotoServer``) on a free port of
127.0.0.1. While the session runs, this process's environment points every S3 client at it
(``AWS_ENDPOINT_URL``, fake ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, region), and so
does fsspec's own configuration for ``s3`` (``fsspec.config.conf``), so that plain
``fsspec.open("s3://bucket/key")`` or ``embseg ... --shards s3://bucket/prefix`` reach it;
processes started later (subprocesses, DataLoader workers, Ray workers started in the test)
inherit the environment. ``S3Server.env`` and ``S3Server.storage_options`` give the same
settings explicitly (for a subprocess's ``env=``, a Ray ``runtime_env`` or an fsspec call).
Everything is restored and the server stopped at the end of the session.

``s3_bucket`` (function): a new, empty bucket on that server; its ``url`` is ``s3://<name>``.

``http_server`` (session): ``http.server`` in a thread serving a folder on 127.0.0.1 (GET and
HEAD, single byte ranges as object stores and web servers serve them). It records the requests
it got and can be told to misbehave for one file: drop the connection after ``n`` bytes of
the body (the headers promise the whole file), or answer with an HTTP error status (404 ...).
A missing file is a plain 404.

``served`` (function): a fresh sub-folder of that server's root for one test, with its base
``url`` and the fault switches; faults are cleared when the test ends.

Imported by tests/conftest.py, like the Prefect fixtures.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

S3_KEY, S3_SECRET, S3_REGION = "embseg-test-key", "embseg-test-secret", "us-east-1"


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


def _fsspec_s3_config(options: dict | None) -> dict | None:
    """Set (or, with None, remove) fsspec's configured defaults for ``s3``; the old value."""
    import fsspec.config

    old = fsspec.config.conf.get("s3")
    if options is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = dict(options)
    return old


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (free port); the process environment points at it."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    moto = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    server = S3Server(endpoint_url=f"http://{host}:{port}")
    saved_env = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    saved_conf = _fsspec_s3_config(server.storage_options)
    try:
        yield server
    finally:
        _fsspec_s3_config(saved_conf)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        moto.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A new, empty bucket on the session's S3 server."""
    return S3Bucket(s3_server, s3_server.new_bucket())


# --------------------------------------------------------------------------------------------
# HTTP


@dataclass
class _Fault:
    drop_after: int | None = None  # close the connection after this many bytes of the file
    status: int | None = None  # answer with this HTTP status instead of the file


class FileServer:
    """A threaded HTTP server of the files under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.faults: dict[str, _Fault] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="test-http-server")
        self._thread.start()

    def url_of(self, path: Path | str) -> str:
        """The URL of a file or folder under ``root``."""
        relative = Path(path).resolve().relative_to(self.root).as_posix()
        return f"{self.url}/{urllib.parse.quote(relative)}" if relative != "." else self.url

    def drop_after(self, path: Path | str, nbytes: int) -> None:
        """Serve ``path`` with its full Content-Length, but close the connection after
        ``nbytes`` bytes of it (a server or network that fails mid-transfer)."""
        self._set(path, _Fault(drop_after=nbytes))

    def fail(self, path: Path | str, status: int = 404) -> None:
        """Answer requests for ``path`` with HTTP ``status`` (even when the file exists)."""
        self._set(path, _Fault(status=status))

    def clear_faults(self, under: Path | None = None) -> None:
        """Serve normally again (everything, or the files under ``under``)."""
        with self._lock:
            if under is None:
                self.faults.clear()
                return
            prefix = self._relative(under)
            for name in [n for n in self.faults if n == prefix or n.startswith(prefix + "/")]:
                del self.faults[name]

    def requested(self, path: Path | str) -> list[tuple[str, str | None]]:
        """(method, Range) of every request this server got for ``path``."""
        wanted = "/" + self._relative(path)
        with self._lock:
            return [(method, rng) for method, got, rng in self.requests if got == wanted]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def _relative(self, path: Path | str) -> str:
        path = Path(path)
        if not path.is_absolute():
            path = self.root / path
        return path.resolve().relative_to(self.root).as_posix()

    def _set(self, path: Path | str, fault: _Fault) -> None:
        with self._lock:
            self.faults[self._relative(path)] = fault

    def _lookup(self, url_path: str) -> tuple[str, Path | None, _Fault | None]:
        relative = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path).lstrip("/")
        local = (self.root / relative).resolve()
        inside = local == self.root or self.root in local.parents
        with self._lock:
            fault = self.faults.get(relative)
        return relative, local if inside else None, fault


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(send_body=True)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet test logs
        pass

    def _serve(self, *, send_body: bool) -> None:
        server: FileServer = self.server.owner  # type: ignore[attr-defined]
        relative, local, fault = server._lookup(self.path)
        with server._lock:
            server.requests.append((self.command, "/" + relative, self.headers.get("Range")))
        if fault is not None and fault.status is not None:
            self.send_error(fault.status)
            return
        if local is None or not local.is_file():
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
        if fault is not None and fault.drop_after is not None:
            self.wfile.write(data[start:max(start, min(end, fault.drop_after))])
            self.wfile.flush()
            self.close_connection = True  # the socket closes short of Content-Length
            return
        self.wfile.write(data[start:end])


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
