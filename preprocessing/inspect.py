"""`evav inspect`: what is in a shard folder or a single tar, a look at a few samples, and a check
of every byte of it (``--verify``).

Counts per split and task, the frame-count histogram, bytes and the codec, from the samples'
metadata (so it also works on a lone tar without its manifest); the manifest's quarantine count
when there is one, and a warning when the samples found differ from the manifest's counts or a
``KEY.json`` is unreadable (counted, never a crash). ``write_examples`` saves N random samples as
a PNG contact sheet (one row per sample: task | inputs | separator | answer) or a GIF (the clips
one after another).

``verify`` (``evav inspect DIR --verify``) checks what a reader will meet, shard by shard: the
file is there, its size and sha256 are the manifest's, the tar reads to its end-of-archive marker
with nothing but zeros after it, it holds the manifest's number of complete samples and frames;
and sample by sample, with the loader's own checks (``evav.data.clips.checked_meta`` and
``decode``, PyAV with FFmpeg's error log): both members present, ``KEY.json`` well formed, the
clip's sha256 and render hash, a clean decode to ``num_frames`` frames of the dataset's frame size,
the key and split in ``KEY.json`` matching the sample's place, keys unique per split. A lone tar
(no manifest) gets every check that needs no manifest. Each problem is counted under its reason
(``REASONS``); the first ones are listed as ``SHARD KEY: reason: detail``.

A dataset URL (``s3://bucket/prefix/ds``, ``https://...``, evav.data.remote) is inspected the
same way: its manifest names the shards (a URL is never listed, so it needs its manifest, or
names one ``.tar``); the summary reads each shard's tar headers and its ``KEY.json`` members
(ranged reads; no clip is fetched but the one ``--out`` shows, or the first when the codec must
be probed), and ``--verify`` downloads each shard in turn to a temporary file and checks it as a
local one, under the manifest's name for it.
"""

from __future__ import annotations

import random
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from evav.codec import probe
from evav.data import remote
from evav.data.clips import BadSample, checked_meta, crop_window, decode
from evav.data.remote import is_url
from evav.data.shards import Member, ShardIndex, index_shard, open_shard
from evav.errors import one_line
from evav.frames import contact_sheet, save_clip
from evav.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    clip_checksum,
    load_manifest,
    parse_sample_meta,
)
from preprocessing.shards import file_sha256

# Every reason a problem is counted under, shard-level first, in the order of the summary.
REASONS = (
    "bad manifest",  # manifest.json fails its checks (the shards are then verified as lone tars)
    "missing shard",  # a shard the manifest lists is not a file
    "size",  # the file's size differs from the manifest's bytes
    "sha256",  # the file's sha256 differs from the manifest's
    "corrupt tar",  # a header does not parse, or a member's data runs past the end of the file
    "end of archive",  # no end-of-archive marker (cut short), or data after it
    "sample count",  # complete samples in the shard differ from the manifest's count
    "frame total",  # the samples' num_frames sum differs from the manifest's frames
    "truncated member",  # a member's data is cut short by the end of the file
    "missing member",  # a key without its KEY.mp4 or KEY.json
    "bad metadata",  # KEY.json fails parse_sample_meta
    "clip checksum",  # KEY.mp4 bytes differ from clip_sha256
    "render hash",  # rendered with a RenderSpec other than the dataset's
    "key",  # KEY.json names another key than its members
    "split",  # KEY.json names another split than the one the sample is in
    "duplicate key",  # a key seen before in the same split
    "decode",  # FFmpeg reports errors, or nothing decodes
    "frame count",  # decoded frames differ from num_frames
    "frame size",  # decoded frame size differs from the dataset's
)


Shard = Path | str  # a local file, or a URL (str)
CLIP_FRAMES = (8, 16, 32)  # data.clip_frames values the summary shows the crop shares for
DOWNLOAD_CHUNK = 8 * 2**20  # --verify of a URL: bytes per ranged GET of the download


