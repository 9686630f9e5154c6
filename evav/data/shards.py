"""Random access into tar shards: an index of sample members, built from the tar headers alone.

A shard is a plain (uncompressed) tar of ``KEY.mp4`` + ``KEY.json`` pairs. Indexing walks the
512-byte headers with seeks (no member data is read), groups members by key in file order, and
records each member's data offset and size; a sample is then two seeks and two reads. A tar cut
short just has fewer samples: the caller compares the count with the manifest.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path


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


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.mp4`` -> (``dir/abc``, ``mp4``) (webdataset convention: first dot of the basename)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def index_shard(path: str | Path) -> ShardIndex:
    """Index a shard; a corrupt or truncated tail ends the index early (recorded in ``error``)."""
    keys: list[str] = []
    members: list[dict[str, Member]] = []
    error = None
    try:
        with tarfile.open(path, mode="r:") as tar:
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
    except (tarfile.TarError, OSError) as e:
        error = f"unreadable tar: {e}"
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
            idx = self._index[path] = index_shard(path)
        return idx

    def read(self, path: str, member: int) -> tuple[str, dict[str, bytes]] | None:
        """``(key, {ext: bytes})`` of the ``member``-th sample, or None if the shard lacks it."""
        idx = self.index(path)
        if member >= len(idx.keys):
            return None
        f = self._files.get(path)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[path] = open(path, "rb")
        out = {}
        for ext, m in idx.members[member].items():
            f.seek(m.offset)
            data = f.read(m.size)
            if len(data) != m.size:
                return idx.keys[member], {}
            out[ext] = data
        return idx.keys[member], out

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
