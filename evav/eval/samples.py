"""The evaluation split of one or more datasets: every sample's metadata up front, clips on demand.

Metadata (``KEY.json``) is small and read for the whole split at once, because a task's reader
needs all of it before any generation: the candidate answers, the answer vocabulary, the
longest answer. Clips are decoded batch by batch. Unlike the training loader, a sample is never
cropped or padded: the prompt is exactly ``[task][inputs][separator]`` and the truth is exactly
the answer frames.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evav.data.clips import BadSample, decode, expected_frames
from evav.data.shards import ShardReader, shard_paths
from evav.manifest import Manifest, load_manifest


@dataclass
class EvalSample:
    dataset: str
    shard: str
    member: int
    meta: dict

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def task(self) -> str:
        return str(self.meta["task"])


@dataclass
class EvalData:
    split: str
    manifests: dict[str, Manifest]  # dataset dir -> manifest
    samples: list[EvalSample]  # the samples to evaluate, in (dataset, shard, member) order
    bad: list[tuple[str, str]]  # (where, why) of samples whose metadata could not be read
    population: list[EvalSample]  # every readable sample of the split (candidates, vocabularies)

    @property
    def render_hash(self) -> str:
        return next(iter(self.manifests.values())).render_hash

    @property
    def render_spec(self) -> dict:
        return next(iter(self.manifests.values())).render_spec

    def by_task(self, population: bool = False) -> dict[str, list[EvalSample]]:
        """Samples per task (``population``: of the whole split, not just those evaluated)."""
        out: dict[str, list[EvalSample]] = defaultdict(list)
        for s in self.population if population else self.samples:
            out[s.task].append(s)
        return dict(sorted(out.items()))


def default_split(dirs: list[str]) -> str:
    """``test`` when every dataset has it, else ``val``."""
    manifests = [load_manifest(d) for d in dirs]
    return "test" if all("test" in m.splits for m in manifests) else "val"


def load_eval_data(dirs: list[str], split: str, limit: int | None = None) -> EvalData:
    """Index ``split`` of every dataset; ``limit``: evaluate at most that many samples per task.

    Candidate answers and vocabularies always come from the whole split, so a limited run reads
    answers out of the same candidate set as a full one.
    """
    manifests, samples, bad = {}, [], []
    reader = ShardReader()
    for d in dirs:
        m = load_manifest(d)
        if split not in m.splits:
            raise ValueError(f"{d}: no split {split!r} (it has {sorted(m.splits)}); pass --split")
        if manifests and m.render_hash != next(iter(manifests.values())).render_hash:
            raise ValueError(
                f"{d}: rendered with hash {m.render_hash}, unlike {next(iter(manifests))}; "
                "evaluate datasets of one RenderSpec together"
            )
        manifests[d] = m
        for path in shard_paths(d, m.splits[split]):
            idx = reader.index(path)
            for i in range(len(idx.keys)):
                _, members = reader.read(path, i)
                try:
                    meta = json.loads(members["json"])
                    if not {"key", "task", "segments"} <= set(meta):
                        raise ValueError("no key/task/segments")
                    samples.append(EvalSample(d, path, i, meta))
                except (KeyError, ValueError, UnicodeDecodeError) as e:
                    bad.append((f"{path}#{i}", f"unreadable metadata ({e})"))
    reader.close()
    population = samples
    if limit is not None:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for s in samples:
            if seen[s.task] < limit:
                kept.append(s)
                seen[s.task] += 1
        samples = kept
    if not samples:
        raise ValueError(f"no samples in split {split!r} of {', '.join(dirs)}")
    return EvalData(split, manifests, samples, bad, population)


class ClipReader:
    """Decodes whole clips of eval samples; the frame count is checked against the metadata."""

    def __init__(self):
        self.reader = ShardReader()

    def clip(self, s: EvalSample) -> np.ndarray:
        got = self.reader.read(s.shard, s.member)
        if got is None or "mp4" not in got[1]:
            raise BadSample(f"{s.shard}: sample {s.key} has no clip")
        try:
            frames = decode(got[1]["mp4"])
        except BadSample as e:
            raise BadSample(f"{s.shard}: sample {s.key}: {e}") from None
        want = expected_frames(s.meta)
        if want and len(frames) != want:
            raise BadSample(
                f"{s.shard}: sample {s.key}: decoded {len(frames)} frames, metadata says {want}"
            )
        return frames

    def close(self) -> None:
        self.reader.close()


def dataset_name(d: str) -> str:
    return Path(d).name
