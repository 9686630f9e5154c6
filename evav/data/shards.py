"""Random access into tar shards: an index of sample members, built from the tar headers alone.

A shard is a plain (uncompressed) tar of ``KEY.mp4`` + ``KEY.json`` pairs. Indexing walks the
512-byte headers with seeks (no member data is read), groups members by key in file order, and
records each member's data offset and size; a sample is then two seeks and two reads. A tar cut
short just has fewer samples: the caller compares the count with the manifest.

Shards are opened without blocking and only when they are regular files: a shard replaced by a
FIFO would otherwise hang the reader in ``open`` (where no signal handler gets to run), and a
directory or device is no tar. A member larger than ``MAX_MEMBER_BYTES`` is refused before it is
read (a forged header must not make the reader allocate gigabytes). A failure is an ``OSError``,
an index with ``error`` set, or a read with no members (the file ends inside the sample); the
loader turns each into a skipped, counted sample.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

# The largest member read: far above any clip evav writes (a 1024x1024 FFV1 clip of 64 frames is
# ~150 MiB) and any metadata (a few KiB), far below what would exhaust a loader worker's memory.
MAX_MEMBER_BYTES = {"json": 16 * 2**20, "mp4": 2**30}


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


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.mp4`` -> (``dir/abc``, ``mp4``) (webdataset convention: first dot of the basename)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def open_shard(path: str | Path) -> io.BufferedReader:
    """Open a shard for reading; ``OSError`` unless it is a regular file (never blocks on a FIFO)."""
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
    """Index a shard; a corrupt or truncated tail ends the index early (recorded in ``error``)."""
    keys: list[str] = []
    members: list[dict[str, Member]] = []
    error = None
    try:
        f = open_shard(path)
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


class ShardReader:
    """Reads sample members by (shard path, member number); keeps indexes and file handles."""

    def __init__(self, max_open: int = 16):
        self._index: dict[str, ShardIndex] = {}
        self._files: dict[str, object] = {}
        self.max_open = max_open

    def index(self, path: str) -> ShardIndex:
        idx = self._index.get(path)
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
        idx = self.index(path)
        if member >= len(idx.keys):
            return None
        key = idx.keys[member]
        f = self._files.get(path)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[path] = open_shard(path)
        out = {}
        file_size = os.fstat(f.fileno()).st_size
        for ext, m in idx.members[member].items():
            limit = MAX_MEMBER_BYTES.get(ext, MAX_MEMBER_BYTES["json"])
            if m.size > limit:
                raise OSError(f"{key}.{ext} has {m.size} bytes, over the {limit}-byte limit")
            if m.offset + m.size > file_size:  # a header claiming more than the file holds
                return key, {}
            f.seek(m.offset)
            data = f.read(m.size)
            if len(data) != m.size:
                return key, {}
            out[ext] = data
        return key, out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def shard_paths(directory: str | Path, split) -> list[str]:
    """The shard files of a manifest split (``SplitInfo``), checked: inside ``directory``, present.

    ``pipe:`` commands, absolute paths and ``..`` are refused: a manifest names files only.
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
    paths = [str(Path(directory) / sh.path) for sh in split.shards]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: {len(missing)} shard(s) listed in its manifest are missing, e.g. {missing[0]}"
        )
    return paths
