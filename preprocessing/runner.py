"""The runner: builder inputs -> rendered, encoded clips -> shards, in parallel and resumably.

    from preprocessing.runner import BuildConfig, build
    manifest = build(BuildConfig("fsdd", src="raw/fsdd", out="shards/fsdd", workers=8))

How work is cut (so that any number of workers or parts gives the same bytes):

1. The builder lists each split's inputs in a fixed order. ``--limit N`` keeps N of each
   split, stratified by the items' ``stratum`` (class or label; see ``limit_items``) and drawn
   with ``--seed``, then in the builder's order: every part and worker draws the same ones.
2. Each split is cut into shards of ``shard_samples`` consecutive inputs (given, or estimated
   from ``--shard-mb`` by rendering the split's first few inputs); shard ``i`` holds inputs
   ``[i*k, (i+1)*k)`` and each sample's key is its input index.
3. Shards are dealt round-robin to parts (``--num-parts N --part I``, default from
   ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``); a part's shards go to ``--workers``
   processes. A shard is written under a temporary name, renamed when complete, then recorded
   (preprocessing/layout.py); a rerun skips recorded shards.
4. When every shard is recorded, the merge (preprocessing/merge.py) writes ``manifest.json``:
   a single-part build merges itself, and so does the part that finds every shard done; the
   explicit step is ``evav preprocess --merge`` (the dependent Slurm job).

Bad input never stops a build: any exception raised while reading, rendering or encoding one
input (a ``BadInputError`` from the builder or a renderer, or any other error a decoder raises
on a hostile file) quarantines that input with its reason (the exception's type too, when it is
not a BadInputError), in the parent and in every worker process; inputs = samples written +
quarantined, in every shard record. What stops a build, before any work, is a bad option or a
wrong layout (``list_items`` raising ValueError). A worker process killed from outside (the OOM
killer, a crash inside a C decoder) stops the build with that message; a rerun resumes.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evav.codec import CodecSpec, encode_clip
from evav.config import apply_overrides, from_dict, to_dict
from evav.errors import BadInputError, describe_error
from evav.frames import RenderSpec, build_clip
from evav.frames.video import set_decode_threads
from evav.manifest import Manifest, SampleMeta, clip_checksum, write_json_atomic
from evav.version import code_version
from preprocessing.builders import Builder, Item, get_builder
from preprocessing.layout import (
    part_path,
    plan_path,
    read_json,
    read_record,
    record_path,
    shard_path,
)
from preprocessing.merge import merge
from preprocessing.shards import ShardWriter

ESTIMATE_INPUTS = 8  # inputs rendered per split to turn --shard-mb into a sample count
MAX_WORKERS = 1024
MAX_SHARD_MB = 1_000_000.0  # 1 TB: any larger is a typo


@dataclass
class BuildConfig:
    builder: str
    out: str
    src: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the builder's Options, plain data
    render: dict[str, Any] = field(default_factory=dict)  # RenderSpec fields, plain data
    workers: int = 1
    num_parts: int = 1
    part: int = 0
    seed: int = 0
    shard_samples: int | None = None  # inputs per shard; None: from shard_mb
    shard_mb: float = 64.0
    codec: str | None = None  # evav.codec preset or spec; None: the builder's default
    limit: int | None = None  # keep N inputs of each split, stratified by class, seeded
    command: str = ""  # recorded in the manifest


@dataclass(frozen=True)
class Job:
    """Everything a worker process needs to rebuild the builder and its inputs (picklable)."""

    builder: str
    src: str | None
    options: dict
    render: dict
    seed: int
    codec: str
    limit: int | None
    out: str

    def make_builder(self) -> Builder:
        cls = get_builder(self.builder)
        spec = from_dict(RenderSpec, self.render, "render")
        return cls(self.src, from_dict(cls.Options, self.options, self.builder), spec, self.seed)

    def items(self, builder: Builder) -> dict[str, list[Item]]:
        try:
            items = builder.list_items()
        except OSError as e:  # an unreadable folder or layout file: a layout error, before work
            raise ValueError(f"{self.builder}: --src {self.src}: cannot read: {e}") from None
        return {
            s: limit_items(builder, s, v, self.limit) if self.limit is not None else v
            for s, v in sorted(items.items())
        }


def limit_items(builder: Builder, split: str, items: list[Item], n: int) -> list[Item]:
    """``n`` of a split's items, stratified: grouped by ``Item.stratum`` (items without one are
    one more group), each group gets its share of ``n`` (``_allocate``), drawn with
    ``builder.rng("limit", split)``; returned in the builder's order. Without strata this is a
    seeded uniform sample."""
    if n >= len(items):
        return items
    groups: dict[object, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.stratum, []).append(i)
    keys = sorted(groups, key=lambda k: (k is None, str(k)))
    rng = builder.rng("limit", split)
    quotas = _allocate([len(groups[k]) for k in keys], [k is not None for k in keys], n, rng)
    picked = [i for k, q in zip(keys, quotas) for i in rng.choice(groups[k], q, replace=False)]
    return [items[i] for i in sorted(picked)]


def _allocate(sizes: list[int], labelled: list[bool], n: int, rng) -> list[int]:
    """How many of each group to keep, for ``n < sum(sizes)``: shares in proportion to the
    sizes (largest remainders); then, when ``n`` covers every labelled group, each labelled
    group left without one takes one from the group holding the most. Ties are broken in a
    seeded order, so that a small ``n`` does not always favour the first labels."""
    total = sum(sizes)
    shares = [divmod(n * size, total) for size in sizes]
    quotas = [q for q, _ in shares]
    tiebreak = rng.permutation(len(sizes))
    order = sorted(range(len(sizes)), key=lambda j: (-shares[j][1], tiebreak[j]))
    for j in order[: n - sum(quotas)]:
        quotas[j] += 1
    if n >= sum(labelled):
        for j in [j for j in order if labelled[j] and quotas[j] == 0]:
            donor = max(
                (d for d in order if quotas[d] > int(labelled[d])),
                key=lambda d: (quotas[d], -tiebreak[d]),
            )
            quotas[donor] -= 1
            quotas[j] = 1
    return quotas


def build(cfg: BuildConfig) -> Manifest | None:
    """Build this part's shards; return the manifest when the build is complete (else None)."""
    check_numbers(cfg)
    cls = get_builder(cfg.builder)
    codec = CodecSpec.parse(cfg.codec or cls.codec)
    options = to_dict(from_dict(cls.Options, cfg.options, cfg.builder))
    render = to_dict(from_dict(RenderSpec, cfg.render, "render"))
    out = Path(cfg.out)
    check_out(out, cfg.src)
    job = Job(cfg.builder, cfg.src, options, render, cfg.seed, str(codec), cfg.limit, str(out))
    builder = job.make_builder()
    items = job.items(builder)
    if not any(items.values()):
        raise ValueError(f"{cfg.builder}: --src {cfg.src}: no inputs found")
    plan = _plan(job, builder, items, cfg)
    _write_plan(out, plan)
    write_json_atomic(
        part_path(out, cfg.part, cfg.num_parts),
        {"part": cfg.part, "num_parts": cfg.num_parts, "command": cfg.command},
    )
    mine = [sid for n, sid in enumerate(_all_shards(plan)) if n % cfg.num_parts == cfg.part]
    for split, index in mine:  # leftovers of a killed run of this part
        for pattern in (f".shard-{index:06d}.tar.tmp-*", f".shard-{index:06d}.tar.idx.json.tmp-*"):
            for tmp in shard_path(out, split, index).parent.glob(pattern):
                tmp.unlink(missing_ok=True)
    todo = [sid for sid in mine if read_record(out, *sid) is None]
    total = sum(_shard_range(plan, *sid)[1] - _shard_range(plan, *sid)[0] for sid in todo)
    desc = f"{cfg.builder}" + (f" part {cfg.part}/{cfg.num_parts}" if cfg.num_parts > 1 else "")
    if len(todo) < len(mine):
        print(f"{desc}: {len(mine) - len(todo)} of {len(mine)} shards already done, skipping them")
    t0 = time.perf_counter()
    bar = _progress_bar(total, desc)
    if cfg.workers == 1 or len(todo) <= 1:
        with bar() as b:
            for sid in todo:
                _run_shard(builder, items, plan, job, *sid, b.update)
    else:
        _run_pool(job, builder, items, plan, todo, min(cfg.workers, len(todo)), bar)
    if todo:
        print(f"{desc}: {total} inputs in {time.perf_counter() - t0:.1f} s")
    if cfg.num_parts > 1:
        done = all(read_record(out, *sid) is not None for sid in _all_shards(plan))
        if not done:
            print(
                f"part {cfg.part} done; when all parts are, run: evav preprocess --merge --out {out}"
            )
            return None
    return merge(out)


