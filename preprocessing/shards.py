"""Write one shard: a plain tar of ``KEY.json`` + ``KEY.mp4`` pairs and its index, atomically
and reproducibly.

The tar is written by webdataset's ``TarWriter`` (its key and extension conventions: a sample
``{"__key__": KEY, EXT: bytes}`` becomes members ``KEY.EXT``, in sorted extension order) under a
temporary dot-name in the same folder, flushed to disk, then renamed to ``shard-NNNNNN.tar``: a
reader (or a rerun after a kill) never sees a partial shard under its final name. Member headers
carry fixed metadata (mtime 0, uid/gid 0, no user or group name, mode 0644), so the same samples
always give the same bytes.

Beside it goes its index, ``shard-NNNNNN.tar.idx.json`` (evav.data.shards: every sample's
member offsets and sizes, and the shard's size and sha256), also written under a temporary name
and renamed, after the shard: readers seek straight to a member instead of walking tar headers.
webdataset and evav.data.shards read the tars as they are.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from webdataset import TarWriter

from evav.data.shards import BLOCK, encode_index, index_path, split_key


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def temp_name(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.tmp-{tag}")


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


class ShardWriter:
    """``with ShardWriter(path, tag) as w: w.add(key, {"mp4": b, "json": b})``; renamed on exit,
    with its index beside it. After the block: ``bytes`` and ``sha256`` of the shard,
    ``index`` (its path) and ``index_sha256``.

    If the block raises, the temporary files are removed and nothing appears under ``path``.
    """

    def __init__(self, path: str | Path, tag: str):
        self.path = Path(path)
        self.tmp = temp_name(self.path, tag)
        self.index = index_path(self.path)
        self.index_tmp = temp_name(self.index, tag)
        self.samples = 0
        self.bytes = 0
        self.sha256 = self.index_sha256 = ""
        self._entries: list[tuple[str, dict[str, tuple[int, int]]]] = []

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")
        self._tar = TarWriter(
            self._file, user="", group="", mode=0o644, encoder=False, keep_meta=False, mtime=0
        )
        return self

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext in members:
            if ext.startswith("_") or split_key(f"{key}.{ext}") != (key, ext):
                raise ValueError(f"{key}.{ext}: not a webdataset key and extension")
        start = self._tar.tarstream.offset
        self._tar.write({"__key__": key, **members})
        # TarWriter writes the members in sorted extension order, each a 512-byte USTAR header
        # (it refuses names that need more) then its data padded to whole blocks
        pos, entry = start, {}
        for ext in sorted(members):
            entry[ext] = (pos + BLOCK, len(members[ext]))
            pos += BLOCK + _blocks(len(members[ext]))
        if pos != self._tar.tarstream.offset:
            raise RuntimeError(f"{self.tmp}: unexpected tar layout at {key}")
        self._entries.append((key, entry))
        self.samples += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                self._tar.close()
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
            if exc_type is None:
                self.bytes = self.tmp.stat().st_size
                self.sha256 = file_sha256(self.tmp)
                data = encode_index(self.path.name, self.bytes, self.sha256, self._entries)
                with open(self.index_tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.index_sha256 = hashlib.sha256(data).hexdigest()
                # the index first: a shard under its final name (what a resumed build counts as
                # done) always has its index beside it
                self.index_tmp.replace(self.index)
                self.tmp.replace(self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
            self.index_tmp.unlink(missing_ok=True)


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
