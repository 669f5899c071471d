"""Reading one shard with WebDataset: raw samples, then a :class:`BadItem` for what went wrong.

A shard is opened by WebDataset's URL opener (``webdataset.gopen``: local files, ``pipe:``
commands, ``http(s)://`` through ``curl``), except ``s3://``, ``gs://`` and the other
object-store protocols, which are opened through fsspec (s3fs, gcsfs) rather than
WebDataset's command-line defaults (``gsutil``; none for s3). Its members are grouped into
samples by WebDataset's ``group_by_keys`` (key = the name up to the first dot of its last path
part, part = the rest, lower-cased; consecutive members of one key form one sample; a part
twice in one sample is an error), with WebDataset's metadata members (``__*__``) skipped.

The members come from Python's ``tarfile`` in stream mode, as in WebDataset's own
``tar_file_iterator``, with one difference: a damaged header after the first member (bad
checksum, a header cut short) is an error here, while ``tarfile`` ends the archive there
without a word, which would silently drop the rest of the shard.

Every problem ends the shard with one :class:`BadItem` naming the shard and a key: the
manifest's first missing key when the manifest is known, else the sample being read, else
"after <the last key read>". Complete samples before it are kept; the sample being read when
reading stopped is not. A stream that fails after its last byte arrived (``curl`` reporting a
connection closed short of the file, a ``pipe:`` command exiting with an error) is caught
when the shard is closed. Keys the manifest lists but the shard lacks give one BadItem: a
tar cut exactly between members reads as a complete, shorter archive.
"""

from __future__ import annotations

import re
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import base_plus_ext, group_by_keys

from embseg.data.sources import url_scheme

_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members (skipped)

FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
"""Object-store schemes opened through fsspec instead of webdataset.gopen."""

_ENDED_EARLY = ("empty file", "unexpected end of data", "truncated header")
"""tarfile's reasons for a stream that ended too soon (a child's exit status says why)."""

_CURL_EXITS = {6: "could not resolve the host", 7: "could not connect to the server",
               18: "the connection closed before the end of the file",
               22: "the server answered with an HTTP error", 28: "timed out",
               35: "TLS handshake failed", 52: "the server sent nothing",
               56: "the connection failed while receiving data"}


@dataclass
class BadItem:
    """A shard item that could not be used: which shard, which key, why."""

    shard: str
    key: str | None
    reason: str

    def describe(self) -> str:
        key = self.key if self.key is not None else "?"
        return f"shard {self.shard}, key {key}: {self.reason}"


class _ShardError(Exception):
    """Why a shard cannot be read on (one line, for the BadItem's reason)."""