def check_numbers(cfg: BuildConfig) -> None:
    """Every numeric option in range (and finite), or a ValueError naming the option."""

    def integer(flag: str, v: object, lo: int, hi: int | None = None) -> None:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"{flag} must be {bound}, got {v!r}")

    integer("--workers", cfg.workers, 1, MAX_WORKERS)
    integer("--num-parts", cfg.num_parts, 1)
    if not isinstance(cfg.part, int) or not 0 <= cfg.part < cfg.num_parts:
        raise ValueError(f"--part must be in 0..{cfg.num_parts - 1}, got {cfg.part!r}")
    integer("--seed", cfg.seed, 0)
    if cfg.shard_samples is not None:
        integer("--shard-samples", cfg.shard_samples, 1)
    if cfg.limit is not None:
        integer("--limit", cfg.limit, 0)
    mb = cfg.shard_mb
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 0 < mb <= MAX_SHARD_MB:
        raise ValueError(f"--shard-mb must be a number in (0, {MAX_SHARD_MB:g}], got {mb!r}")


def check_out(out: Path, src: str | None) -> None:
    """Refuse, before any work, an ``--out`` that is a file or lies inside ``--src`` (the
    builder would list the build's own files as inputs on the next run)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if src is None:
        return
    o, s = out.resolve(), Path(src).resolve()
    if o == s or (s.is_dir() and s in o.parents):
        raise ValueError(
            f"--out {out} is inside --src {src}: the build would read its own output as input; "
            "choose an --out outside the raw data"
        )


# -- planning --------------------------------------------------------------------------------
def _plan(job: Job, builder: Builder, items: dict[str, list[Item]], cfg: BuildConfig) -> dict:
    splits = {}
    for split, its in items.items():
        k = cfg.shard_samples or _estimate_shard_samples(builder, its, split, job, cfg.shard_mb)
        splits[split] = {"inputs": len(its), "shard_samples": k}
        if job.limit is not None:  # what the stratified --limit kept, per class
            counts = Counter("" if it.stratum is None else str(it.stratum) for it in its)
            splits[split]["strata"] = dict(sorted(counts.items()))
    return {
        "builder": job.builder,
        "builder_version": type(builder).version,
        "options": job.options,
        "render_spec": job.render,
        "render_hash": builder.spec.hash,
        "codec": job.codec,
        "seed": job.seed,
        "limit": None if job.limit is None else {"per_split": job.limit, "stratified": True},
        "splits": splits,
    }


def _estimate_shard_samples(builder, its, split, job, shard_mb: float) -> int:
    sizes = []
    for n, item in enumerate(its[:ESTIMATE_INPUTS]):
        try:
            members, _ = render_sample(builder, item, f"{n:08d}", split, job.codec)
        except Exception:  # a bad input: the shard run quarantines it, here it is skipped
            continue
        sizes.append(sum(len(b) for b in members.values()) + 1536)  # + tar headers
    mean = sum(sizes) / len(sizes) if sizes else 2**20
    return max(1, int(shard_mb * 2**20 / mean))


def _write_plan(out: Path, plan: dict) -> None:
    path = plan_path(out)
    if path.is_file():
        old = read_json(path)
        old_content = {k: v for k, v in old.items() if k != "code_version"}
        if old_content != plan:
            diff = sorted(k for k in plan if old_content.get(k) != plan[k])
            raise ValueError(
                f"{out} holds a build with other settings ({', '.join(diff)} differ); "
                "use another --out, or delete it to start over"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**plan, "code_version": code_version()})


def _all_shards(plan: dict) -> list[tuple[str, int]]:
    return [
        (split, i)
        for split, s in sorted(plan["splits"].items())
        for i in range(math.ceil(s["inputs"] / s["shard_samples"]))
    ]


def _shard_range(plan: dict, split: str, index: int) -> tuple[int, int]:
    s = plan["splits"][split]
    k = s["shard_samples"]
    return index * k, min(s["inputs"], (index + 1) * k)


# -- one sample, one shard -------------------------------------------------------------------
def render_sample(
    builder: Builder, item: Item, key: str, split: str, codec: str
) -> tuple[dict[str, bytes], SampleMeta]:
    """One input -> shard members ``{"mp4": clip, "json": metadata}``; BadInputError if bad."""
    ex = builder.example(item)
    clip = build_clip(builder.text, ex.task, ex.inputs, ex.outputs, ex.supervise)
    data = encode_clip(clip.frames, CodecSpec.parse(codec))
    meta = SampleMeta(
        key=key,
        task=ex.task,
        split=split,
        source=item.source,
        segments=clip.segments,
        num_frames=len(clip.frames),
        supervise=ex.supervise if ex.outputs is not None else "all",
        answer=ex.answer,
        label=ex.label,
        render_hash=builder.spec.hash,
        clip_sha256=clip_checksum(data),
        extra=ex.extra,
    )
    return {"mp4": data, "json": meta.to_json()}, meta


def _run_shard(builder, items, plan, job: Job, split: str, index: int, progress) -> None:
    out = Path(job.out)
    lo, hi = _shard_range(plan, split, index)
    samples, quarantined, tasks, frames = [], [], Counter(), 0
    for n in range(lo, hi):
        item = items[split][n]
        try:
            members, meta = render_sample(builder, item, f"{n:08d}", split, job.codec)
        except Exception as e:  # any error on one input is that input's (never the build's)
            quarantined.append({"source": item.source, "reason": _reason(e, item)})
        else:
            samples.append((meta.key, members))
            tasks[meta.task] += 1
            frames += meta.num_frames
        progress(1)
    final = shard_path(out, split, index)
    record = {
        "split": split,
        "index": index,
        "inputs": hi - lo,
        "samples": len(samples),
        "frames": frames,
        "tasks": dict(sorted(tasks.items())),
        "quarantined": quarantined,
        "path": None,
        "bytes": 0,
        "sha256": "",
    }
    if samples:
        with ShardWriter(final, f"{os.getpid()}") as w:
            for key, members in samples:
                w.add(key, members)
        record.update(
            path=f"{split}/{final.name}",
            bytes=w.bytes,
            sha256=w.sha256,
            index=f"{split}/{w.index.name}",
            index_sha256=w.index_sha256,
        )
    rec_path = record_path(out, split, index)
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(rec_path, record)


def _reason(e: Exception, item: Item) -> str:
    """The quarantine reason: BadInputError's own (with its path when that is not the input's
    source, e.g. a groundtruth file), else the exception's type and message."""
    if isinstance(e, BadInputError) and e.path != item.source:
        return f"{e.path}: {e.reason}"
    return describe_error(e)


