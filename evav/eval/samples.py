"""The evaluation split of one or more datasets: every sample's metadata up front, clips on demand.

Metadata (``KEY.json``) is small and read for the whole split at once, because a task's reader
needs all of it before any generation: the candidate answers, the answer vocabulary, the
longest answer. Clips are decoded batch by batch. Unlike the training loader, a sample is never
cropped or padded: the prompt is exactly ``[task][inputs][separator]`` and the truth is exactly
the answer frames.

Nothing read from a shard is trusted. A sample that cannot be used is skipped, never a crash:
it is recorded as a ``Skipped`` (dataset, shard and key, task when known, a reason and the
message), counted per reason in the results and logged, rate-limited. The reasons:

| reason | the sample |
|---|---|
| missing_sample | is cut off: the shard ends (or its tar is corrupt) before the sample's data |
| missing_member | lacks KEY.mp4 or KEY.json |
| bad_metadata | has a KEY.json that is not well-formed metadata (``parse_sample_meta``) |
| render_hash | was rendered with another RenderSpec than its manifest's |
| checksum | has KEY.mp4 bytes that differ from its ``clip_sha256`` |
| decode | does not decode cleanly (FFmpeg reported errors) |
| frame_count | decodes to another number of frames than its ``num_frames`` |
| frame_size | decodes to frames of another size than the dataset's RenderSpec |
| read_error | could not be read from its shard (an OSError: unreadable file, oversized member) |
| other | failed in any other way while being read (the exception is in the message) |
| segments | leaves no prompt or no answer to generate (evav.eval.run) |
| task_reader | belongs to a task whose answers cannot be read (evav.eval.run) |
| readout | made its task's reader fail on the generated frames (evav.eval.run) |

The first ten are the training loader's (``evav.data.clips.REASONS``, ``BadSample.kind``; its
``too_long`` is training's crop, which evaluation never makes); the last three are evaluation's
own.

With ``limit``, each task gets a stratified random sample (``stratified``, seeded): every
answer class in proportion, a bad sample whose task is known counting like a good one (it was
tried); a sample whose task is unknown (unreadable metadata, a truncated shard) is always
reported.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from evav.data.clips import BadSample, checked_meta, decode
from evav.data.shards import ShardReader, shard_paths
from evav.errors import one_line  # noqa: F401 - evaluation's messages, imported from here too
from evav.manifest import Manifest, load_manifest, parse_sample_meta

log = logging.getLogger("evav.eval")

LOGGED_PER_REASON = 5  # bad samples logged in full per reason; the rest are only counted


@dataclass(frozen=True)
class Skipped:
    """A sample left out of the evaluation, and why."""

    dataset: str
    where: str  # "SHARD key 'KEY'" (or "SHARD sample #N" when the key is unknown)
    task: str | None  # None when the metadata does not say
    reason: str
    why: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalSample:
    dataset: str
    shard: str
    member: int
    meta: dict  # a checked SampleMeta as a dict

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def where(self) -> str:
        return f"{self.shard} key {self.key!r}"

    def skipped(self, reason: str, why: str) -> Skipped:
        return Skipped(self.dataset, self.where, self.task, reason, one_line(why))


@dataclass
class EvalData:
    split: str
    manifests: dict[str, Manifest]  # dataset dir -> manifest
    samples: list[EvalSample]  # the samples to evaluate, in (dataset, shard, member) order
    skipped: list[Skipped]  # samples left out while indexing (metadata, members, truncation)
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


class NoSamplesError(ValueError):
    """Not one sample of the split could be evaluated."""


def no_samples_error(dirs: list[str], split: str, skipped: list[Skipped]) -> NoSamplesError:
    """The error for a split with nothing to evaluate, naming the datasets and the commonest
    reason (with one example), so the user knows where to look."""
    where = ", ".join(dirs)
    if not skipped:
        return NoSamplesError(f"no samples in split {split!r} of {where}")
    reason, n = Counter(s.reason for s in skipped).most_common(1)[0]
    first = next(s for s in skipped if s.reason == reason)
    return NoSamplesError(
        f"no sample of split {split!r} of {where} could be evaluated: all {len(skipped)} "
        f"skipped, most often {reason} ({n}), e.g. {first.where}: {first.why}"
    )


def load_eval_data(
    dirs: list[str], split: str, limit: int | None = None, seed: int = 0
) -> EvalData:
    """Index ``split`` of every dataset; ``limit``: evaluate at most that many samples per task,
    a stratified sample (``stratified``) drawn with ``seed``.

    Candidate answers and vocabularies always come from the whole split, so a limited run reads
    answers out of the same candidate set as a full one. Unusable samples go to ``skipped``;
    ``NoSamplesError`` (a ValueError) when none is left.
    """
    manifests: dict[str, Manifest] = {}
    population: list[EvalSample] = []
    tried: list[EvalSample | Skipped] = []  # every sample of the split, in split order
    unattributed: list[Skipped] = []  # bad samples whose task is unknown: always reported
    reader = ShardReader()
    try:
        for d in dirs:
            m = load_manifest(d)
            if split not in m.splits:
                raise ValueError(
                    f"{d}: no split {split!r} (it has {sorted(m.splits)}); pass --split"
                )
            if manifests and m.render_hash != next(iter(manifests.values())).render_hash:
                raise ValueError(
                    f"{d}: rendered with hash {m.render_hash}, unlike {next(iter(manifests))}; "
                    "evaluate datasets of one RenderSpec together"
                )
            manifests[d] = m
            infos = m.splits[split].shards
            for info, path in zip(infos, shard_paths(d, m.splits[split])):
                idx = reader.index(path)
                for i in range(len(idx.keys)):
                    got = _index_sample(reader, d, path, i, m.render_hash)
                    if isinstance(got, EvalSample):
                        population.append(got)
                    if isinstance(got, Skipped) and got.task is None:
                        unattributed.append(got)
                    else:
                        tried.append(got)
                # samples the manifest lists but the tar does not hold (cut short, corrupt)
                why = one_line(
                    idx.error
                    or f"the shard has {len(idx.keys)} samples, its manifest says {info.samples}"
                )
                reason = "read_error" if idx.unreadable else "missing_sample"
                for i in range(len(idx.keys), info.samples):
                    unattributed.append(Skipped(d, f"{path} sample #{i}", None, reason, why))
    finally:
        reader.close()
    chosen = stratified(tried, limit, seed) if limit is not None else tried
    samples = [x for x in chosen if isinstance(x, EvalSample)]
    skipped = [x for x in chosen if isinstance(x, Skipped)] + unattributed
    if not samples:
        raise no_samples_error(dirs, split, skipped)
    return EvalData(split, manifests, samples, skipped, population)


def answer_class(x: EvalSample | Skipped) -> str | None:
    """The stratum of a sample for ``stratified``: its answer (None: no answer, or bad)."""
    if isinstance(x, Skipped):
        return None
    answer = x.meta.get("answer")
    return str(answer) if answer else None


def stratified(items: list, limit: int, seed: int = 0) -> list:
    """At most ``limit`` items per task, every answer class in proportion to its share of the
    task's items (largest remainders; each class at least once when ``limit`` allows), chosen
    at random with ``seed`` (the same items for the same seed), returned in their given order.

    A bad sample whose task is known is its own class: it was tried like a good one.
    """
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, not {limit}")
    by_task: dict[str, dict[str | None, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, x in enumerate(items):
        by_task[x.task][answer_class(x)].append(i)
    keep: list[int] = []
    for task, classes in sorted(by_task.items()):
        counts = {c: len(v) for c, v in classes.items()}
        rng = random.Random(f"{seed}:{task}")
        for c, n in allocate(counts, limit).items():
            keep += rng.sample(classes[c], n)
    return [items[i] for i in sorted(keep)]


def allocate(counts: dict, k: int) -> dict:
    """``k`` draws shared among classes in proportion to ``counts`` (largest remainders, ties by
    class name), each class at least one when ``k`` is at least the number of classes."""
    n = sum(counts.values())
    if k >= n:
        return dict(counts)
    exact = {c: k * m / n for c, m in counts.items()}
    got = {c: int(e) for c, e in exact.items()}
    if k >= len(counts):
        got = {c: max(1, g) for c, g in got.items()}
    key = lambda c: str(c)  # noqa: E731 - None (no answer) sorts as "None", stably
    while sum(got.values()) > k:  # the minimum of one took too many: from the most over
        c = min((c for c in got if got[c] > 1), key=lambda c: (exact[c] - got[c], key(c)))
        got[c] -= 1
    while sum(got.values()) < k:
        c = min((c for c in got if got[c] < counts[c]), key=lambda c: (got[c] - exact[c], key(c)))
        got[c] += 1
    return got


def _index_sample(
    reader: ShardReader, dataset: str, path: str, i: int, render_hash: str
) -> EvalSample | Skipped:
    """Sample ``i`` of a shard with checked metadata, or why it is skipped."""
    key, members = None, {}
    try:
        got = reader.read(path, i)
        key, members = got if got is not None else (None, {})
        if not members:
            raise BadSample("the shard ends inside this sample's data", "missing_sample")
        if "mp4" not in members or "json" not in members:
            raise BadSample(f"has {sorted(members)}, needs KEY.mp4 and KEY.json", "missing_member")
        try:
            meta = parse_sample_meta(members["json"], "KEY.json")
        except ValueError as e:
            raise BadSample(str(e), "bad_metadata") from None
        if meta.render_hash != render_hash:
            raise BadSample(
                f"rendered with hash {meta.render_hash[:16]!r}, the manifest's is {render_hash}",
                "render_hash",
            )
        return EvalSample(dataset, path, i, asdict(meta))
    except Exception as e:  # noqa: BLE001 - whatever one sample does, it is that sample's problem
        reason, why = problem(e)
        where = f"{path} key {key!r}" if key is not None else f"{path} sample #{i}"
        task = _task_hint(members["json"]) if "json" in members else None
        return Skipped(dataset, where, task, reason, one_line(why))


def _task_hint(data: bytes) -> str | None:
    """The task named by metadata that may be malformed (to attribute a bad sample), or None."""
    try:
        d = json.loads(data)
    except Exception:  # noqa: BLE001 - no hint, then (parse_sample_meta said why)
        return None
    task = d.get("task") if isinstance(d, dict) else None
    return task if isinstance(task, str) else None


def problem(e: Exception) -> tuple[str, str]:
    """(reason, message) of an exception raised while reading one sample."""
    if isinstance(e, BadSample):
        return e.kind, str(e)
    if isinstance(e, OSError):
        return "read_error", str(e)
    return "other", f"{type(e).__name__}: {e}"


class ClipReader:
    """Decodes whole clips of eval samples, checked before use: both members present, the
    metadata well formed, the clip bytes matching ``clip_sha256``, the sample's render hash the
    manifest's (``checked_meta``), a clean decode, and the frame count and size. Any failure is
    a ``BadSample`` whose ``kind`` is the reason."""

    def __init__(self, manifests: dict[str, Manifest] | None = None):
        self.reader = ShardReader()
        self.manifests = dict(manifests or {})

    def clip(self, s: EvalSample) -> np.ndarray:
        try:
            return self._clip(s)
        except BadSample:
            raise
        except Exception as e:  # noqa: BLE001 - any failure on one sample is that sample's
            reason, why = problem(e)
            raise BadSample(why, reason) from None

    def _clip(self, s: EvalSample) -> np.ndarray:
        m = self.manifests.get(s.dataset)
        if m is None:
            m = self.manifests[s.dataset] = load_manifest(s.dataset)
        got = self.reader.read(s.shard, s.member)
        if got is None or not got[1]:
            raise BadSample("the shard ends inside this sample's data", "missing_sample")
        members = got[1]
        if "mp4" not in members or "json" not in members:
            raise BadSample(f"has {sorted(members)}, needs KEY.mp4 and KEY.json", "missing_member")
        checked_meta(members, m.render_hash)  # BadSample says which check failed (its kind)
        frames = decode(members["mp4"], "pyav", s.meta["num_frames"], m.frame_size)
        if len(frames) != s.meta["num_frames"]:
            raise BadSample(
                f"decoded {len(frames)} frames, metadata says {s.meta['num_frames']}",
                "frame_count",
            )
        if tuple(frames.shape[1:3]) != m.frame_size:
            raise BadSample(
                f"frames of {tuple(frames.shape[1:3])}, the dataset renders {m.frame_size}",
                "frame_size",
            )
        return frames

    def close(self) -> None:
        self.reader.close()


class SkipLog:
    """Logs skipped samples, the first ``LOGGED_PER_REASON`` of each reason in full."""

    def __init__(self, per_reason: int = LOGGED_PER_REASON):
        self.per_reason = per_reason
        self.counts: Counter[str] = Counter()

    def __call__(self, s: Skipped) -> None:
        self.counts[s.reason] += 1
        n = self.counts[s.reason]
        if n <= self.per_reason:
            log.warning("skipped %s (%s): %s", s.where, s.reason, s.why)
        if n == self.per_reason:
            log.warning("further samples skipped for %s are counted, not logged", s.reason)


def dataset_name(d: str) -> str:
    return Path(d).name
