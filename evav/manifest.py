"""The shard contract between `evav preprocess` (writer) and evav.data (reader), defined once.

A dataset directory built by preprocessing:

    DIR/manifest.json                 Manifest (below)
    DIR/{split}/shard-NNNNNN.tar      plain tar of KEY.mp4 + KEY.json pairs, keys in order

Each sample is ``KEY.mp4`` (the whole clip ``[task][inputs][separator][outputs]``, encoded with
``Manifest.codec``, see evav.codec) and ``KEY.json`` (``SampleMeta``). ``KEY`` is the input's
8-digit index within its split, so keys are unique per split and sort in build order.

Both are plain JSON; ``Manifest.from_dict`` / ``SampleMeta.from_dict`` check the fields, so a
reader fails with the file and the missing key rather than deep inside the loader.
``parse_sample_meta`` is the one way a reader turns ``KEY.json`` bytes into a ``SampleMeta``: any
malformed metadata (not JSON, not an object, a missing field, a wrong type) is a ``ValueError``
with the reason, which readers turn into a skipped, counted bad sample.
``SampleMeta.clip_sha256`` is the sha256 of the sample's ``KEY.mp4`` bytes (``clip_checksum``),
checked by every reader before decoding: a flipped bit that the codec would conceal is caught.
``FORMAT_VERSION`` changes when the layout changes incompatibly (2: ``clip_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2
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
        m = _from_dict(cls, d, where)
        if m.format_version != FORMAT_VERSION:
            raise ValueError(
                f"{where}: format_version {m.format_version}, this evav reads {FORMAT_VERSION}"
                + (
                    " (version 1 shards carry no clip checksums: rebuild with `evav preprocess`)"
                    if m.format_version == 1
                    else ""
                )
            )
        m.splits = {
            name: _from_dict(SplitInfo, s, f"{where}: splits.{name}")
            for name, s in m.splits.items()
        }
        for name, s in m.splits.items():
            s.shards = [
                _from_dict(ShardInfo, x, f"{where}: splits.{name}.shards") for x in s.shards
            ]
        m.quarantined = [_from_dict(Quarantined, q, f"{where}: quarantined") for q in m.quarantined]
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


def manifest_path(directory: str | Path) -> Path:
    return Path(directory) / MANIFEST_NAME


def load_manifest(directory: str | Path) -> Manifest:
    """Read ``DIR/manifest.json``; ValueError names the file and what is wrong with it."""
    path = manifest_path(directory)
    if not path.is_file():
        raise ValueError(
            f"{path}: no manifest (build the dataset with `evav preprocess`, "
            "or finish a --part build with `evav preprocess --merge --out DIR`)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_dict(data, str(path))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON under a temporary name and rename it into place (readers never see half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def save_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = manifest_path(directory)
    write_json_atomic(path, manifest.to_dict())
    return path