# -- worker processes ------------------------------------------------------------------------
_WORKER: dict = {}


class WorkerDied(RuntimeError):
    """A worker process was killed from outside (no Python exception of an input can do it)."""


def _progress_bar(total: int, desc: str):
    """A factory, so that worker processes are forked before tqdm starts its monitor thread."""
    return lambda: tqdm(total=total, unit="sample", desc=desc, dynamic_ncols=True, smoothing=0.05)


def _init_worker(job: Job, plan: dict) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(1)  # one core per worker; also keeps OpenMP out of forked children
    set_decode_threads(1)  # likewise FFmpeg's video decoder threads
    if "builder" not in _WORKER:  # spawned (not forked): rebuild the builder and its inputs
        builder = job.make_builder()
        _WORKER.update(builder=builder, items=job.items(builder))


class _Progress:
    """Reports samples done to the parent at most every 0.2 s (a message per sample costs CPU)."""

    def __init__(self, q):
        self.q, self.n, self.last = q, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self.last > 0.2:
            self.flush()

    def flush(self) -> None:
        if self.n:
            self.q.put(("progress", self.n))
        self.n, self.last = 0, time.monotonic()


def _worker(job: Job, plan: dict, tasks, events) -> None:
    """A worker process: shards from ``tasks`` until ``None``; ``events`` carries progress,
    finished shards and, for a bug (never a bad input: those are quarantined), the traceback."""
    _init_worker(job, plan)
    progress = _Progress(events)
    while (sid := tasks.get()) is not None:
        try:
            _run_shard(_WORKER["builder"], _WORKER["items"], plan, job, *sid, progress)
        except BaseException:
            events.put(("error", sid, traceback.format_exc()))
            return
        progress.flush()
        events.put(("done", sid))


