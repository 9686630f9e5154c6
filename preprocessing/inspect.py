"""`evav inspect`: what is in a shard folder or a single tar, and a look at a few samples.

Counts per split and task, the frame-count histogram, bytes and the codec, from the samples'
metadata (so it also works on a lone tar without its manifest); the manifest's quarantine count
when there is one. ``write_examples`` saves N random samples as a PNG contact sheet (one row per
sample: task | inputs | separator | answer) or a GIF (the clips one after another).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from evav.codec import decode_clip, probe
from evav.frames import contact_sheet, save_clip
from evav.manifest import MANIFEST_NAME, Manifest, load_manifest
from preprocessing.shards import iter_members


@dataclass
class Report:
    shards: list[Path]
    manifest: Manifest | None = None
    samples: dict[tuple[str, str], int] = field(default_factory=Counter)  # (split, task) -> n
    frames_hist: Counter = field(default_factory=Counter)  # frames per clip -> n
    keys: list[tuple[Path, str]] = field(default_factory=list)
    bytes: int = 0
    codec: str = ""

    def text(self) -> str:
        lines = [f"{len(self.shards)} shard(s), {self.bytes / 2**20:.1f} MiB, codec {self.codec}"]
        if self.manifest is not None:
            m = self.manifest
            lines.append(f"builder {m.builder} v{m.builder_version}, render hash {m.render_hash}")
            lines.append(f"quarantined inputs: {len(m.quarantined)}")
        lines.append("samples per split and task:")
        for (split, task), n in sorted(self.samples.items()):
            lines.append(f"  {split:8s} {task:16s} {n:8d}")
        lines.append("frames per clip: count")
        width = max(self.frames_hist.values(), default=1)
        for t, n in sorted(self.frames_hist.items()):
            lines.append(f"  {t:4d}: {n:7d} {'#' * max(1, round(40 * n / width))}")
        return "\n".join(lines)


def find_shards(path: str | Path) -> tuple[list[Path], Manifest | None]:
    """Shards under ``path`` (a dataset dir, a split dir or one tar) and the manifest if any."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".tar":
            raise ValueError(f"{path}: expected a .tar shard or a folder of shards")
        root = path.parent.parent
        manifest = load_manifest(root) if (root / MANIFEST_NAME).is_file() else None
        return [path], manifest
    if (path / MANIFEST_NAME).is_file():
        m = load_manifest(path)
        return [path / sh.path for s in m.splits.values() for sh in s.shards], m
    shards = sorted(path.rglob("shard-*.tar"))
    if not shards:
        raise ValueError(f"{path}: no manifest.json and no shard-*.tar files below it")
    return shards, None


def inspect(path: str | Path) -> Report:
    shards, manifest = find_shards(path)
    report = Report(shards, manifest)
    first_mp4 = None
    for shard in shards:
        report.bytes += shard.stat().st_size
        for key, ext, data in iter_members(shard, ("json", "mp4")):
            if ext == "mp4":
                first_mp4 = first_mp4 or data
                continue
            meta = json.loads(data)
            report.samples[(meta["split"], meta["task"])] += 1
            report.frames_hist[meta["num_frames"]] += 1
            report.keys.append((shard, key))
    if manifest is not None:
        report.codec = manifest.codec
    elif first_mp4 is not None:
        report.codec = probe(first_mp4)
    return report


def write_examples(report: Report, out: str | Path, num: int = 8, seed: int = 0) -> Path:
    """N random samples to ``out``: ``.png`` (a row per sample) or ``.gif`` (clip after clip)."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".gif"):
        raise ValueError(f"{out}: --out must end in .png or .gif")
    if not report.keys:
        raise ValueError("no samples to show")
    picks = sorted(random.Random(seed).sample(report.keys, min(num, len(report.keys))))
    wanted: dict[Path, set[str]] = {}
    for shard, key in picks:
        wanted.setdefault(shard, set()).add(key)
    clips = []
    for shard, keys in wanted.items():
        for key, _, data in iter_members(shard, ("mp4",)):
            if key in keys:
                clips.append(decode_clip(data))
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
