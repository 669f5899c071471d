"""Where shards are: the forms of ``--shards``, the shard list, and the files beside the shards.

``--shards`` (train, eval, bench's loader part, the flows) is one of:

- a local folder ``DIR``: its ``*-NNNNNN.tar`` files, sorted by name (hidden and partial files
  never match), as the build writes them;
- a folder on an object store, ``s3://bucket/prefix`` or ``gs://bucket/prefix`` (any fsspec
  protocol that can list; s3fs / gcsfs are the ``s3`` / ``gcs`` extras): the same names, listed
  through fsspec;
- an ``http(s)://`` folder: HTTP cannot list a folder, so the shard list is the one of the
  ``manifest.parquet`` there (every shard it names, sorted);
- a brace pattern or a single shard, local or a URL, expanded as WebDataset expands them
  (braces; several patterns joined by ``::``): ``shards/train-{000000..000099}.tar``,
  ``https://host/d/train-{000000..000009}.tar``, ``s3://bucket/p/train-000003.tar``;
- ``pipe:COMMAND``, a shell command that writes one shard to stdout (braces expanded: one
  command per shard), e.g. ``pipe:cat shards/train-{000000..000003}.tar``.

The shards themselves are opened by :mod:`embseg.data.reading`. ``classes.parquet`` and
``manifest.parquet`` are read from *beside* the shards, through fsspec for URLs:

- for a folder, that folder;
- for a pattern or a single shard, the folder of the expanded shards (they must all be in
  one folder: one split, one vocabulary, one manifest);
- for ``pipe:``, the folder of the command's last word that ends in ``.tar`` (or ``.tar.gz``,
  ``.tgz``), a path or a URL (``pipe:cat d/train-000000.tar`` -> ``d``;
  ``pipe:aws s3 cp s3://b/p/train-000000.tar -`` -> ``s3://b/p``); that word's file name is
  also the shard's name in the manifest. A command without such a word has no "beside", so
  the vocabulary cannot be found.

A shard's *name* (its file name) is what the manifest's ``shard`` column holds. Where the
manifest is unreachable, the shard list is the folder's or the pattern's, and the check for
shards cut at a member boundary is skipped with a warning.
"""

from __future__ import annotations

import io
import logging
import re
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from embseg.errors import EmbsegError

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"[^./][^/]*-\d{6}\.tar")
"""File names of shards in a folder: ``<split>-NNNNNN.tar``, never hidden or partial files."""

_TAR_WORD = re.compile(r".*\.(tar|tar\.gz|tgz)$")

CLASSES_FILE = "classes.parquet"
MANIFEST_FILE = "manifest.parquet"


def url_scheme(location: str) -> str:
    """The URL scheme of ``location`` (``""`` for a local path; a drive letter is no scheme)."""
    if location.startswith("pipe:"):
        return "pipe"
    scheme = urllib.parse.urlsplit(location).scheme
    return scheme.lower() if len(scheme) > 1 else ""


def is_local(location: str) -> bool:
    return url_scheme(location) in ("", "file")


def _local_path(location: str) -> Path:
    if location.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
    return Path(location)


def _folder_of(location: str) -> str:
    """The folder part of a shard path or URL (no trailing slash)."""
    if url_scheme(location) == "":
        return str(Path(location).parent)
    return location.rsplit("/", 1)[0]