def _run_pool(job: Job, builder, items, plan: dict, todo: list, workers: int, bar) -> None:
    """Shards over ``workers`` processes: forked on Linux (they inherit the builder and its
    inputs, so they start at once), spawned elsewhere; they take shards from a queue.

    Not multiprocessing.Pool: when a worker is killed from outside (the OOM killer, a crash in
    a C decoder) the Pool replaces it but never reruns its shard, and its terminate() can then
    wait forever on a queue lock the dead worker held. Here a dead worker stops the build with
    WorkerDied and the others are killed; a rerun builds the missing shards.
    """
    fork = sys.platform == "linux"
    ctx = mp.get_context("fork" if fork else "spawn")
    tasks, events = ctx.Queue(), ctx.Queue()
    for sid in todo:
        tasks.put(sid)
    for _ in range(workers):
        tasks.put(None)
    if fork:
        _WORKER.update(builder=builder, items=items)
    procs = [ctx.Process(target=_worker, args=(job, plan, tasks, events)) for _ in range(workers)]
    try:
        for p in procs:
            p.start()
    finally:
        _WORKER.clear()
    finished = False
    try:
        with bar() as b:  # after the fork: tqdm starts a monitor thread
            left = set(todo)
            while left:
                try:
                    kind, *rest = events.get(timeout=0.2)
                except queue.Empty:
                    kind, rest = "", []
                if kind == "progress":
                    b.update(rest[0])
                elif kind == "done":
                    left.discard(tuple(rest[0]))
                elif kind == "error":
                    raise RuntimeError(f"a worker failed on shard {rest[0]}:\n{rest[1]}")
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and left:
                    raise WorkerDied(
                        f"a worker process died while building (exit code {dead[0].exitcode}: "
                        "killed from outside, e.g. out of memory, or a crash inside a decoder); "
                        "rerun the same command to resume"
                    )
        finished = True
    finally:
        for p in procs:
            if finished:
                p.join()
            else:  # Ctrl-C, a dead worker, a bug: the rest stop now
                p.kill()
                p.join()


