"""Random access into tar shards: a per-shard index of sample members, read from a small JSON
file written beside each shard at build time, or (shards built before indexes) from the tar
headers.

A shard is a plain (uncompressed) tar of ``KEY.json`` + ``KEY.mp4`` pairs, written by
webdataset's ``TarWriter`` (preprocessing/shards.py); keys and extensions follow webdataset's
convention (``webdataset.tariterators.base_plus_ext``). Its index, ``shard-NNNNNN.tar.idx.json``
(``index_path``), lists every sample's members with their data offset and size, and the shard's
size and sha256 (``INDEX_KIND``, below). The manifest lists it (``ShardInfo.index``,
``index_sha256``). A sample is then one seek and one read per member.

Why not wids' own per-shard index: ``wids`` (webdataset's indexed reader) keeps a shard's
``file.tar.index`` as a pickle, and loading a pickle runs code; a dataset directory is not
trusted that far. Its dataset-level ``wids-shard-index-v1`` JSON (shard urls and sample counts)
carries no offsets, and the manifest already says as much.

An index is untrusted input. ``parse_index`` checks every field (types, offsets on 512-byte
blocks inside the shard, sizes within the shard and ``MAX_INDEX_BYTES``) and its recorded shard
size and sha256 against the file and the manifest; a refused index (not JSON, forged offsets, a
stale one for a shard since replaced) is logged once, naming the file, and the reader falls back
to walking the headers. Each member read from a file index also reads the member's 512-byte tar
header, just before its data (one read), and checks its checksum, name and size: an index that
no longer matches its shard is caught at the first member and replaced by a header walk.

Header walk (``index_shard``): seeks over the 512-byte headers (no member data is read), groups
members by key in file order. A tar cut short just has fewer samples: the caller compares the
count with the manifest.

Shards are opened without blocking and only when they are regular files: a shard replaced by a
FIFO would otherwise hang the reader in ``open`` (where no signal handler gets to run), and a
directory or device is no tar. A member larger than ``MAX_MEMBER_BYTES`` is refused before it is
read (a forged header must not make the reader allocate gigabytes). A failure is an ``OSError``,
an index with ``error`` set, or a read with no members (the file ends inside the sample); the
loader turns each into a skipped, counted sample.

Shard URLs (a dataset directory given as ``s3://`` or ``https://``, evav.data.remote): the same
reader and the same checks, over ranged reads. ``load_index`` asks the store for the shard's
size (one HEAD, once per shard per reader) and checks the index against it exactly as against a
local file's size; a member read is one ranged GET of its header and data (``RemoteFile``,
which never reads past the object's size); the header walk fetches 64 KiB at a time. A shard
missing from the store is a read error for each of its samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from evav.data import remote
from evav.data.remote import RemoteFile, is_url

log = logging.getLogger(__name__)

# The largest member read: far above any clip evav writes (a 1024x1024 FFV1 clip of 64 frames is
# ~150 MiB) and any metadata (a few KiB), far below what would exhaust a loader worker's memory.
MAX_MEMBER_BYTES = {"json": 16 * 2**20, "mp4": 2**30}
BLOCK = tarfile.BLOCKSIZE  # 512
INDEX_KIND = "evav-shard-index"
INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.json"
# An index is a few dozen bytes per sample; a shard holds at most size // 2048 samples.
MAX_INDEX_BYTES = 64 * 2**20
_MAX_KEY_CHARS = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass
class ShardIndex:
    path: str
    keys: list[str]  # sample keys in file order
    members: list[dict[str, Member]]  # per sample: extension ("mp4", "json") -> member
    error: str | None = None  # why indexing stopped early, if it did
    unreadable: bool = False  # the file could not be opened as a tar at all (no sample indexed)
    from_file: bool = False  # read from an index file (each read checks the member's header)
    bytes: int | None = None  # the shard's size the index was made for (file indexes)


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.mp4`` -> (``dir/abc``, ``mp4``): webdataset's ``base_plus_ext`` (first dot of
    the basename); a name it cannot split (no dot) is its own key with no extension."""
    key, ext = base_plus_ext(name)
    return (name, "") if key is None else (key, ext)


def index_path(shard: str | Path) -> Path | str:
    """Where a shard's index lives: ``shard-NNNNNN.tar`` -> ``shard-NNNNNN.tar.idx.json`` (a
    URL, as a str, beside a shard URL)."""
    if is_url(str(shard)):
        return str(shard) + INDEX_SUFFIX
    shard = Path(shard)
    return shard.with_name(shard.name + INDEX_SUFFIX)