def _name_of(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a folder URL."""
    if url_scheme(folder) == "":
        return str(Path(folder) / name)
    return folder.rstrip("/") + "/" + name


@dataclass(frozen=True)
class ShardSource:
    """The shards one ``--shards`` value names, in order, and where their metadata lives.

    ``urls`` are what the reader opens (local paths, URLs or ``pipe:`` commands), ``names``
    each shard's file name (the manifest's ``shard`` column), ``beside`` the folder of
    ``classes.parquet`` and ``manifest.parquet`` (None when the spec names none).
    """

    spec: str
    urls: tuple[str, ...]
    names: tuple[str, ...]
    beside: str | None

    def beside_file(self, name: str) -> str | None:
        """The path or URL of the file ``name`` beside the shards (None without a folder)."""
        return join(self.beside, name) if self.beside is not None else None


def list_shards(directory: Path) -> list[Path]:
    """Every ``DIR/*-NNNNNN.tar`` shard of a local folder, sorted by name.

    Hidden and partial files (``.train-000000.tar.tmp``, ``train-000000.tar.partial``) never
    match. Raises EmbsegError when the directory is missing or holds no shard.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EmbsegError(f"{directory}: shard directory does not exist")
    shards = sorted(p for p in directory.iterdir() if SHARD_NAME.fullmatch(p.name) and p.is_file())
    if not shards:
        raise EmbsegError(f"{directory}: no shards (*-NNNNNN.tar) found")
    return shards


def _check_fsspec_scheme(scheme: str, spec: str) -> None:
    """EmbsegError naming the spec when fsspec has no usable implementation of ``scheme``."""
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as exc:
        raise EmbsegError(f"{spec}: cannot read {scheme}:// URLs ({_one_line(exc)}); install "
                          f"its fsspec implementation (pip install 'embseg[s3]' for s3://, "
                          f"'embseg[gcs]' for gs://)") from None


def _list_remote_folder(folder: str) -> list[str]:
    """Shard URLs of an object-store folder (fsspec listing), sorted by name."""
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(folder)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise EmbsegError(f"{folder}: shard folder does not exist") from None
    except ImportError:
        _check_fsspec_scheme(url_scheme(folder), folder)
        raise
    except Exception as exc:  # noqa: BLE001 - network, permissions: one line naming the URL
        raise EmbsegError(f"{folder}: cannot list the shard folder ({_one_line(exc)})") from None
    names = sorted(_name_of(e["name"]) for e in entries if e.get("type") != "directory")
    shards = [join(folder, n) for n in names if SHARD_NAME.fullmatch(n)]
    if not shards:
        raise EmbsegError(f"{folder}: no shards (*-NNNNNN.tar) found")
    return shards


def _pipe_shard_word(command: str) -> str | None:
    """The last word of a ``pipe:`` command that ends in .tar (.tar.gz, .tgz), if any."""
    try:
        words = shlex.split(command[len("pipe:"):])
    except ValueError:
        words = command[len("pipe:"):].split()
    tars = [w for w in words if _TAR_WORD.fullmatch(w)]
    return tars[-1] if tars else None


def _one_folder(spec: str, locations: list[str]) -> str:
    folders = sorted({_folder_of(location) for location in locations})
    if len(folders) > 1:
        raise EmbsegError(f"{spec}: the shards are in {len(folders)} folders ({folders[0]}, "
                          f"{folders[1]}, ...); the shards of one --shards must share one "
                          f"folder (its classes.parquet and manifest.parquet)")
    return folders[0]


def shard_location(spec: str | Path) -> str | Path:
    """A ``--shards`` value as a Path when it is local (a folder, a local pattern), else as
    the text of its URL or ``pipe:`` command (a Path would fold ``s3://`` into ``s3:/``)."""
    if isinstance(spec, Path):
        return spec
    return Path(spec) if url_scheme(spec) == "" else spec


def _kind(text: str) -> str:
    """``pipe``, ``pattern`` (braces, ``::`` or one .tar file) or ``folder``."""
    if url_scheme(text) == "pipe":
        return "pipe"
    if "{" in text or "::" in text or _TAR_WORD.fullmatch(text.rstrip("/")):
        return "pattern"
    return "folder"


def _expanded(text: str) -> list[str]:
    """The shards (or commands) of a pattern, as WebDataset expands them."""
    return expand_urls(text) if ("{" in text or "::" in text) else [text]


def beside_folder(spec: str | Path) -> str | None:
    """The folder ``classes.parquet`` and ``manifest.parquet`` are read from (no I/O; see
    the module docstring). None for a ``pipe:`` command that names no .tar file."""
    text = str(spec)
    kind = _kind(text)
    if kind == "pipe":
        words = [w for w in map(_pipe_shard_word, _expanded(text)) if w is not None]
        return _one_folder(text, words) if words else None
    if kind == "pattern":
        return _one_folder(text, _expanded(text))
    if url_scheme(text) == "file":
        return str(_local_path(text.rstrip("/")))
    return str(Path(text)) if url_scheme(text) == "" else text.rstrip("/")


def source_label(spec: str | Path) -> str:
    """A short name of a ``--shards`` value for reports and output folders: the name of the
    folder beside the shards (``shards/val`` -> ``val``; ``s3://b/p/val`` -> ``val``)."""
    folder = beside_folder(spec)
    if folder is None:
        return "shards"
    if url_scheme(folder) == "":
        return Path(folder).resolve().name
    return _name_of(folder) or folder


def shard_source(spec: str | Path | ShardSource) -> ShardSource:
    """Resolve a ``--shards`` value (see the module docstring) into its shard list.

    EmbsegError (naming the spec) when a local folder is missing or holds no shard, a remote
    folder cannot be listed, an HTTP folder has no reachable manifest, or the shards of a
    pattern are in several folders.
    """
    if isinstance(spec, ShardSource):
        return spec
    text = str(spec)
    if not text:
        raise EmbsegError("--shards: empty shard location")
    kind, beside = _kind(text), beside_folder(text)
    if kind == "pipe":
        commands = _expanded(text)
        words = [_pipe_shard_word(c) for c in commands]
        names = tuple(_name_of(w) if w is not None else c
                      for w, c in zip(words, commands, strict=True))
        return ShardSource(text, tuple(commands), names, beside)
    if kind == "pattern":
        urls = _expanded(text)
        for scheme in sorted({url_scheme(u) for u in urls} - {"", "file", "http", "https"}):
            _check_fsspec_scheme(scheme, text)
        return ShardSource(text, tuple(urls), tuple(_name_of(u) for u in urls), beside)
    assert beside is not None
    scheme = url_scheme(text)
    if scheme in ("", "file"):
        shards = list_shards(Path(beside))
        return ShardSource(text, tuple(str(p) for p in shards), tuple(p.name for p in shards),
                           beside)
    if scheme in ("http", "https"):
        names = _manifest_shard_names(beside)
        return ShardSource(text, tuple(join(beside, n) for n in names), tuple(names), beside)
    urls = _list_remote_folder(beside)
    return ShardSource(text, tuple(urls), tuple(_name_of(u) for u in urls), beside)


# --------------------------------------------------------------------------------------------
# Files beside the shards


class BesideFileMissing(EmbsegError):
    """A file beside the shards could not be read (missing or unreachable)."""


def read_file(location: str) -> bytes:
    """The bytes of a local file or of a URL; BesideFileMissing naming it.

    ``http(s)://`` is read as the shards are, through WebDataset's opener (curl), and the
    object stores (``s3://``, ``gs://``, ...) through fsspec. (fsspec's own HTTP client keeps
    an asyncio loop with pooled connections in this process; after DataLoader workers were
    forked from it, a later request could wait out its 300 s timeout.)
    """
    try:
        if is_local(location):
            return _local_path(location).read_bytes()
        if url_scheme(location) in ("http", "https"):
            from embseg.data.reading import read_whole

            return read_whole(location)
        import fsspec

        with fsspec.open(location, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BesideFileMissing(f"{location}: not found") from None
    except ImportError as exc:
        raise BesideFileMissing(f"{location}: cannot read this URL scheme ({exc}); install its "
                                f"fsspec implementation (e.g. pip install 'embseg[s3]')") from None
    except Exception as exc:  # noqa: BLE001 - network, permissions, HTTP errors
        raise BesideFileMissing(f"{location}: unreachable ({_one_line(exc)})") from None


def read_beside(source: ShardSource, name: str) -> bytes:
    """The file ``name`` beside the shards; BesideFileMissing when there is none or it fails."""
    location = source.beside_file(name)
    if location is None:
        raise BesideFileMissing(f"{source.spec}: no folder to read {name} from (a pipe: command "
                                f"names no .tar file)")
    return read_file(location)


def read_vocabulary(spec: str | Path | ShardSource):
    """The :class:`~embseg.vocab.Vocabulary` of ``classes.parquet`` beside the shards (found
    without listing them: a missing folder reports the missing vocabulary file first)."""
    from embseg.vocab import Vocabulary

    folder = spec.beside if isinstance(spec, ShardSource) else beside_folder(spec)
    where = join(folder, CLASSES_FILE) if folder is not None else f"{spec}: {CLASSES_FILE}"
    try:
        if folder is None:
            raise BesideFileMissing(f"{spec}: no folder to read {CLASSES_FILE} from (a pipe: "
                                    f"command that names no .tar file)")
        data = read_file(where)
    except BesideFileMissing as exc:
        raise EmbsegError(f"{exc}: the shards have no vocabulary file, so their labels cannot "
                          f"be checked against the model's classes (build the shards with "
                          f"`embseg build`)") from None
    return Vocabulary.from_parquet_bytes(data, where=where)


def read_num_classes(spec: str | Path | ShardSource) -> int:
    """Number of classes C of the vocabulary stored beside the shards (``classes.parquet``)."""
    return read_vocabulary(spec).num_classes


def _read_manifest_rows(location: str) -> list[dict]:
    import pyarrow.parquet as pq

    data = read_file(location)
    try:
        return pq.read_table(io.BytesIO(data), columns=["key", "shard", "status"]).to_pylist()
    except Exception as exc:  # noqa: BLE001 - unreadable or without those columns
        raise BesideFileMissing(f"{location}: not usable ({_one_line(exc)})") from None


def _manifest_shard_names(folder: str) -> list[str]:
    """The shard names a folder's manifest lists (the shard list of an HTTP folder)."""
    location = join(folder, MANIFEST_FILE)
    try:
        rows = _read_manifest_rows(location)
    except BesideFileMissing as exc:
        raise EmbsegError(f"{folder}: an HTTP folder cannot be listed and its manifest is "
                          f"unusable ({exc}); give the shards as a brace pattern, e.g. "
                          f"{folder}/train-{{000000..000009}}.tar") from None
    names = sorted({_name_of(str(r["shard"])) for r in rows
                    if r["status"] == "ok" and r["shard"] is not None})
    if not names:
        raise EmbsegError(f"{location}: lists no shard")
    return names


def manifest_keys(spec: str | Path | ShardSource) -> dict[str, list[str]]:
    """Keys the build wrote into each shard (from ``manifest.parquet``), by shard file name.

    Only rows with status ``ok`` are written to shards. Used to detect a shard cut at a member
    boundary, which a tar reader cannot tell from a complete one. Empty, with a warning, when
    the manifest is missing, unreachable or unusable (shards written by other tools): the
    check is then skipped.
    """
    source = shard_source(spec)
    location = source.beside_file(MANIFEST_FILE)
    try:
        if location is None:
            raise BesideFileMissing(f"{source.spec}: no folder to read {MANIFEST_FILE} from")
        rows = _read_manifest_rows(location)
    except BesideFileMissing as exc:
        log.warning("%s; shards cut at a member boundary cannot be detected for %s",
                    exc, source.spec)
        return {}
    keys: dict[str, list[str]] = {}
    for row in rows:
        if row["status"] == "ok" and row["shard"] is not None:
            keys.setdefault(_name_of(str(row["shard"])), []).append(str(row["key"]))
    return keys


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