def slurm_parts() -> tuple[int, int]:
    """(num_parts, part) from a Slurm array job's environment, else (1, 0)."""
    env = os.environ
    if env.get("SLURM_ARRAY_TASK_COUNT") is None or env.get("SLURM_ARRAY_TASK_ID") is None:
        return 1, 0
    values = {}
    for name, default in (
        ("SLURM_ARRAY_TASK_COUNT", None),
        ("SLURM_ARRAY_TASK_ID", None),
        ("SLURM_ARRAY_TASK_MIN", "0"),
    ):
        v = env.get(name, default)
        try:
            values[name] = int(v)
        except ValueError:
            raise ValueError(f"{name}={v!r} is not an integer (Slurm array environment)") from None
    count, task = values["SLURM_ARRAY_TASK_COUNT"], values["SLURM_ARRAY_TASK_ID"]
    return count, task - values["SLURM_ARRAY_TASK_MIN"]


def parse_overrides(overrides: list[str]) -> tuple[dict, dict]:
    """``key=value`` -> (builder options, render fields); ``render.KEY=V`` goes to RenderSpec."""
    data = apply_overrides({}, overrides)
    render = data.pop("render", {}) or {}
    if not isinstance(render, dict):
        raise ValueError("render=...: give render fields as render.KEY=VALUE")
    return data, render


def describe(manifest: Manifest) -> str:
    """A short summary of a finished build."""
    parts = [
        f"{name}: {s.samples} samples, {s.frames} frames, {len(s.shards)} shards"
        + (f", {s.inputs - s.samples} quarantined" if s.inputs != s.samples else "")
        for name, s in manifest.splits.items()
    ]
    return "; ".join(parts) + f" (codec {manifest.codec})"


__all__ = [
    "BuildConfig",
    "Job",
    "WorkerDied",
    "build",
    "describe",
    "merge",
    "parse_overrides",
    "render_sample",
]
