"""Writing a finished dataset to a URL (``evav preprocess ... --out s3://bucket/prefix/ds``).

A build never writes to the store directly: it builds into a local staging folder, exactly the
normal local build (resumable: a killed build reruns into the same folder), then ``publish``
uploads the finished dataset files. The staging folder is ``--stage DIR``, or by default
``stage_dir(url)``: ``$EVAV_CACHE/stage/<sha256 of the URL>`` (``$EVAV_CACHE`` defaults to
``~/.cache/evav``), the same folder for the same URL on every run, so a killed build or upload
resumes from what it had.

What is uploaded: every file of the staged dataset (shards, their ``.idx.json`` indexes, the
wids descriptors, the manifest) except the build's private state (``DIR/.build/``, see
preprocessing/layout.py) and temporary files (any name starting with ``.``).

Order, and why a reader never sees a half dataset: an S3 PUT is atomic (an object becomes
visible only once all its bytes are stored, a multipart upload only when it is completed; a
killed upload leaves no object, or the old one), and ``manifest.json`` is uploaded last, after
every shard and index it lists. A reader opens a dataset by its manifest, so a dataset whose
manifest is visible has all its shards. A dataset already at the URL whose manifest differs
from the new one has that manifest deleted first (its shards are about to be replaced).

Resume: an object already at the URL with the local file's size (and, when its ETag is a plain
MD5, as for any single-part upload, the same MD5) is skipped; a killed upload reruns and sends
only what is missing.

Errors follow evav.data.remote: transient failures are tried again with backoff, and the caller
gets an ``OSError`` naming the URL. ``check_writable`` fails early (before any build work) on a
missing bucket, a store that is down, or a URL scheme that cannot be written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tqdm import tqdm

from evav import faults
from evav.data import remote

MANIFEST = "manifest.json"
STATE = ".build"  # preprocessing.layout.STATE: the build's private files, never uploaded


def stage_dir(url: str) -> Path:
    """The default local staging folder of ``url``: the same on every run (resumable)."""
    cache = os.environ.get("EVAV_CACHE") or str(Path.home() / ".cache" / "evav")
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(cache) / "stage" / digest


def check_writable(url: str) -> None:
    """Refuse, in seconds and before any build work, a URL that cannot be written: a scheme
    other than ``s3://``, the s3fs extra not installed, a missing bucket, a store that is down
    or refuses the credentials (``OSError`` / ``ValueError`` naming the URL)."""
    if remote.protocol(url) != "s3":
        raise ValueError(f"--out {url}: only s3:// URLs can be written (https:// is read-only)")
    why = remote.check_remote(url)
    if why:
        raise ValueError(why)
    bucket = _bucket_key(url)[0]
    if not bucket:
        raise ValueError(f"--out {url}: no bucket in the URL")
    try:
        remote._call(url, lambda fs: fs.call_s3("head_bucket", Bucket=bucket), "reach")
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: bucket {bucket!r} does not exist") from None


def _bucket_key(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1].strip("/")
    bucket, _, key = rest.partition("/")
    return bucket, key


def staged_files(stage: Path) -> list[str]:
    """The dataset files of ``stage`` to upload (relative, sorted), the manifest last."""
    stage = Path(stage)
    files = []
    for p in sorted(stage.rglob("*")):
        rel = p.relative_to(stage)
        if rel.parts[0] == STATE or any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and not p.is_symlink():
            files.append(rel.as_posix())
    if MANIFEST not in files:
        raise ValueError(f"{stage}: no {MANIFEST} (the build is not finished)")
    files.remove(MANIFEST)
    return files + [MANIFEST]


def _remote_objects(url: str) -> dict[str, dict]:
    """Objects below ``url``: relative key -> {size, etag}; {} when there are none."""
    bucket, key = _bucket_key(url)
    prefix = f"{bucket}/{key}".rstrip("/")

    def find(fs):
        try:
            return fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}

    found = remote._call(url, find, "list")
    out = {}
    for path, info in found.items():
        if info.get("type", "file") != "file" or not path.startswith(prefix + "/"):
            continue
        out[path[len(prefix) + 1 :]] = {
            "size": info.get("size"),
            "etag": str(info.get("ETag") or "").strip('"'),
        }
    return out


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _same(local: Path, obj: dict | None) -> bool:
    """Whether the object already holds ``local``'s bytes: same size and, where its ETag is a
    plain MD5 (a single-part upload), the same MD5."""
    if obj is None or obj["size"] != local.stat().st_size:
        return False
    etag = obj["etag"]
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower()):
        return etag.lower() == _md5(local)
    return True  # a multipart ETag is no MD5 of the content: the size has to do


class Published:
    def __init__(self, url: str):
        self.url = url
        self.uploaded: list[str] = []
        self.skipped: list[str] = []
        self.bytes = 0  # uploaded

    def line(self) -> str:
        skipped = f" ({len(self.skipped)} already there, skipped)" if self.skipped else ""
        n = len(self.uploaded)
        return (
            f"published {n} file{'' if n == 1 else 's'} ({self.bytes / 2**20:.1f} MiB) "
            f"to {self.url}{skipped}"
        )


def publish(stage: str | Path, url: str, progress: bool | None = None) -> Published:
    """Upload the finished dataset in ``stage`` to ``url``, the manifest last (see the module
    docstring); objects already there with the same bytes are skipped."""
    stage, url = Path(stage), url.rstrip("/")
    files = staged_files(stage)
    there = _remote_objects(url)
    out = Published(url)
    manifest = stage / MANIFEST
    if MANIFEST in there and not _same(manifest, there[MANIFEST]):
        # another dataset is there: hide it before its shards are replaced
        murl = remote.join(url, MANIFEST)
        remote._call(murl, lambda fs: fs.rm_file(murl), "delete")
        del there[MANIFEST]
        print(f"{murl}: replaced by the new build (deleted before the upload)")
    todo = []
    for rel in files:
        if _same(stage / rel, there.get(rel)):
            out.skipped.append(rel)
        else:
            todo.append(rel)
    total = sum((stage / rel).stat().st_size for rel in todo)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"upload {len(todo)} files",
        dynamic_ncols=True,
        disable=None if progress is None else not progress,
    )
    with bar:
        for n, rel in enumerate(todo):
            if faults.active("kill_in_publish", n):  # the crash-safety test's kill
                os.kill(os.getpid(), 9)
            local, dest = stage / rel, remote.join(url, rel)
            remote._call(dest, lambda fs, a=str(local), b=dest: fs.put_file(a, b), "write")
            size = local.stat().st_size
            out.uploaded.append(rel)
            out.bytes += size
            bar.update(size)
    return out
