"""The shard contract between `evav preprocess` (writer) and evav.data (reader), defined once.

A dataset directory built by preprocessing:

    DIR/manifest.json                 Manifest (below)
    DIR/{split}/shard-NNNNNN.tar      plain tar of KEY.json + KEY.mp4 pairs, keys in order
    DIR/{split}/shard-NNNNNN.tar.idx.json   its index: member offsets and sizes (evav.data.shards)

Each sample is ``KEY.mp4`` (the whole clip ``[task][inputs][separator][outputs]``, encoded with
``Manifest.codec``, see evav.codec) and ``KEY.json`` (``SampleMeta``). ``KEY`` is the input's
8-digit index within its split, so keys are unique per split and sort in build order.

Both are plain JSON; ``Manifest.from_dict`` / ``SampleMeta.from_dict`` check the fields, so a
reader fails with the file and the missing key rather than deep inside the loader.
``Manifest.from_dict`` also checks every field's type and that the counts are consistent and
physically possible (``MIN_SAMPLE_BYTES`` per sample; ``load_manifest`` also against the shard
files' real sizes), so a reader may size per-sample arrays from them: a hostile manifest is a
``ValueError`` naming ``DIR/manifest.json`` and the field (``splits.train.shards[3].samples``).
``parse_sample_meta`` is the one way a reader turns ``KEY.json`` bytes into a ``SampleMeta``: any
malformed metadata (not JSON, not an object, a missing field, a wrong type) is a ``ValueError``
with the reason, which readers turn into a skipped, counted bad sample.
``SampleMeta.clip_sha256`` is the sha256 of the sample's ``KEY.mp4`` bytes (``clip_checksum``),
checked by every reader before decoding: a flipped bit that the codec would conceal is caught.
``FORMAT_VERSION`` changes when the layout changes (2: ``clip_sha256``; 3: each shard's index,
``DIR/{split}/shard-NNNNNN.tar.idx.json``, listed as ``ShardInfo.index`` with its sha256; see
evav.data.shards). ``READABLE_VERSIONS`` still load: a version 2 manifest lists no indexes, and
its shards are read by walking their tar headers (with a warning per shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
MANIFEST_NAME = "manifest.json"


@dataclass
class SampleMeta:
    """``KEY.json``: what a sample is, enough to rebuild its masks and score its answer."""

    key: str
    task: str  # the task name rendered in the first frame
    split: str
    source: str  # the input it came from: a file, "file:row", or a generator id
    segments: dict[str, int]  # frame counts: task, input[, separator, output]
    num_frames: int
    supervise: str  # loss-mask rule: "outputs" (answer frames) or "all" (every frame after task)
    answer: str  # answer text ("" for video answers and pretraining clips)
    label: Any  # the raw label (class index, label list, ...) or None
    render_hash: str
    clip_sha256: str  # sha256 of the KEY.mp4 bytes (clip_checksum), checked at decode time
    extra: dict[str, Any] = field(default_factory=dict)  # builder-specific (question, boxes, ...)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict, where: str = "sample") -> SampleMeta:
        return _from_dict(cls, d, where)


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory, e.g. "train/shard-000000.tar"
    samples: int
    frames: int
    bytes: int
    sha256: str
    index: str | None = None  # its index file, e.g. "train/shard-000000.tar.idx.json" (v3)
    index_sha256: str | None = None  # sha256 of the index file


@dataclass
class SplitInfo:
    samples: int
    frames: int
    inputs: int  # samples + quarantined, always
    tasks: dict[str, int]  # task name -> samples
    shards: list[ShardInfo]


@dataclass
class Quarantined:
    split: str
    source: str
    reason: str


@dataclass
class Manifest:
    builder: str
    builder_version: int
    options: dict[str, Any]  # the builder's resolved options
    render_spec: dict[str, Any]  # evav.frames.RenderSpec as plain data
    render_hash: str
    codec: str  # evav.codec.CodecSpec string, e.g. "ffv1:bgr0"
    seed: int
    shard_samples: dict[str, int]  # split -> inputs per shard
    splits: dict[str, SplitInfo]
    quarantined: list[Quarantined]
    commands: list[str]  # the command line(s) that built it (one per part)
    code_version: str  # evav version and git commit
    format_version: int = FORMAT_VERSION
    # --limit N: {"per_split": N, "stratified": true, "per_class": {split: {class: n}}}; None: all
    limit: dict[str, Any] | None = None

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of every frame."""
        return int(self.render_spec["height"]), int(self.render_spec["width"])

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.splits.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST_NAME) -> Manifest:
        """Check and build; ValueError ``WHERE: FIELD.PATH: problem`` on the first violation.

        Checked beyond presence: every field's type (an int is never a bool), counts >= 0,
        sha256 as 64 lowercase hex digits, shard paths as relative files inside the directory,
        a split's totals against its shards and its quarantine, and counts that fit their bytes
        (``MIN_SAMPLE_BYTES``). A reader can then size arrays from the counts without surprises.
        """
        m = _from_dict(cls, d, where)
        _check_fields(m, _MANIFEST_FIELDS, where, "")
        if m.format_version not in READABLE_VERSIONS:
            raise ValueError(
                f"{where}: format_version {m.format_version}, this evav reads "
                f"{' and '.join(map(str, READABLE_VERSIONS))}"
                + (
                    " (version 1 shards carry no clip checksums: rebuild with `evav preprocess`)"
                    if m.format_version == 1
                    else ""
                )
            )
        for name in ("height", "width"):
            v = m.render_spec.get(name)
            if not _is_int(v) or not _FRAME_SIDE[0] <= v <= _FRAME_SIDE[1]:
                _fail(
                    where, f"render_spec.{name}", f"{_show(v)} is not a frame side in {_FRAME_SIDE}"
                )
        for name, v in m.shard_samples.items():
            if not _is_int(v) or v < 1:
                _fail(where, f"shard_samples.{name}", f"{_show(v)} is not an int >= 1")
        _check_strings(m.commands, where, "commands")
        if m.limit is not None and not isinstance(m.limit, dict):
            _fail(where, "limit", f"{_show(m.limit)} is not dict or null")
        m.quarantined = [
            _from_dict(Quarantined, q, f"{where}: quarantined[{i}]")
            for i, q in enumerate(m.quarantined)
        ]
        for i, q in enumerate(m.quarantined):
            _check_fields(q, _QUARANTINED_FIELDS, where, f"quarantined[{i}]")
            if q.split not in m.splits:
                _fail(where, f"quarantined[{i}].split", f"{q.split[:40]!r} is not a split")
        seen: dict[str, str] = {}
        for name, s in list(m.splits.items()):
            at = f"splits.{name}"
            s = m.splits[name] = _from_dict(SplitInfo, s, f"{where}: {at}")
            _check_fields(s, _SPLIT_FIELDS, where, at)
            for task, n in s.tasks.items():
                if not _is_int(n) or n < 0:
                    _fail(where, f"{at}.tasks.{task}", f"{_show(n)} is not a count (an int >= 0)")
            s.shards = [
                _from_dict(ShardInfo, x, f"{where}: {at}.shards[{i}]")
                for i, x in enumerate(s.shards)
            ]
            for i, sh in enumerate(s.shards):
                _check_shard(sh, where, f"{at}.shards[{i}]", seen)
            for total in ("samples", "frames"):
                want = sum(getattr(sh, total) for sh in s.shards)
                if getattr(s, total) != want:
                    _fail(
                        where,
                        f"{at}.{total}",
                        f"{getattr(s, total)}, but its shards hold {want} {total}",
                    )
            if sum(s.tasks.values()) != s.samples:
                _fail(where, f"{at}.tasks", f"sum to {sum(s.tasks.values())}, not {s.samples}")
            quarantined = sum(q.split == name for q in m.quarantined)
            if s.inputs != s.samples + quarantined:
                _fail(
                    where,
                    f"{at}.inputs",
                    f"{s.inputs}, but samples + quarantined = {s.samples} + {quarantined}",
                )
        return m