class _StrictTarInfo(tarfile.TarInfo):
    """``tarfile`` members whose damaged headers raise instead of ending the archive."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            raise _ShardError(str(exc)) from None


def open_shard(url: str) -> Any:
    """A binary stream of one shard: fsspec for object stores, else ``webdataset.gopen``."""
    if url_scheme(url) in FSSPEC_SCHEMES:
        import fsspec

        return fsspec.open(url, "rb").open()
    return gopen(url, "rb")


def read_whole(url: str) -> bytes:
    """All bytes of ``url`` through :func:`open_shard`; FileNotFoundError for an HTTP 404,
    OSError with the reason in words for other failures."""
    stream = open_shard(url)
    try:
        data = stream.read()
        stream.close()
    except Exception as exc:  # noqa: BLE001 - one line saying why
        _abandon(stream)
        reason = _reason(exc, url)
        if "HTTP 404" in reason or "HTTP 410" in reason:
            raise FileNotFoundError(reason) from None
        raise OSError(reason) from None
    return data


class _ShardReading:
    """State of one shard's read: the stream, the member being read, the first problem."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stream: Any = None
        self.member: str | None = None  # the member whose data is being read
        self.last_member: str | None = None
        self.problem: str | None = None
        self.problem_member: str | None = None

    def fail(self, reason: str, member: str | None = None) -> None:
        if self.problem is None:
            self.problem, self.problem_member = reason, member

    def handler(self, exn: Exception) -> bool:
        """WebDataset handler (of ``group_by_keys``): note the problem and stop the shard."""
        self.fail(_reason(exn, self.url), self.last_member)
        return False

    def files(self) -> Iterator[dict[str, Any]]:
        """``{"fname", "data", "__url__"}`` of each regular member, for ``group_by_keys``.

        At the end of the archive the stream is read to its end and closed before the last
        sample is let through: a pipe's exit status (curl's included) is only known then.
        """
        try:
            self.stream = open_shard(self.url)
            with tarfile.open(fileobj=self.stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
                for info in tar:
                    if not info.isreg() or _META_MEMBER.match(info.name):
                        continue
                    self.member = info.name
                    data = tar.extractfile(info).read()
                    self.member, self.last_member = None, info.name
                    yield {"fname": info.name, "data": data, "__url__": self.url}
                    tar.members = []  # stream mode: forget members already read
            stream, self.stream = self.stream, None
            while stream.read(1 << 16):
                pass
            stream.close()
        except Exception as exc:  # noqa: BLE001 - every read error ends the shard with a reason
            yield from self._stopped(exc)

    def _stopped(self, exc: Exception) -> Iterator[dict[str, Any]]:
        """Note why reading stopped, and drop the sample being read: the one of the member
        whose data failed or, when the stream itself ended early or failed (network, a
        child's exit), the one still being assembled, which may lack parts. A damaged
        header alone keeps the samples before it."""
        reason = _reason(exc, self.url)
        ended_early = (not isinstance(exc, (tarfile.TarError, _ShardError))
                       or reason in _ENDED_EARLY)
        stream = self.stream
        if ended_early and isinstance(stream, Pipe):
            # the child's exit status is the cause (curl's HTTP error or dropped connection,
            # a failed command), even where the short stream showed first in the tar
            status = _exit_status(stream, timeout=10)
            if status not in (None, 0, 141):
                reason = _pipe_reason(self.url, status)
        member = self.member or (self.last_member if ended_early else None)
        self.fail(reason, member)
        key = base_plus_ext(member)[0] if member else None
        if key is not None:  # WebDataset's __bad__ flag: group_by_keys drops the sample
            yield {"fname": f"{key}.__bad__", "data": True, "__url__": self.url}

    def close(self) -> None:
        """Stop the stream if reading ended early (a problem, or the consumer stopped)."""
        stream, self.stream = self.stream, None
        if stream is not None:
            _abandon(stream)


def _exit_status(pipe: Pipe, *, timeout: float) -> int | None:
    try:
        return pipe.proc.wait(timeout)
    except Exception:  # noqa: BLE001 - still running: no status to report
        return None


def _abandon(stream: Any) -> None:
    if isinstance(stream, Pipe) and stream.proc.poll() is None:
        stream.proc.kill()
    try:
        stream.close()
    except Exception:  # noqa: BLE001, S110 - its exit status no longer matters
        pass


def read_shard(shard: str, expected_keys: list[str] | None = None) -> Iterator[dict | BadItem]:
    """Raw samples of one shard (dicts of bytes with ``__key__`` and ``__url__``), then one
    BadItem for a problem (see the module docstring). ``expected_keys``: the keys the manifest
    lists for this shard (None: no check)."""
    url = str(shard)
    reading = _ShardReading(url)
    seen: set[str] = set()
    try:
        for sample in group_by_keys(reading.files(), handler=reading.handler):
            seen.add(sample["__key__"])
            yield sample
    finally:
        reading.close()
    missing = [key for key in (expected_keys or []) if key not in seen]
    if reading.problem is not None:
        lost = (f"; {len(missing)} sample(s) of the manifest not read, from this key on"
                if missing else "")
        yield BadItem(url, _failed_key(reading.problem_member or reading.last_member, seen,
                                       missing), f"unreadable tar ({reading.problem}){lost}")
        return
    if missing:
        yield BadItem(url, missing[0], f"truncated tar: {len(missing)} sample(s) of the "
                      f"manifest missing, from this key on")


def _failed_key(member: str | None, seen: set[str], missing: list[str]) -> str | None:
    """The key at which reading stopped: the manifest's first missing key when known, else the
    key of the member being read (if its sample was not complete), else "after <last key>"."""
    if missing:
        return missing[0]
    key = base_plus_ext(member)[0] if member else None
    if key is not None and key not in seen:
        return key
    return f"after {key}" if key is not None else None


def _reason(exc: BaseException, url: str) -> str:
    """One line saying why reading stopped, without WebDataset's appended context."""
    if isinstance(exc, FileNotFoundError):
        scheme = url_scheme(url)
        where = {"": "no such file", "file": "no such file", "s3": "NoSuchKey"}.get(scheme, "")
        return f"shard not found ({where})" if where else "shard not found"
    if isinstance(exc, zlib.error):
        return f"broken gzip stream ({exc})"
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    text = text.split(" @ ", 1)[0]
    pipe = re.search(r": exit (\d+) \(read\)", text)
    if pipe and isinstance(exc, OSError):  # webdataset.gopen.Pipe: a child exited with an error
        return _pipe_reason(url, int(pipe[1]))
    duplicate = re.match(r"^(.*?): duplicate file name in tar file", text)
    if duplicate:
        return f"{duplicate[1]}: duplicate file name in tar file"
    return " ".join(text.split()) or type(exc).__name__


def _pipe_reason(url: str, status: int) -> str:
    """Why a curl or ``pipe:`` child failed, in words; an HTTP error's status is asked for."""
    scheme = url_scheme(url)
    if scheme == "pipe":
        return f"the pipe command exited with status {status}"
    why = _CURL_EXITS.get(status, "the download failed")
    if status == 22:
        status_line = _http_status(url)
        if status_line:
            why = f"HTTP {status_line}"
    return f"{why} (curl exit {status})"


def _http_status(url: str) -> str | None:
    """``"404 Not Found"`` of a HEAD request to ``url`` (None when the server is unreachable)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            return f"{r.status} {r.reason}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.reason}"
    except Exception:  # noqa: BLE001 - only a better message is lost
        return None
