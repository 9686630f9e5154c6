"""Dataset directories given as URLs (``s3://bucket/prefix/dataset``, ``https://host/dataset``):
a small wrapper over fsspec (s3fs for S3) with ranged reads, retries and clear errors.

Reading lives here (writing a finished dataset to a URL: evav.data.publish): ``read_bytes`` (a whole small object: a manifest, an index, bounded),
``read_range`` (a byte range: one tar header and member, ``ShardReader``), ``size`` (HEAD) and
``RemoteFile``, a seekable read-only file over ``read_range`` for the header walk (``tarfile``).

Credentials and endpoints come from the standard environment, never from a config: for S3,
botocore's ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ... and the
endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an S3-compatible store).

Errors: a transient failure (a connection error or timeout, a 5xx, throttling) is tried again,
``TRIES`` times in all, waiting ``BACKOFF_S``, then twice that, ...; a permanent one (404 /
NoSuchKey / NoSuchBucket, 403 / AccessDenied, a bad request) is raised at once. Either way the
caller gets an ``OSError`` (``FileNotFoundError`` / ``PermissionError`` where it is one) whose
message names the URL and the reason. Timeouts are short (``CONNECT_TIMEOUT_S``,
``READ_TIMEOUT_S``) and the libraries' own retries are off, so a store that is down fails in
seconds, not minutes.

Processes: filesystems are made lazily, one per protocol per process (the pid is checked), so a
DataLoader worker forked from the loader never uses its parent's connections or event loop
(fsspec instances are not fork-safe; fsspec also resets its loop after a fork).

fsspec and s3fs are an optional extra (``pip install 'evav[remote]'``): ``check_remote`` says
why a URL cannot be read here, before anything is read.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import time
from pathlib import Path

SCHEMES = ("s3://", "https://", "http://")
REMOTE_EXTRA = "pip install 'evav[remote]'"
TRIES = 3  # attempts per request on a transient error
BACKOFF_S = 0.2  # wait before the second attempt; doubled before each next one
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
READ_AHEAD = 64 * 2**10  # header walk (RemoteFile): smallest range fetched

# what each protocol needs installed (module names)
_NEEDS = {"s3": ("fsspec", "s3fs"), "http": ("fsspec", "aiohttp"), "https": ("fsspec", "aiohttp")}
# (pid, protocol, the environment a filesystem was made from) -> filesystem: a forked worker
# or a changed endpoint/credential environment gets a fresh one, never a stale connection pool
_fs: dict[tuple, object] = {}
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")


def is_url(s) -> bool:
    """Whether ``s`` is a dataset URL read through fsspec (never ``pipe:``, never a local path)."""
    return isinstance(s, str) and s.lower().startswith(SCHEMES)


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def join(directory: str, rel: str) -> str:
    """``rel`` (a manifest's relative path) inside ``directory``: a URL, or a local path."""
    if is_url(str(directory)):
        return f"{str(directory).rstrip('/')}/{rel}"
    return str(Path(directory) / rel)


def basename(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def check_remote(url: str) -> str | None:
    """Why ``url`` cannot be read here (one line naming the extra), or None."""
    missing = [m for m in _NEEDS.get(protocol(url), ()) if importlib.util.find_spec(m) is None]
    if missing:
        pkgs = " and ".join(missing)
        return f"{url} needs the {pkgs} package{'s' if len(missing) > 1 else ''}: {REMOTE_EXTRA}"
    return None


def _filesystem(url: str):
    proto = protocol(url)
    key = (os.getpid(), proto, *(os.environ.get(k) for k in _ENV))
    got = _fs.get(key)
    if got is not None:
        return got
    why = check_remote(url)
    if why:
        raise ImportError(why)
    if proto == "s3":
        import s3fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint or None,
            skip_instance_cache=True,
            use_listings_cache=False,
            config_kwargs={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "read_timeout": READ_TIMEOUT_S,
                "retries": {"max_attempts": 1, "mode": "standard"},  # ours, below
            },
        )
        fs.retries = 1
    else:
        import aiohttp
        import fsspec

        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        fs = fsspec.filesystem(proto, skip_instance_cache=True, client_kwargs={"timeout": timeout})
    for old in [k for k in _fs if k[0] != key[0] or k[1] == proto]:
        del _fs[old]  # another process's, or this protocol's under an environment now gone
    _fs[key] = fs
    return fs


_PERMANENT_ERRNOS = {errno.EINVAL, errno.ENAMETOOLONG, errno.EPERM, errno.EACCES, errno.ENOENT}
_PERMANENT_TYPES = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
    TypeError,
    NotImplementedError,
)


