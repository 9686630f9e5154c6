"""Write one shard: a plain tar of ``KEY.mp4`` + ``KEY.json`` pairs, atomically and reproducibly.

The tar is written under a temporary dot-name in the same folder, flushed to disk, then renamed
to ``shard-NNNNNN.tar``: a reader (or a rerun after a kill) never sees a partial shard under its
final name. Member headers carry fixed metadata (mtime 0, uid 0, mode 0644), so the same samples
always give the same bytes. webdataset and evav.data.shards read these tars as they are.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def temp_name(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.tmp-{tag}")


class ShardWriter:
    """``with ShardWriter(path, tag) as w: w.add(key, {"mp4": b, "json": b})``; renamed on exit.

    If the block raises, the temporary file is removed and nothing appears under ``path``.
    """

    def __init__(self, path: str | Path, tag: str):
        self.path = Path(path)
        self.tmp = temp_name(self.path, tag)
        self.samples = 0

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if exc_type is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def iter_members(
    path: str | Path, exts: tuple[str, ...] = ("json",)
) -> Iterator[tuple[str, str, bytes]]:
    """``(key, ext, bytes)`` for the members of a shard with one of ``exts`` (others skipped)."""
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rpartition("/")[2]
            key, _, ext = base.partition(".")
            if ext in exts:
                f = tar.extractfile(info)
                assert f is not None
                yield key, ext, f.read()
