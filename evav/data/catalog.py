"""The catalog: what a loader knows of its datasets before it reads a sample (the manifests, each
split's shard list, every shard's index), read once and handed on, never re-read per rank or per
worker.

    catalog = read_catalog(dirs, ["train", "val"])          # one process reads
    Loader(cfg, split="train", ..., catalog=catalog)        # every rank, every worker, reuses

Who reads: in training, rank 0 alone (``evav.distributed.from_main`` gives the other ranks its
catalog, or its exception, over the host group), so a job of R ranks x W loader workers reads
each manifest and each index once, not R x W times; a rank's DataLoader workers inherit the
catalog with the loader (fork). A loader built without one reads its own (one process, once).
docs/benchmarks.md (loader start-up) has the file operations before and after.

What it checks is what the readers checked before: a manifest as ``load_manifest`` does, shard
paths as ``shard_paths`` does (inside the dataset, present), and each index against its shard's
size and the manifest's sha256s (``load_index``). A shard whose index is missing or refused is
warned about once and listed in ``no_index``: its readers walk its tar headers. A shard URL that
cannot be asked for its size now (gone, the store failing) is left out of both: a reader tries
again when it gets there, and a failure then is a skipped sample, as for a shard deleted mid-run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from evav.config import ConfigError
from evav.data.remote import check_remote, is_url, join
from evav.data.shards import ShardIndex, load_index, shard_paths, warn_no_index
from evav.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)


@dataclass
class Catalog:
    dirs: list[str]  # the dataset directories (or URLs), as data.train lists them
    manifests: list[Manifest]
    paths: dict[tuple[int, str], list[str]]  # (dataset number, split) -> its shard paths
    # shard path -> (index path, index sha256, shard sha256) as its manifest lists them
    listed: dict[str, tuple[str | None, str | None, str | None]] = field(default_factory=dict)
    indexes: dict[str, ShardIndex] = field(default_factory=dict)  # shard path -> its index
    no_index: set[str] = field(default_factory=set)  # shards read by walking their headers
    seconds: float = 0.0  # how long reading took

    def summary(self) -> str:
        shards = sum(len(p) for p in self.paths.values())
        return (
            f"{len(self.dirs)} dataset(s), {shards} shards, {len(self.indexes)} indexes read in "
            f"{self.seconds:.2f} s"
            + (f" ({len(self.no_index)} without a usable index)" if self.no_index else "")
        )


def read_catalog(dirs, splits) -> Catalog:
    """Manifests of ``dirs`` and, for each of ``splits`` a manifest has, its shards' indexes."""
    t0 = time.perf_counter()
    dirs = [str(d) for d in dirs]
    for d in dirs:  # shell-command URLs: the reader seeks into files, it never runs pipes
        if d.startswith("pipe:"):
            raise ValueError(f"data.train entry {d!r} is a shell command (pipe:); give a directory")
        if is_url(d):  # s3:// and https:// need the remote extra: refused here, once
            why = check_remote(d)
            if why:
                raise ConfigError(f"data.train entry {why}")
    cat = Catalog(dirs, [load_manifest(d) for d in dirs], {})
    for n, (d, m) in enumerate(zip(dirs, cat.manifests)):
        for split in dict.fromkeys(splits):
            if split not in m.splits:
                continue
            s = m.splits[split]
            cat.paths[(n, split)] = paths = shard_paths(d, s)
            for p, sh in zip(paths, s.shards):
                cat.listed[p] = (
                    join(d, sh.index) if sh.index else None,
                    sh.index_sha256,
                    sh.sha256,
                )
                try:
                    idx, why = load_index(p, *cat.listed[p])
                except OSError as e:  # a shard URL the store will not size now: read it later
                    log.warning("%s: not indexed now (%s); its readers will try again", p, e)
                    continue
                if idx is None:
                    warn_no_index(p, why)
                    cat.no_index.add(p)
                else:
                    cat.indexes[p] = idx
    cat.seconds = time.perf_counter() - t0
    return cat