def _from_dict(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    names = set(cls.__dataclass_fields__)
    required = {
        n for n, f in cls.__dataclass_fields__.items() if f.default is f.default_factory is MISSING
    }
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    return cls(**d)


# -- manifest validation -------------------------------------------------------------------------
# The smallest sample a shard can hold: two tar members (KEY.mp4, KEY.json), each a 512-byte header
# plus its data padded to whole 512-byte blocks, and a member with 1..512 bytes of data (neither
# member is ever empty: the clip has a container, the metadata is a JSON object) takes 2 blocks.
# The archive's end marker (two zero blocks, then padding to 10 KiB records) is deliberately not
# counted, so the bound holds for tar writers that omit it: ``samples * 2048 <= bytes``.
MIN_SAMPLE_BYTES = 2 * (512 + 512)
MAX_FILE_BYTES = 2**63 - 1  # st_size is a signed 64-bit off_t: no file is larger
MAX_MANIFEST_BYTES = 2**30  # ~5M shards' worth; a larger file is not a manifest we wrote
_FRAME_SIDE = (8, 1024)  # evav.frames.RenderSpec's range for height and width
_SHA256 = re.compile(r"[0-9a-f]{64}")

# field -> the type it must have; "count" is an int >= 0 (never a bool)
_MANIFEST_FIELDS = {
    "builder": str,
    "builder_version": int,
    "options": dict,
    "render_spec": dict,
    "render_hash": str,
    "codec": str,
    "seed": int,
    "shard_samples": dict,
    "splits": dict,
    "quarantined": list,
    "commands": list,
    "code_version": str,
    "format_version": int,
}
_SPLIT_FIELDS = {
    "samples": "count",
    "frames": "count",
    "inputs": "count",
    "tasks": dict,
    "shards": list,
}
_SHARD_FIELDS = {
    "path": str,
    "samples": "count",
    "frames": "count",
    "bytes": "count",
    "sha256": str,
}
_QUARANTINED_FIELDS = {"split": str, "source": str, "reason": str}


def _fail(where: str, path: str, problem: str) -> NoReturn:
    raise ValueError(f"{where}: {path}: {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    """A value for an error message: its type, and the value itself when it is short."""
    text = repr(v)
    return f"{type(v).__name__} {text}" if len(text) <= 40 else f"a {type(v).__name__}"


def _check_fields(obj: Any, spec: dict[str, Any], where: str, at: str) -> None:
    for name, want in spec.items():
        v = getattr(obj, name)
        path = f"{at}.{name}" if at else name
        if want == "count":
            if not _is_int(v) or v < 0:
                _fail(where, path, f"{_show(v)} is not a count (an int >= 0)")
        elif not isinstance(v, want) or (want is int and isinstance(v, bool)):
            _fail(where, path, f"{_show(v)} is not {want.__name__}")


def _check_strings(v: list, where: str, at: str) -> None:
    for i, x in enumerate(v):
        if not isinstance(x, str):
            _fail(where, f"{at}[{i}]", f"{_show(x)} is not str")


def check_shard_path(path: str) -> str | None:
    """Why ``path`` cannot name a shard file inside a dataset directory, or None if it can."""
    if not path or "\0" in path:
        return "is empty or holds a NUL byte"
    if path.startswith("pipe:"):
        return "is a shell command (pipe:); shards must be files inside the dataset directory"
    p = PurePosixPath(path)
    if p.is_absolute() or Path(path).is_absolute():
        return "is absolute; shard paths are relative to the dataset directory"
    if ".." in p.parts or ".." in Path(path).parts:
        return "leaves the dataset directory (..)"
    if path.endswith("/") or p.name in ("", "."):
        return "names a folder, not a shard file"
    return None


def _check_shard(sh: ShardInfo, where: str, at: str, seen: dict[str, str]) -> None:
    _check_fields(sh, _SHARD_FIELDS, where, at)
    why = check_shard_path(sh.path)
    if why:
        _fail(where, f"{at}.path", f"{sh.path[:80]!r} {why}")
    norm = str(PurePosixPath(sh.path))
    if norm in seen:
        _fail(where, f"{at}.path", f"{sh.path[:80]!r} is listed twice (also {seen[norm]})")
    seen[norm] = at
    if not _is_sha256(sh.sha256):
        _fail(where, f"{at}.sha256", f"{sh.sha256[:80]!r} is not 64 lowercase hex digits")
    if (sh.index is None) != (sh.index_sha256 is None):
        _fail(where, f"{at}.index", "and index_sha256 must be given together")
    if sh.index is not None:
        if not isinstance(sh.index, str) or check_shard_path(sh.index):
            why = check_shard_path(sh.index) if isinstance(sh.index, str) else "is not str"
            _fail(where, f"{at}.index", f"{str(sh.index)[:80]!r} {why}")
        if not isinstance(sh.index_sha256, str) or not _is_sha256(sh.index_sha256):
            _fail(where, f"{at}.index_sha256", "is not 64 lowercase hex digits")
    if sh.bytes > MAX_FILE_BYTES:
        _fail(where, f"{at}.bytes", f"{sh.bytes} is larger than any file can be")
    if sh.samples * MIN_SAMPLE_BYTES > sh.bytes:
        _fail(where, f"{at}.samples", _no_fit(sh.samples, sh.bytes))
    # every clip has at least one frame, and every frame at least one byte of coded data
    if not sh.samples <= sh.frames <= sh.bytes:
        _fail(
            where,
            f"{at}.frames",
            f"{sh.frames} frames for {sh.samples} samples in {sh.bytes} bytes",
        )


def _no_fit(samples: int, size: int, of: str = "") -> str:
    return (
        f"{samples} samples cannot fit in {size} bytes{of} "
        f"(a sample takes at least {MIN_SAMPLE_BYTES} bytes of tar)"
    )


def _is_sha256(v: str) -> bool:
    return _SHA256.fullmatch(v) is not None


def clip_checksum(data: bytes) -> str:
    """The checksum a sample's metadata carries for its encoded clip: sha256, hex."""
    return hashlib.sha256(data).hexdigest()


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "task": str,
    "split": str,
    "source": str,
    "segments": dict,
    "num_frames": int,
    "supervise": str,
    "answer": str,
    "render_hash": str,
    "clip_sha256": str,
    "extra": dict,
}


def parse_sample_meta(data: bytes, where: str = "sample") -> SampleMeta:
    """``KEY.json`` bytes -> a checked ``SampleMeta``; ValueError says what is wrong.

    Checked: JSON, an object, every field present and of its type, segments a map of
    non-negative frame counts that sum to ``num_frames``, ``supervise`` one of outputs/all.
    """
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{where}: metadata is not JSON ({type(e).__name__}: {e})") from None
    meta = SampleMeta.from_dict(d, where)
    for name, typ in _META_TYPES.items():
        v = getattr(meta, name)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ValueError(
                f"{where}: metadata field {name} is {type(v).__name__}, not {typ.__name__}"
            )
    seg = meta.segments
    if not seg or any(
        not isinstance(k, str) or not isinstance(n, int) or isinstance(n, bool) or n < 0
        for k, n in seg.items()
    ):
        raise ValueError(f"{where}: metadata segments {str(seg)[:80]} are not frame counts")
    if sum(seg.values()) != meta.num_frames or meta.num_frames < 1:
        raise ValueError(
            f"{where}: metadata segments sum to {sum(seg.values())}, num_frames is {meta.num_frames}"
        )
    if meta.supervise not in ("outputs", "all"):
        raise ValueError(f"{where}: metadata supervise {meta.supervise[:40]!r} is not outputs/all")
    return meta


def manifest_path(directory: str | Path) -> Path | str:
    """``DIR/manifest.json``; a URL (str) inside a URL dataset directory."""
    if _is_url(directory):
        return f"{str(directory).rstrip('/')}/{MANIFEST_NAME}"
    return Path(directory) / MANIFEST_NAME


def _is_url(directory) -> bool:
    from evav.data.remote import is_url  # (evav.data imports this module)

    return is_url(str(directory))


def _read_remote_manifest(url: str) -> bytes:
    """A URL dataset's manifest bytes: one HEAD, one GET (bounded); a missing one is the same
    ValueError as a local one, with the store's reason; any other failure an OSError naming it."""
    from evav.data import remote

    try:
        return remote.read_bytes(url, MAX_MANIFEST_BYTES)
    except FileNotFoundError as e:
        raise ValueError(
            f"{url}: no manifest ({getattr(e, 'reason', e)}; build the dataset with `evav preprocess` "
            "and upload the whole folder)"
        ) from None


def load_manifest(directory: str | Path, check_files: bool = True) -> Manifest:
    """Read ``DIR/manifest.json``; ValueError names the file and what is wrong with it.

    ``check_files``: also refuse a shard whose sample count cannot fit in the file on disk (a
    manifest that lies about ``bytes`` as well as ``samples``); missing files are left to the
    reader (``evav.data.shards.shard_paths``), mismatching ones to ``evav inspect --verify``,
    which passes False to report every shard's problem instead of stopping at the first.

    ``directory`` may be a URL (``s3://``, ``https://``: evav.data.remote); ``check_files`` is
    then not done (a HEAD per shard): each shard's real size is asked when its index is loaded,
    and its index (its sample list) is checked against it.
    """
    path = manifest_path(directory)
    if isinstance(path, str):  # a URL: read through fsspec; the shards are not asked for here
        raw = _read_remote_manifest(path)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(
                f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        return Manifest.from_dict(data, path)
    if not path.is_file():
        raise ValueError(
            f"{path}: no manifest (build the dataset with `evav preprocess`, "
            "or finish a --part build with `evav preprocess --merge --out DIR`)"
        )
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path}: {size} bytes, too large for a manifest")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # ValueError covers JSONDecodeError and ints past Python's 4300-digit limit
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    m = Manifest.from_dict(data, str(path))
    if check_files:
        for name, s in m.splits.items():
            for i, sh in enumerate(s.shards):
                try:
                    real = (Path(directory) / sh.path).stat().st_size
                except OSError:
                    continue
                if sh.samples * MIN_SAMPLE_BYTES > real:
                    _fail(
                        str(path),
                        f"splits.{name}.shards[{i}].samples",
                        _no_fit(sh.samples, real, f", the size of {Path(directory) / sh.path}"),
                    )
    return m


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON under a temporary name and rename it into place (readers never see half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def save_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = manifest_path(directory)
    if isinstance(path, str):  # not yet: datasets are built locally, then uploaded whole
        raise ValueError(f"{path}: writing a manifest to a URL is not supported")
    write_json_atomic(path, manifest.to_dict())
    return path