def encode_index(
    shard_name: str, size: int, sha256: str, samples: list[tuple[str, dict[str, tuple[int, int]]]]
) -> bytes:
    """The bytes of an index file (deterministic: the same shard gives the same bytes)."""
    doc = {
        "kind": INDEX_KIND,
        "version": INDEX_VERSION,
        "shard": shard_name,
        "bytes": size,
        "sha256": sha256,
        "samples": [[key, {ext: [o, n] for ext, (o, n) in m.items()}] for key, m in samples],
    }
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_index(data: bytes, shard: str | Path, size: int, sha256: str | None = None) -> ShardIndex:
    """Index file bytes -> a checked ``ShardIndex`` for ``shard`` of ``size`` bytes (and, when
    known, the manifest's ``sha256``); ValueError says why the index is refused."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("kind") != INDEX_KIND:
        raise ValueError(f"not an {INDEX_KIND} file")
    if doc.get("version") != INDEX_VERSION:
        raise ValueError(f"version {str(doc.get('version'))[:20]}, this evav reads {INDEX_VERSION}")
    if doc.get("bytes") != size or not _is_int(doc.get("bytes")):
        raise ValueError(f"made for a shard of {str(doc.get('bytes'))[:24]} bytes, it has {size}")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError("its shard sha256 is not 64 lowercase hex digits")
    if sha256 is not None and sha != sha256:
        raise ValueError("made for another shard (its sha256 differs from the manifest's)")
    samples = doc.get("samples")
    if not isinstance(samples, list) or len(samples) * 2 * 2 * BLOCK > size:
        raise ValueError("its sample list is not a list, or longer than the shard can hold")
    keys: list[str] = []
    members: list[dict[str, Member]] = []
    end = 0  # where the previous member's data ends: members are listed in file order
    for i, s in enumerate(samples):
        if not (isinstance(s, list) and len(s) == 2 and isinstance(s[0], str)):
            raise ValueError(f"sample {i} is not [key, members]")
        key, ms = s
        if not 0 < len(key) <= _MAX_KEY_CHARS or not isinstance(ms, dict) or not ms:
            raise ValueError(f"sample {i} has a bad key or no members")
        out = {}
        for ext, m in ms.items():
            if not (isinstance(m, list) and len(m) == 2 and all(_is_int(x) for x in m)):
                raise ValueError(f"sample {i} member {ext[:20]!r} is not [offset, size]")
            off, n = m
            if off < BLOCK or off % BLOCK or n < 0 or off + n > size:
                raise ValueError(
                    f"sample {i} member {ext[:20]!r} at {off}+{n} is outside the {size}-byte shard"
                )
            if off < end + BLOCK:
                raise ValueError(f"sample {i} member {ext[:20]!r} is not in file order")
            end = off + n
            out[ext] = Member(off, n)
        keys.append(key)
        members.append(out)
    return ShardIndex(str(shard), keys, members, from_file=True, bytes=size)


def load_index(
    shard: str | Path,
    index: str | Path | None = None,
    index_sha256: str | None = None,
    shard_sha256: str | None = None,
) -> tuple[ShardIndex | None, str]:
    """The shard's index from its file (``index``, default ``index_path(shard)``), checked; or
    ``(None, why)``: no index file (a shard built before indexes) or a refused one. One small
    read; the shard itself is only ``stat``-ed. ``index_sha256`` / ``shard_sha256``: what the
    manifest lists, checked when given.

    A shard URL: its size is asked of the store (one HEAD) and the index read in one GET, bounded
    by ``MAX_INDEX_BYTES``; the index is then checked exactly as a local one."""
    if is_url(str(shard)):
        data, size, why = _load_remote_index(str(shard), index)
        if data is None:
            return None, why
    else:
        data, size, why = _load_local_index(shard, index)
        if data is None:
            return None, why
    if index_sha256 is not None and hashlib.sha256(data).hexdigest() != index_sha256:
        return None, "its sha256 differs from the manifest's"
    try:
        return parse_index(data, shard, size, shard_sha256), ""
    except ValueError as e:
        return None, str(e)


def _load_remote_index(shard: str, index) -> tuple[bytes | None, int, str]:
    ipath = str(index) if index is not None else str(index_path(shard))
    try:
        size = remote.size(shard)
    except OSError as e:
        return None, 0, f"shard unreadable: {e}"
    try:
        return remote.read_bytes(ipath, MAX_INDEX_BYTES), size, ""
    except FileNotFoundError:
        why = "missing" if index is None else f"{remote.basename(ipath)} is listed but missing"
        return None, 0, why
    except OSError as e:
        return None, 0, f"unreadable: {e}"


def _load_local_index(shard, index) -> tuple[bytes | None, int, str]:
    ipath = Path(index) if index is not None else index_path(shard)
    try:
        size = os.stat(shard).st_size
    except OSError as e:
        return None, 0, f"shard unreadable: {e}"
    try:
        f = open_shard(ipath)
    except FileNotFoundError:
        return None, 0, "missing" if index is None else f"{ipath.name} is listed but missing"
    except OSError as e:
        return None, 0, f"unreadable: {e}"
    with f:
        n = os.fstat(f.fileno()).st_size
        if n > MAX_INDEX_BYTES:
            return None, 0, f"{n} bytes, over the {MAX_INDEX_BYTES}-byte limit for an index"
        data = f.read(MAX_INDEX_BYTES + 1)
    return data, size, ""


def warn_no_index(shard: str | Path, why: str) -> None:
    """The one warning for a shard read without its index file."""
    if why == "missing":
        log.warning(
            "%s: no index (built before indexes): reading its tar headers; "
            "rebuild with evav preprocess to skip this",
            shard,
        )
    else:
        log.warning(
            "%s: index %s refused (%s): reading its tar headers instead",
            shard,
            remote.basename(index_path(shard)),
            why,
        )


def open_shard(
    path: str | Path, size: int | None = None, read_ahead: int = 0
) -> io.BufferedReader | RemoteFile:
    """Open a shard for reading; ``OSError`` unless it is a regular file (never blocks on a FIFO).
    A URL: a ``RemoteFile`` of ``size`` bytes (given: no request; else one HEAD), each read one
    ranged GET (``read_ahead``: see ``RemoteFile``)."""
    if is_url(str(path)):
        return RemoteFile(str(path), size, read_ahead)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(f"{path}: {kind}, not a shard file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def index_shard(path: str | Path) -> ShardIndex:
    """Index a shard from its tar headers; a corrupt or truncated tail ends the index early
    (recorded in ``error``)."""
    keys: list[str] = []
    members: list[dict[str, Member]] = []
    error = None
    try:
        f = open_shard(path, read_ahead=remote.READ_AHEAD)  # (a URL: headers in 64 KiB reads)
    except OSError as e:
        return ShardIndex(str(path), [], [], f"unreadable shard: {e}", unreadable=True)
    try:
        with f, tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError) as e:
                    error = f"corrupt tar after {len(keys)} samples: {e}"
                    break
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                    members.append({})
                members[-1][ext] = Member(info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        return ShardIndex(str(path), [], [], f"unreadable tar: {e}", unreadable=True)
    return ShardIndex(str(path), keys, members, error)


def _padded(n: int) -> int:
    """``n`` rounded up to whole tar blocks."""
    return -(-n // BLOCK) * BLOCK


def _header_matches(buf: bytes, name: str, size: int) -> bool:
    """Whether ``buf`` (512 bytes) is a valid tar header of a regular file ``name`` of ``size``."""
    try:
        info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
    except (tarfile.TarError, ValueError, EOFError):
        return False
    return info.isfile() and info.name == name and info.size == size


class _Stale(Exception):
    """A file index that no longer matches its shard."""


class ShardReader:
    """Reads sample members by (shard path, member number); keeps indexes and file handles.

    A shard's index is read from its index file when the reader first reads from the shard
    (one small read; the tar headers are walked only for a shard without a usable index file,
    with one warning). ``indexes``: indexes already loaded; ``no_index``: shards known to have
    no usable index file (already warned about: walked silently); ``listed``: shard path ->
    (index path, index sha256, shard sha256) from the manifest."""

    def __init__(
        self,
        max_open: int = 16,
        indexes: dict[str, ShardIndex] | None = None,
        no_index: set[str] | None = None,
        listed: dict[str, tuple[str | None, str | None, str | None]] | None = None,
    ):
        self._index: dict[str, ShardIndex] = dict(indexes or {})
        self._no_index = set(no_index or ())
        self._listed = listed or {}
        self._files: dict[str, object] = {}
        self.max_open = max_open

    def index(self, path: str) -> ShardIndex:
        idx = self._index.get(path)
        if idx is None:
            if path not in self._no_index:
                idx, why = load_index(path, *self._listed.get(path, (None, None, None)))
                if idx is None:
                    warn_no_index(path, why)
                    self._no_index.add(path)
            if idx is None:
                idx = index_shard(path)
            if not idx.unreadable:  # an unreadable shard is tried again (it may be back next time)
                self._index[path] = idx
        return idx

    def key(self, path: str, member: int) -> str | None:
        """The key of a member of a shard already indexed (no I/O), else None."""
        idx = self._index.get(path)
        return idx.keys[member] if idx is not None and member < len(idx.keys) else None

    def read(self, path: str, member: int) -> tuple[str, dict[str, bytes]] | None:
        """``(key, {ext: bytes})`` of the ``member``-th sample, or None if the shard lacks it;
        ``(key, {})`` if the file ends inside the sample's data; ``OSError`` if the shard cannot
        be opened or a member is over ``MAX_MEMBER_BYTES``."""
        try:
            return self._read(path, member)
        except _Stale as e:  # the shard changed since its index was written: walk its headers
            log.warning("%s: index %s is stale (%s): reading its tar headers", path, *e.args)
            self._index[path] = idx = index_shard(path)
            self._no_index.add(path)
            if idx.unreadable:
                del self._index[path]
            return self._read(path, member)

    def _read(self, path: str, member: int) -> tuple[str, dict[str, bytes]] | None:
        idx = self.index(path)
        f = self._files.get(path)
        if f is None and (idx.from_file or member < len(idx.keys)):
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()
            try:
                # a URL's size: the one its index was checked against (asked when it was loaded)
                size = idx.bytes if idx.from_file else None
                f = self._files[path] = open_shard(path, size)
            except OSError:
                if idx.from_file:  # gone or replaced since its index was read: forget both
                    self._index.pop(path, None)
                    self._no_index.add(path)
                raise
        file_size = _file_size(f) if f is not None else 0
        if idx.from_file and file_size != idx.bytes:
            raise _Stale(
                remote.basename(index_path(path)), f"shard is {file_size} bytes, not {idx.bytes}"
            )
        if member >= len(idx.keys):
            return None
        key = idx.keys[member]
        members = idx.members[member]
        for ext, m in members.items():
            limit = MAX_MEMBER_BYTES.get(ext, MAX_MEMBER_BYTES["json"])
            if m.size > limit:
                raise OSError(f"{key}.{ext} has {m.size} bytes, over the {limit}-byte limit")
            if m.offset + m.size > file_size:  # a header claiming more than the file holds
                return key, {}
        # one read for the whole sample (a ranged GET on a URL): its members are adjacent in the
        # tar, each after its header (checked too when the index came from a file: is it still
        # there?); members that are not adjacent (an index not written by evav) are read apart
        head = BLOCK if idx.from_file else 0
        spans = {ext: (m.offset - head, m.offset + m.size) for ext, m in members.items()}
        start, end = min(a for a, _ in spans.values()), max(b for _, b in spans.values())
        if end - start <= sum(_padded(m.size) + BLOCK for m in members.values()):
            f.seek(start)
            whole = f.read(end - start)
            if len(whole) != end - start:
                return key, {}
            chunks = {ext: whole[a - start : b - start] for ext, (a, b) in spans.items()}
        else:
            chunks = {}
            for ext, (a, b) in spans.items():
                f.seek(a)
                chunks[ext] = f.read(b - a)
                if len(chunks[ext]) != b - a:
                    return key, {}
        for ext, m in members.items():
            if idx.from_file and not _header_matches(chunks[ext][:BLOCK], f"{key}.{ext}", m.size):
                raise _Stale(
                    remote.basename(index_path(path)), f"no header of {key}.{ext} at its offset"
                )
        return key, {ext: chunk[head:] for ext, chunk in chunks.items()}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _file_size(f) -> int:
    return f.size if isinstance(f, RemoteFile) else os.fstat(f.fileno()).st_size


_URL_PATH = re.compile(r"[A-Za-z0-9._/-]+")


def shard_paths(directory: str | Path, split) -> list[str]:
    """The shard files of a manifest split (``SplitInfo``), checked: inside ``directory``, present.

    ``pipe:`` commands, absolute paths and ``..`` are refused: a manifest names files only.
    A URL ``directory``: the shards are URLs inside it (their path only letters, digits and
    ``._/-``: nothing a URL reads as a query, fragment or escape); they are not asked for here
    (a missing one is a bad sample for each of its samples, as a shard deleted mid-run).
    """
    for sh in split.shards:
        if (
            sh.path.startswith("pipe:")
            or Path(sh.path).is_absolute()
            or ".." in Path(sh.path).parts
        ):
            raise ValueError(
                f"{directory}: manifest lists shard {sh.path!r}; shards must be files "
                "inside the dataset directory (pipe: commands are refused)"
            )
    if is_url(str(directory)):
        for sh in split.shards:
            for rel in (sh.path, sh.index):
                if rel is not None and (not _URL_PATH.fullmatch(rel) or "//" in rel):
                    raise ValueError(
                        f"{directory}: manifest lists shard {rel[:80]!r}; in a URL dataset, "
                        "shard and index paths hold only letters, digits and ._/-"
                    )
        return [remote.join(str(directory), sh.path) for sh in split.shards]
    paths = [str(Path(directory) / sh.path) for sh in split.shards]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: {len(missing)} shard(s) listed in its manifest are missing, e.g. {missing[0]}"
        )
    return paths