def _status(e: BaseException) -> int | None:
    """The HTTP status of an aiohttp / botocore error, where it carries one."""
    for x in (e, e.__cause__, e.__context__):
        if x is None:
            continue
        status = getattr(x, "status", None)
        if isinstance(status, int):
            return status
        resp = getattr(x, "response", None)
        if isinstance(resp, dict):
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def transient(e: BaseException) -> bool:
    """Whether trying again may help: connection errors, timeouts, 5xx, throttling (429)."""
    status = _status(e)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, _PERMANENT_TYPES):
        return False
    if isinstance(e, OSError) and e.errno in _PERMANENT_ERRNOS:
        return False
    return True  # connection refused/reset, timeouts, throttling (SlowDown), anything else


def _error(url: str, e: BaseException, tries: int, verb: str = "read") -> OSError:
    reason = f"{type(e).__name__}: {str(e)[:300]}" if str(e) else type(e).__name__
    status = _status(e)
    if status is not None and f"{status}" not in reason:
        reason += f" (HTTP {status})"
    if status in (401, 403) or (status is None and isinstance(e, PermissionError)):
        out = PermissionError(errno.EACCES, f"{url}: access denied ({reason})")
    elif status == 404 or isinstance(e, FileNotFoundError):
        out = FileNotFoundError(errno.ENOENT, f"{url}: not found ({reason})")
    else:
        again = f" after {tries} tries" if tries > 1 else ""
        out = OSError(f"{url}: cannot {verb}{again} ({reason})")
    out.reason = reason  # the store's words, without the URL
    return out


def _call(url: str, fn, verb: str = "read"):
    """``fn(filesystem)``, tried again on transient errors; OSError naming ``url`` otherwise
    (``verb``: what could not be done, in its message; evav.data.publish writes)."""
    for attempt in range(TRIES):
        fs = _filesystem(url)  # ImportError (no extra) propagates: the install's, no data's
        try:
            return fn(fs)
        except (KeyboardInterrupt, SystemExit, ImportError):
            raise
        except Exception as e:  # noqa: BLE001 - classified, then raised naming the URL
            if not transient(e) or attempt == TRIES - 1:
                raise _error(url, e, attempt + 1, verb) from e
        time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def size(url: str) -> int:
    """The object's size in bytes (one HEAD)."""
    n = _call(url, lambda fs: fs.size(url))
    if not isinstance(n, int) or n < 0:
        raise OSError(f"{url}: the server gives no size for it")
    return n


def read_range(url: str, start: int, length: int) -> bytes:
    """``length`` bytes from ``start`` (fewer if the object ends first); one ranged GET."""
    if start < 0 or length < 0:
        raise ValueError(f"{url}: bad range {start}+{length}")
    if length == 0:
        return b""
    data = _call(url, lambda fs: fs.cat_file(url, start=start, end=start + length))
    if len(data) > length:  # a server that ignored the Range header
        raise OSError(f"{url}: asked for {length} bytes at {start}, got {len(data)}")
    return data


def read_bytes(url: str, max_bytes: int) -> bytes:
    """The whole object, refused (OSError) if larger than ``max_bytes``."""
    n = size(url)
    if n > max_bytes:
        raise OSError(errno.EFBIG, f"{url}: {n} bytes, over the {max_bytes}-byte limit")
    data = read_range(url, 0, n)
    if len(data) != n:
        raise OSError(f"{url}: read {len(data)} of its {n} bytes (changed while read?)")
    return data


class RemoteFile:
    """A read-only, seekable file over ``read_range`` (``size``: known, else one HEAD). Reads
    never reach past ``size``. ``read_ahead``: a smaller read fetches that many bytes and serves
    the next reads from them (the header walk: tar headers come a few bytes apart); 0 (indexed
    reads: each is one member, header and data) asks for exactly what is read."""

    mode = "rb"

    def __init__(self, url: str, size_: int | None = None, read_ahead: int = 0):
        self.url, self.read_ahead = url, read_ahead
        self.name = url
        self.size = size(url) if size_ is None else size_
        self._pos = 0
        self._buf_at, self._buf = 0, b""

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, f"{self.url}: seek to {base + pos}")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        if end <= self._pos:
            return b""
        lo, hi = self._buf_at, self._buf_at + len(self._buf)
        if not (lo <= self._pos and end <= hi):
            want = end - self._pos
            if want < self.read_ahead:  # small (a tar header): fetch a block and keep it
                self._buf_at = self._pos
                n = min(self.read_ahead, self.size - self._pos)
                self._buf = read_range(self.url, self._pos, n)
                lo, hi = self._buf_at, self._buf_at + len(self._buf)
            else:
                data = read_range(self.url, self._pos, want)
                self._pos += len(data)
                return data
        data = self._buf[self._pos - lo : min(end, hi) - lo]
        self._pos += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._buf = b""

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
