"""Where shards come from: a shard spec resolved to an ordered list of shard URLs, and a reader for each.

A shard spec (``LoaderConfig.shards``, ``data.shards``, ``data.eval_shards``,
``pretrain.encode --shards``) is one of:

- a local directory: ``clips-*.tar`` (or ``features-*.tar``) sorted by name,
  or exactly the shards its ``manifest.json`` lists (``list_shards``);
- a brace pattern of tars, local or remote:
  ``https://host/path/clips-{000000..000099}.tar``, ``/data/clips-{000000..000003}.tar``;
  the shards are the expansion, in its order;
- a ``pipe:`` command, brace-expanded into one command per shard:
  ``pipe:cat /x/clips-{000000..000003}.tar`` (each command writes one tar to stdout);
- an fsspec URL (``s3://``, ``gs://``, ``memory://``, ...): a brace pattern,
  one ``.tar``, or a directory (its manifest, else ``PREFIX-*.tar`` listed);
  needs ``pip install 'video-pretrain[remote]'`` plus the backend (s3fs, gcsfs, ...);
- ``@LIST``: a local text file naming one shard URL or path per line (blank
  lines and ``#`` comments ignored; relative paths are relative to the file).

An HTTP(S) URL without braces that does not end in ``.tar`` is a directory:
it needs a ``manifest.json``, since HTTP cannot list files.

The manifest is read from beside the shards: the directory, the directory
all pattern shards share (``.../manifest.json``; none when they span
several), or beside the list file; ``pipe:`` specs have none. When it lists
a shard (by file name), its "samples" count is that shard's
``ShardEntry.samples``; otherwise the count is None and an epoch that needs
one (resampled mode) takes ``LoaderConfig.samples_per_epoch``.

Reading (``open_shard``, ``shard_samples``): local paths and ``pipe:`` go
through webdataset's ``gopen``. HTTP(S) and fsspec shards go through
``_ResumingReader``: every socket read has a timeout (``read_timeout_s``), and
a failed open or read (an error status, a stall, a dropped connection) is
retried up to ``retries`` times in all per shard, each time continuing at the
byte where the last read stopped (an HTTP Range request; a server without
ranges resends from the start and the reader discards what it already has),
so a retry never repeats or loses a sample. After that the shard's rest is
skipped and counted by the caller's handler (the loader's
"unreadable_shard"): a shard that 404s or stalls costs at most about
``(retries + 1) * read_timeout_s`` plus the backoff, never a hang.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
from webdataset import tariterators
from webdataset.gopen import gopen

logger = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT_S = 60.0
"""Seconds a remote open or a single read may block before it counts as a failure."""
DEFAULT_RETRIES = 3
"""Re-opens allowed per remote shard (in all) before the rest of it is skipped."""
RETRY_BACKOFF_S = 0.5
"""Wait before the first retry; doubled for each further one, up to MAX_BACKOFF_S."""
MAX_BACKOFF_S = 8.0
READ_BUFFER_BYTES = 1 << 20
"""Read-ahead of a remote shard's reader: tarfile reads 10 KiB at a time, sockets like bigger reads."""
# Status codes of a manifest (or list) that is simply not there: S3 answers 403 for a
# missing object when the caller may not list the bucket.
_ABSENT_STATUS = (403, 404, 410)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Backends fsspec needs for the common protocols, for the install hint.
_FSSPEC_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One tar of a shard spec."""

    path: str
    """Local path, URL or ``pipe:`` command; what the loader opens."""
    samples: int | None
    """Sample count from the manifest (None without one, or when it does not list this shard)."""


def list_shards(directory: str | Path, prefix: str) -> tuple[list[ShardEntry], dict[str, Any] | None]:
    """Shards of a local directory sorted by name, and its manifest (None when there is no manifest.json).

    With a manifest, exactly the shards it lists are used and each must exist.
    """
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        entries = [ShardEntry(str(directory / s["name"]), int(s["samples"])) for s in manifest["shards"]]
        missing = [e.path for e in entries if not Path(e.path).is_file()]
        if missing:
            raise FileNotFoundError(f"{manifest_path} lists shards that do not exist: {missing[:3]}")
    else:
        manifest = None
        entries = [ShardEntry(str(p), None) for p in directory.glob(f"{prefix}-*.tar")]
    if not entries:
        raise FileNotFoundError(f"no {prefix}-*.tar shards in {directory}")
    return sorted(entries, key=lambda e: Path(e.path).name), manifest


def spec_kind(spec: str) -> str:
    """'list' (@FILE), 'pipe', 'http' (http/https), 'fsspec' (any other ``scheme://``) or 'local'."""
    if spec.startswith("@"):
        return "list"
    if spec.startswith("pipe:"):
        return "pipe"
    match = _SCHEME.match(spec)
    if match is None or match.group(1).lower() == "file":
        return "local"
    return "http" if match.group(1).lower() in ("http", "https") else "fsspec"


def is_remote(spec: str | Path) -> bool:
    """Whether a spec is anything but a local directory or local pattern (URL, pipe: or @list)."""
    return spec_kind(str(spec)) != "local"


def shard_name(url: str) -> str:
    """The file name of a shard URL, path or ``pipe:`` command (its last word): what manifests list."""
    if url.startswith("pipe:"):
        url = url[5:].split()[-1] if url[5:].split() else ""
    if _SCHEME.match(url):
        url = urllib.parse.urlsplit(url).path
    return url.rstrip("/").rsplit("/", 1)[-1]


def resolve_shards(
    spec: str | Path, prefix: str, *, timeout_s: float = DEFAULT_READ_TIMEOUT_S
) -> tuple[list[ShardEntry], dict[str, Any] | None]:
    """The shards of a spec (see the module docstring) in reading order, and the manifest beside them (or None).

    A local directory behaves exactly as ``list_shards``. Local shards named
    by a pattern or a list must exist (FileNotFoundError); remote ones are
    not checked here (a missing one is skipped and counted when read). An
    fsspec URL without fsspec installed raises ImportError naming the extra.
    """
    spec = str(spec)
    kind = spec_kind(spec)
    if kind == "local" and not has_braces(spec):
        return list_shards(_local_path(spec), prefix)
    if kind == "list":
        urls, manifest = _read_list_file(Path(spec[1:]).expanduser())
    elif kind == "pipe":
        urls, manifest = list(braceexpand.braceexpand(spec)), None
    elif has_braces(spec) or spec.endswith(".tar"):
        urls = list(braceexpand.braceexpand(spec))
        manifest = _manifest_beside(urls, timeout_s)
    else:
        urls, manifest = _remote_directory(spec, prefix, timeout_s)
    missing = [u for u in urls if spec_kind(u) == "local" and not Path(_local_path(u)).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(urls)} shards of {spec} do not exist: {missing[:3]}")
    if not urls:
        raise FileNotFoundError(f"no shards in {spec}")
    counts = _manifest_counts(manifest)
    return [ShardEntry(u, counts.get(shard_name(u))) for u in urls], manifest


def find_manifest(spec: str | Path, *, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> dict[str, Any] | None:
    """The manifest beside a spec's shards without listing them (None when there is none).

    For a feature manifest's "source" (the clip shards it was encoded from),
    which may have moved: nothing is required to exist.
    """
    spec = str(spec)
    kind = spec_kind(spec)
    try:
        if kind == "local" and not has_braces(spec):
            return _read_json(str(Path(_local_path(spec)) / "manifest.json"), timeout_s)
        if kind == "list":
            return _read_json(str(Path(spec[1:]).expanduser().parent / "manifest.json"), timeout_s)
        if kind == "pipe":
            return None
        if has_braces(spec) or spec.endswith(".tar"):
            return _manifest_beside(list(braceexpand.braceexpand(spec)), timeout_s)
        return _read_json(_join(spec, "manifest.json"), timeout_s)
    except (OSError, ValueError, ImportError):
        return None


def open_shard(url: str, *, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> BinaryIO:
    """A binary stream of one shard: webdataset's ``gopen`` for local paths and ``pipe:``; for HTTP(S) and
    fsspec URLs a reader with a timeout on every read that resumes at its byte offset on failure."""
    kind = spec_kind(url)
    if kind == "http":
        open_at: Callable[[int], tuple[BinaryIO, int | None]] = functools.partial(_http_open_at, url, read_timeout_s)
    elif kind == "fsspec":
        open_at = functools.partial(_fsspec_open_at, url)
    else:
        return gopen(url, "rb")
    return io.BufferedReader(_ResumingReader(url, open_at, retries), buffer_size=READ_BUFFER_BYTES)


def shard_samples(
    urls: Iterable[str],
    *,
    handler: Callable[[Exception], bool],
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
) -> Iterator[dict[str, Any]]:
    """Samples (dicts of ``__key__``, ``__url__`` and member bytes) of the shards in order.

    webdataset's ``tarfile_to_samples`` with ``open_shard`` as the opener:
    open, then its ``tar_file_expander`` and ``group_by_keys``. An exception
    while opening or reading a shard goes to ``handler``; True skips the rest
    of that shard.
    """
    opened = _opened_shards(urls, handler, read_timeout_s, retries)
    files = tariterators.tar_file_expander(opened, handler=handler)
    return tariterators.group_by_keys(files, handler=handler)


def _opened_shards(
    urls: Iterable[str], handler: Callable[[Exception], bool], read_timeout_s: float, retries: int
) -> Iterator[dict[str, Any]]:
    for url in urls:
        try:
            stream = open_shard(url, read_timeout_s=read_timeout_s, retries=retries)
        except Exception as exn:
            # Same contract as webdataset's url_opener: the handler decides, skipping counts.
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            return
        try:
            yield {"url": url, "stream": stream}
        finally:
            # The expander has moved past this shard: free its connection now, not at garbage collection.
            # A pipe whose command failed says so on close; its reads already reported it.
            with contextlib.suppress(OSError):
                stream.close()


class _ResumingReader(io.RawIOBase):
    """A remote shard as a raw stream: each failed open or read is retried at the current byte offset.

    ``open_at(pos)`` returns a stream positioned at byte ``pos`` and the
    shard's total size (None when unknown). Failures (OSError, which
    includes timeouts and HTTP errors, or an HTTP protocol error, or the
    stream ending before the known size) count against ``retries`` for the
    whole shard; one more raises OSError.
    """

    def __init__(self, url: str, open_at: Callable[[int], tuple[BinaryIO, int | None]], retries: int) -> None:
        super().__init__()
        self.url = url
        self._open_at = open_at
        self._retries = retries
        self._failures = 0
        self._pos = 0
        self._stream: BinaryIO | None = None
        self._size: int | None = None
        self._reopen()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            try:
                if self._stream is None:
                    self._reopen()
                    continue
                n = self._stream.readinto(buffer)
                if not n and len(buffer) and self._size is not None and self._pos < self._size:
                    raise ConnectionError(f"stream ended at byte {self._pos} of {self._size}")
            except (OSError, http.client.HTTPException) as e:
                self._failed(e)
                self._close_stream()
                continue
            self._pos += n or 0
            return n or 0

    def close(self) -> None:
        self._close_stream()
        super().close()

    def _reopen(self) -> None:
        while True:
            try:
                self._stream, self._size = self._open_at(self._pos)
                return
            except (OSError, http.client.HTTPException) as e:
                self._failed(e)

    def _failed(self, error: Exception) -> None:
        self._failures += 1
        if self._failures > self._retries:
            raise OSError(
                f"shard {self.url}: unreadable after {self._failures} attempts (at byte {self._pos}): "
                f"{type(error).__name__}: {error}"
            ) from error
        delay = min(RETRY_BACKOFF_S * 2 ** (self._failures - 1), MAX_BACKOFF_S)
        logger.warning(
            "shard %s: %s: %s at byte %d; retry %d of %d in %.1f s",
            self.url,
            type(error).__name__,
            error,
            self._pos,
            self._failures,
            self._retries,
            delay,
        )
        time.sleep(delay)

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                stream.close()


def _http_open_at(url: str, timeout_s: float, pos: int) -> tuple[BinaryIO, int | None]:
    """An HTTP(S) response positioned at byte ``pos`` (a Range request), and the shard's size when known."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={pos}-"} if pos else {})
    response = urllib.request.urlopen(request, timeout=timeout_s)
    try:
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
            if match is None or int(match.group(1)) != pos:
                raise ConnectionError(f"asked for bytes {pos}-, got Content-Range {content_range!r}")
            return response, None if match.group(2) == "*" else int(match.group(2))
        length = response.headers.get("Content-Length")
        # No range support: the whole shard again; drop what was already read.
        _discard(response, pos)
        return response, int(length) if length is not None else None
    except BaseException:
        response.close()
        raise


def _discard(stream: BinaryIO, count: int) -> None:
    while count:
        chunk = stream.read(min(count, READ_BUFFER_BYTES))
        if not chunk:
            raise ConnectionError(f"stream ended {count} bytes before the resume offset")
        count -= len(chunk)


def _fsspec_open_at(url: str, pos: int) -> tuple[BinaryIO, int | None]:
    """An fsspec file positioned at byte ``pos``, and its size when the backend knows it."""
    stream = _fsspec().open(url, "rb").open()
    try:
        stream.seek(pos)
    except BaseException:
        stream.close()
        raise
    size = getattr(stream, "size", None)
    return stream, size if isinstance(size, int) else None


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(
            "shard URLs other than http(s), pipe: and local paths are read with fsspec: "
            "pip install 'video-pretrain[remote]' (or pip install fsspec) plus the backend of the protocol "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://)"
        ) from e
    return fsspec


def _fsspec_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path inside it; ImportError naming the packages to install."""
    protocol = _SCHEME.match(url).group(1).lower()  # type: ignore[union-attr]
    fsspec = _fsspec()
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        backend = _FSSPEC_BACKENDS.get(protocol, f"the fsspec backend for {protocol}://")
        raise ImportError(f"shard URL {url}: reading {protocol}:// needs {backend}: pip install {backend} ({e})") from e
    except ValueError as e:
        raise ValueError(f"shard URL {url}: fsspec does not know the protocol {protocol!r} ({e})") from e
    return fs, path


def has_braces(spec: str) -> bool:
    """Whether a spec holds a brace pattern ({a,b} or {000..009}) to expand."""
    return re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", spec) is not None


def _local_path(spec: str) -> str:
    return re.sub(r"^file://", "", spec)


def _join(base: str, name: str) -> str:
    """``name`` in the directory ``base`` (a local path or a URL)."""
    return str(Path(base) / name) if spec_kind(base) == "local" else base.rstrip("/") + "/" + name


def _read_bytes(url: str, timeout_s: float) -> bytes | None:
    """A small file (manifest) at a local path, HTTP(S) or fsspec URL; None when it does not exist."""
    kind = spec_kind(url)
    if kind == "local":
        path = Path(_local_path(url))
        return path.read_bytes() if path.is_file() else None
    if kind == "http":
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code in _ABSENT_STATUS:
                return None
            raise OSError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from e
        except (OSError, http.client.HTTPException) as e:
            raise OSError(f"cannot fetch {url}: {type(e).__name__}: {e}") from e
    if kind == "fsspec":
        fs, path = _fsspec_filesystem(url)
        return fs.cat_file(path) if fs.isfile(path) else None
    return None


def _read_json(url: str, timeout_s: float) -> dict[str, Any] | None:
    data = _read_bytes(url, timeout_s)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{url} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{url} holds a JSON {type(doc).__name__}, not an object")
    return doc


def _manifest_beside(urls: list[str], timeout_s: float) -> dict[str, Any] | None:
    """The manifest.json of the one directory holding every shard (None when they span several, or for pipes)."""
    if any(spec_kind(u) == "pipe" for u in urls):
        return None
    parents = {u.rsplit("/", 1)[0] if "/" in u else "." for u in urls}
    if len(parents) != 1:
        return None
    return _read_json(_join(parents.pop(), "manifest.json"), timeout_s)


def _manifest_counts(manifest: dict[str, Any] | None) -> dict[str, int]:
    shards = (manifest or {}).get("shards")
    if not isinstance(shards, list):
        return {}
    return {str(s["name"]): int(s["samples"]) for s in shards if isinstance(s, dict) and "samples" in s}


def _remote_directory(spec: str, prefix: str, timeout_s: float) -> tuple[list[str], dict[str, Any] | None]:
    """Shards of a remote directory: those its manifest lists, else (fsspec only) ``PREFIX-*.tar`` by name."""
    manifest = _read_json(_join(spec, "manifest.json"), timeout_s)
    if manifest is not None:
        return [_join(spec, str(s["name"])) for s in manifest["shards"]], manifest
    if spec_kind(spec) == "http":
        raise FileNotFoundError(
            f"{spec} has no manifest.json, and an HTTP directory cannot be listed: give a brace pattern "
            f"({spec.rstrip('/')}/{prefix}-{{000000..000009}}.tar) or an @list file"
        )
    fs, path = _fsspec_filesystem(spec)
    found = sorted(fs.glob(f"{path.rstrip('/')}/{prefix}-*.tar"), key=shard_name)
    return [fs.unstrip_protocol(p) for p in found], None


def _read_list_file(path: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Shard URLs of an @list file (relative paths resolved against its directory) and the manifest beside it."""
    if not path.is_file():
        raise FileNotFoundError(f"shard list file @{path} does not exist")
    urls = []
    for line in path.read_text().splitlines():
        # A pipe: command is shell: "#" in it is the shell's business.
        line = line.strip() if line.lstrip().startswith("pipe:") else line.split("#", 1)[0].strip()
        if not line:
            continue
        if spec_kind(line) == "local" and not Path(_local_path(line)).expanduser().is_absolute():
            line = str(path.parent / line)
        urls.append(line)
    return urls, _read_json(str(path.parent / "manifest.json"), DEFAULT_READ_TIMEOUT_S)