@dataclass
class Report:
    shards: list[Shard]
    manifest: Manifest | None = None
    samples: dict[tuple[str, str], int] = field(default_factory=Counter)  # (split, task) -> n
    frames_hist: Counter = field(default_factory=Counter)  # frames per clip -> n
    keys: list[tuple[Shard, str]] = field(default_factory=list)
    bytes: int = 0
    codec: str = ""
    bad_meta: int = 0  # samples whose KEY.json is missing or fails parse_sample_meta
    warnings: list[str] = field(default_factory=list)
    # (data.clip_frames, "cropped" | "too_long") -> samples, for CLIP_FRAMES (crop_window)
    crops: Counter = field(default_factory=Counter)
    # (split, task) -> answer -> n: the answer distribution and its majority baseline
    answers: dict[tuple[str, str], Counter] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"{len(self.shards)} shard(s), {self.bytes / 2**20:.1f} MiB, codec {self.codec}"]
        if self.manifest is not None:
            m = self.manifest
            lines.append(f"builder {m.builder} v{m.builder_version}, render hash {m.render_hash}")
            lines.append(f"quarantined inputs: {len(m.quarantined)}")
        lines.append(
            "samples per split and task; answers: distinct, the majority one and its share "
            "(the majority baseline), chance (1 / distinct):"
        )
        for (split, task), n in sorted(self.samples.items()):
            lines.append(f"  {split:8s} {task:16s} {n:8d}  {self._answers(split, task, n)}")
        lines.append("frames per clip: count")
        width = max(self.frames_hist.values(), default=1)
        for t, n in sorted(self.frames_hist.items()):
            lines.append(f"  {t:4d}: {n:7d} {'#' * max(1, round(40 * n / width))}")
        total = sum(self.frames_hist.values())
        if total:
            lines.append(
                "longer than data.clip_frames (kept: task frame(s), answer, middle of input):"
            )
            for c in CLIP_FRAMES:
                cut, refused = self.crops[(c, "cropped")], self.crops[(c, "too_long")]
                more = (
                    f", {refused / total:.1%} too long to keep task and answer" if refused else ""
                )
                lines.append(f"  clip_frames={c:<3d} {cut / total:6.1%} cropped{more}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _answers(self, split: str, task: str, n: int) -> str:
        got = self.answers.get((split, task), Counter())
        named = sum(v for a, v in got.items() if a)
        if not named:
            return "no answer text (pretraining or frame answers)"
        ((top, k),) = got.most_common(1)
        return (
            f"{len(got)} answers, majority {one_line(top, 24)!r} {k / n:.1%}, "
            f"chance {1 / len(got):.1%}"
        )


# -- local files and URLs alike -----------------------------------------------------------------
def _as_path(path: str | Path) -> Shard:
    return str(path).rstrip("/") if is_url(str(path)) else Path(path)


def _is_file(shard: Shard) -> bool:
    if isinstance(shard, str):
        try:
            remote.size(shard)
        except FileNotFoundError:
            return False
        return True
    return shard.is_file()


def _size(shard: Shard) -> int:
    return remote.size(shard) if isinstance(shard, str) else shard.stat().st_size


def _ident(shard: Shard) -> Shard:
    """What names the same file however it was reached (a resolved path; a URL as it is)."""
    return shard if isinstance(shard, str) else shard.resolve()


def _root(path: Shard, is_tar: bool) -> Shard:
    """The dataset folder of ``path``: itself, or for a tar, the folder above its split's."""
    if not is_tar:
        return path
    return path.rsplit("/", 2)[0] if isinstance(path, str) else path.parent.parent


def _join(root: Shard, rel: str) -> Shard:
    return remote.join(root, rel) if isinstance(root, str) else root / rel


def _url_target(url: str) -> tuple[bool, Manifest | None]:
    """A URL to inspect: (whether it names one tar, the manifest of its dataset or None)."""
    if url.endswith(".tar"):
        if not _is_file(url):
            raise ValueError(f"{url}: no such object")
        root = _root(url, True)
        has = _is_file(remote.join(root, MANIFEST_NAME))
        return True, load_manifest(root, False) if has else None
    if url.rsplit("/", 1)[-1].startswith("shard-"):
        raise ValueError(f"{url}: expected a .tar shard or a dataset folder with {MANIFEST_NAME}")
    return False, load_manifest(url, False)  # a URL is not listed: it needs its manifest


def _download(url: str, size: int, dest: Path) -> Path:
    """``url``'s ``size`` bytes to ``dest``, in ranged GETs of ``DOWNLOAD_CHUNK``."""
    with open(dest, "wb") as f:
        at = 0
        while at < size:
            data = remote.read_range(url, at, min(DOWNLOAD_CHUNK, size - at))
            if not data:
                break  # shorter than its HEAD said: the size check reports it
            f.write(data)
            at += len(data)
    return dest


def find_shards(path: str | Path) -> tuple[list[Shard], Manifest | None]:
    """Shards under ``path`` (a dataset dir, a split dir or one tar) and the manifest if any.

    The manifest is checked as data only (``check_files=False``): a shard that does not match
    it is what inspect reports, not a reason to stop."""
    path = _as_path(path)
    if isinstance(path, str):
        is_tar, manifest = _url_target(path)
        if is_tar:
            return [path], manifest
        return [remote.join(path, sh.path) for s in manifest.splits.values() for sh in s.shards], (
            manifest
        )
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".tar":
            raise ValueError(f"{path}: expected a .tar shard or a folder of shards")
        root = path.parent.parent
        manifest = load_manifest(root, False) if (root / MANIFEST_NAME).is_file() else None
        return [path], manifest
    if (path / MANIFEST_NAME).is_file():
        m = load_manifest(path, False)
        return [path / sh.path for s in m.splits.values() for sh in s.shards], m
    shards = sorted(path.rglob("shard-*.tar"))
    if not shards:
        raise ValueError(f"{path}: no manifest.json and no shard-*.tar files below it")
    return shards, None


def inspect(path: str | Path) -> Report:
    """Counts from every ``KEY.json``; unreadable shards and metadata become warnings."""
    shards, manifest = find_shards(path)
    report = Report(shards, manifest)
    listed = _listed(manifest, path)
    first_mp4 = None
    missing, short, corrupt, bad_example = [], [], [], ""
    counted = expected = 0
    for shard in shards:
        info = listed.get(_ident(shard))
        label = info[1].path if info is not None else str(shard)
        if not _is_file(shard):
            missing.append(label)
            expected += info[1].samples if info else 0
            continue
        size = _size(shard)
        report.bytes += size
        idx = index_shard(shard)
        n = 0
        # a URL: only the metadata is fetched (and one clip, when the codec must be probed)
        want = {"json"} if isinstance(shard, str) and (manifest or first_mp4) else None
        for key, members, problem in _read_samples(shard, idx, size, want):
            if problem is not None:  # cut short by the end of the file: in the count warning
                continue
            n += 1
            first_mp4 = first_mp4 or members.get("mp4")
            try:
                if "json" not in members:
                    raise ValueError("no KEY.json")
                meta = parse_sample_meta(members["json"], "KEY.json")
            except ValueError as e:
                report.bad_meta += 1
                bad_example = bad_example or f"{label} {key}: {e}"
                continue
            report.samples[(meta.split, meta.task)] += 1
            report.answers.setdefault((meta.split, meta.task), Counter())[meta.answer] += 1
            report.frames_hist[meta.num_frames] += 1
            for c in CLIP_FRAMES:
                try:
                    if crop_window(meta, meta.num_frames, c, 0, key) != [(0, meta.num_frames)]:
                        report.crops[(c, "cropped")] += 1
                except BadSample:
                    report.crops[(c, "too_long")] += 1
            report.keys.append((shard, key))
        counted += n
        if idx.error:
            corrupt.append(f"{label}: {idx.error}")
        if info is not None:
            expected += info[1].samples
            if n != info[1].samples:
                short.append(f"{label} has {n}, the manifest says {info[1].samples}")
    if manifest is not None:
        report.codec = manifest.codec
    elif first_mp4 is not None:
        try:
            report.codec = probe(first_mp4)
        except ValueError as e:
            report.codec = f"unknown ({e})"
    if missing:
        report.warnings.append(f"{len(missing)} shard(s) missing, e.g. {missing[0]}")
    if corrupt:
        report.warnings.append(f"{len(corrupt)} shard(s) unreadable to the end, e.g. {corrupt[0]}")
    if listed and (short or counted != expected):
        report.warnings.append(
            f"{counted} complete samples found, the manifest says {expected}"
            + (f"; {len(short)} shard(s) differ, e.g. {short[0]}" if short else "")
            + "; run `evav inspect --verify` for every problem"
        )
    if report.bad_meta:
        report.warnings.append(
            f"{report.bad_meta} sample(s) with unreadable metadata, e.g. {bad_example}"
        )
    return report


def write_examples(report: Report, out: str | Path, num: int = 8, seed: int = 0) -> Path:
    """N random samples to ``out``: ``.png`` (a row per sample) or ``.gif`` (clip after clip)."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".gif"):
        raise ValueError(f"{out}: --out must end in .png or .gif")
    if not report.keys:
        raise ValueError("no samples to show")
    picks = sorted(random.Random(seed).sample(report.keys, min(num, len(report.keys))))
    wanted: dict[Shard, set[str]] = {}
    for shard, key in picks:
        wanted.setdefault(shard, set()).add(key)
    clips = []
    for shard, keys in wanted.items():
        for key, members, _ in _read_samples(shard, index_shard(shard), keys=keys):
            if key in keys:
                try:  # the loader's checks: a corrupt clip is an error here, never a crash
                    checked_meta(members)
                    clips.append(decode(members["mp4"], "pyav"))
                except BadSample as e:
                    raise ValueError(f"{shard} {key}: {e}") from None
    if out.suffix.lower() == ".gif":
        return save_clip(np.concatenate(clips), out, fps=2)
    columns = max(len(c) for c in clips)
    rows = [contact_sheet(c, columns=columns) for c in clips]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=96) for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    Image.fromarray(np.concatenate(rows)).save(tmp)
    tmp.replace(out)
    return out


# -- reading ----------------------------------------------------------------------------------
def _listed(manifest: Manifest | None, path: str | Path) -> dict[Shard, tuple[str, ShardInfo]]:
    """Resolved shard file -> (split, its manifest entry), for the manifest found at ``path``."""
    if manifest is None:
        return {}
    path = _as_path(path)
    if isinstance(path, str):
        root = _root(path, path.endswith(".tar"))
    else:
        root = path.parent.parent if path.is_file() else path
    return {
        _ident(_join(root, sh.path)): (split, sh)
        for split, s in manifest.splits.items()
        for sh in s.shards
    }


def _read_samples(
    shard: Shard,
    idx: ShardIndex,
    size: int | None = None,
    want: set[str] | None = None,
    keys: set[str] | None = None,
):
    """``(key, {ext: bytes}, problem)`` per indexed sample; ``problem`` is (reason, detail) when a
    member's data runs past the end of the file (its bytes are then left out, never read).
    ``want``: read only members of these extensions (the others are checked against the size,
    never read); ``keys``: only these samples."""
    size = _size(shard) if size is None else size
    with open_shard(shard, size) as f:
        for key, members in zip(idx.keys, idx.members):
            if keys is not None and key not in keys:
                continue
            out, problem = {}, None
            for ext, m in members.items():
                if want is not None and ext not in want:
                    if m.offset + m.size > size:
                        data = None
                    else:
                        continue
                else:
                    data = _read_member(f, m, size)
                if data is None:
                    problem = (
                        "truncated member",
                        f"{key}.{ext} holds {max(0, size - m.offset)} of its {m.size} bytes "
                        "(the shard is cut short)",
                    )
                else:
                    out[ext] = data
            yield key, out, problem


def _read_member(f, m: Member, size: int) -> bytes | None:
    # a header's size is data from disk: check it against the file before reading that much
    if m.offset + m.size > size:
        return None
    f.seek(m.offset)
    data = f.read(m.size)
    return data if len(data) == m.size else None


def _archive_end(shard: Path, size: int) -> str | None:
    """What is wrong after the last member: no end-of-archive marker, or non-zero bytes."""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for _ in tar:
                pass
            end = tar.offset  # where the header walk stopped: the end-of-archive marker
    except (tarfile.TarError, OSError, EOFError):
        return None  # index_shard's error says it
    with open(shard, "rb") as f:
        f.seek(end)
        at = end
        while block := f.read(1 << 20):
            rest = block.lstrip(b"\0")
            if rest:
                return (
                    f"{size - end} bytes after the last member are not all zero "
                    f"(data at byte {at + len(block) - len(rest)}, after the end-of-archive marker)"
                )
            at += len(block)
    if size - end < 1024:  # two zero blocks end every tar that was closed
        return f"no end-of-archive marker (the file ends {size - end} bytes after its last member)"
    return None


# -- verify -----------------------------------------------------------------------------------
@dataclass
class Problem:
    shard: str
    key: str  # "" for a problem of the whole shard
    reason: str  # one of REASONS
    detail: str

    def line(self) -> str:
        # names and messages come from the data: one problem stays one printable line
        key = self.key if self.key.isprintable() and " " not in self.key else repr(self.key)
        detail = " ".join(self.detail.split())
        return f"{self.shard}{' ' + key if key else ''}: {self.reason}: {detail}"


@dataclass
class Verification:
    """What ``verify`` found: counts per reason, and the first ``keep`` problems themselves."""

    shards: int = 0  # shards checked (listed, or found without a manifest)
    samples: int = 0  # samples read from them
    counts: Counter = field(default_factory=Counter)  # reason -> problems
    problems: list[Problem] = field(default_factory=list)  # the first `keep`
    keep: int = 50

    @property
    def ok(self) -> bool:
        return not self.counts

    def add(self, shard: str, key: str, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.counts[reason] += 1
        if len(self.problems) < self.keep:
            self.problems.append(Problem(shard, key, reason, detail))

    def text(self) -> str:
        lines = [p.line() for p in self.problems]
        more = sum(self.counts.values()) - len(self.problems)
        if more:
            lines.append(f"... and {more} more")
        lines.append(f"verified {self.shards} shard(s), {self.samples} sample(s)")
        if self.ok:
            lines.append("no problems found")
        else:
            lines.append(f"{sum(self.counts.values())} problem(s):")
            lines += [f"  {r:16s} {self.counts[r]:8d}" for r in REASONS if self.counts[r]]
        return "\n".join(lines)


def verify(path: str | Path, progress: bool | None = None, keep: int = 50) -> Verification:
    """Check every shard and sample at ``path`` (see the module docstring); never raises on bad
    data, only on a path that holds no shards. ``progress``: tqdm bar on stderr (None: if a
    TTY)."""
    path = _as_path(path)
    v = Verification(keep=keep)
    if isinstance(path, str):
        is_tar, _ = _url_target(path)  # (the manifest is loaded again below, checked)
        root = _root(path, is_tar)
    else:
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix != ".tar":
            raise ValueError(f"{path}: expected a .tar shard or a folder of shards")
        is_tar, root = path.is_file(), path.parent.parent if path.is_file() else path
    manifest = None
    if _is_file(_join(root, MANIFEST_NAME)):
        try:  # shard files are this function's to judge, one by one: check_files=False
            manifest = load_manifest(root, check_files=False)
        except ValueError as e:  # say so, then check the shards as lone tars
            v.add(MANIFEST_NAME, "", "bad manifest", str(e))
    if is_tar:
        shards = [path]
    elif manifest is not None:
        shards = [_join(root, sh.path) for s in manifest.splits.values() for sh in s.shards]
    elif isinstance(path, str):
        raise ValueError(f"{path}: its manifest is unreadable, and a URL cannot be listed")
    else:
        shards = sorted(path.rglob("shard-*.tar"))
        if not shards:
            raise ValueError(f"{path}: no manifest.json and no shard-*.tar files below it")
    listed = _listed(manifest, path)
    targets = []
    for shard in shards:
        split, info = listed.get(_ident(shard), (None, None))
        label = info.path if info is not None else str(shard)
        idx = index_shard(shard) if info is None and _is_file(shard) else None
        targets.append((shard, label, split, info, idx))
    # the bar's total: the manifest's counts, else the headers' (indexing reads no data)
    total = sum(info.samples if info else len(idx.keys) if idx else 0 for *_, info, idx in targets)
    seen: dict[str, dict[str, str]] = {}  # split -> key -> shard label where it was first seen
    bar = tqdm(
        total=total, unit="sample", desc="verify", file=sys.stderr, disable=_disabled(progress)
    )
    with bar:
        for shard, label, split, info, idx in targets:
            v.shards += 1
            _verify_shard(v, shard, label, split, info, idx, manifest, seen, bar)
    return v


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _verify_shard(v, shard, label, split, info, idx, manifest, seen, bar) -> None:
    if isinstance(shard, str):  # a URL: downloaded, then checked as a local file
        try:
            size = remote.size(shard)
        except FileNotFoundError:
            v.add(label, "", "missing shard", f"{shard} is not in the store")
            return
        with tempfile.TemporaryDirectory(prefix="evav-verify-") as tmp:
            local = _download(shard, size, Path(tmp) / remote.basename(shard))
            _verify_shard(v, local, label, split, info, idx, manifest, seen, bar)
        return
    if not shard.is_file():
        v.add(label, "", "missing shard", f"{shard} is not a file")
        return
    size = shard.stat().st_size
    if info is not None and size != info.bytes:
        v.add(label, "", "size", f"{size} bytes, the manifest says {info.bytes}")
    if info is not None:
        digest = file_sha256(shard)  # streamed, 1 MiB at a time
        if digest != info.sha256:
            v.add(label, "", "sha256", f"{digest}, the manifest says {info.sha256}")
    idx = idx or index_shard(shard)
    if idx.error:
        v.add(label, "", "corrupt tar", idx.error)
    else:
        end = _archive_end(shard, size)
        if end:
            v.add(label, "", "end of archive", end)
    render_hash = manifest.render_hash if manifest is not None else None
    frame_hw = manifest.frame_size if manifest is not None else None
    complete = frames = 0
    all_meta = True
    for key, members, problem in _read_samples(shard, idx):
        v.samples += 1
        bar.update(1)
        if problem is not None:
            v.add(label, key, *problem)
            all_meta = False
            continue
        complete += 1
        meta = _verify_sample(v, label, key, members, split, render_hash, frame_hw)
        if meta is None:
            all_meta = False
            continue
        frames += meta.num_frames
        keys = seen.setdefault(split or meta.split, {})
        if key in keys:
            v.add(label, key, "duplicate key", f"also in {keys[key]} (split {split or meta.split})")
        else:
            keys[key] = label
    if info is not None:
        if complete != info.samples:
            v.add(
                label,
                "",
                "sample count",
                f"{complete} complete sample(s), the manifest says {info.samples}",
            )
        elif all_meta and frames != info.frames:
            v.add(label, "", "frame total", f"{frames} frames, the manifest says {info.frames}")


def _verify_sample(v, label, key, members, split, render_hash, frame_hw):
    """The loader's judgement of one sample (``make_sample``'s checks), each failure counted."""
    try:
        meta = checked_meta(members, render_hash)
    except BadSample as e:
        v.add(label, key, _why_bad(members), str(e))
        return None
    if meta.key != key:
        v.add(label, key, "key", f"KEY.json says key {meta.key[:40]!r}")
    if split is not None and meta.split != split:
        v.add(label, key, "split", f"KEY.json says split {meta.split[:40]!r}, it is in {split!r}")
    try:
        clip = decode(members["mp4"], "pyav", meta.num_frames, frame_hw)
    except BadSample as e:
        kind = {"frame_count": "frame count", "frame_size": "frame size"}.get(e.kind, "decode")
        v.add(label, key, kind, str(e))
        return meta
    if len(clip) != meta.num_frames:
        v.add(
            label,
            key,
            "frame count",
            f"decoded {len(clip)} frames, metadata says {meta.num_frames}",
        )
    if frame_hw is not None and clip.shape[1:3] != tuple(frame_hw):
        v.add(label, key, "frame size", f"frame size {clip.shape[1:3]}, dataset renders {frame_hw}")
    return meta


def _why_bad(members: dict[str, bytes]) -> str:
    """Which of ``checked_meta``'s checks a sample it refused failed (for the counts)."""
    if "mp4" not in members or "json" not in members:
        return "missing member"
    try:
        meta = parse_sample_meta(members["json"], "KEY.json")
    except ValueError:
        return "bad metadata"
    if clip_checksum(members["mp4"]) != meta.clip_sha256:
        return "clip checksum"
    return "render hash"
