"""The streaming loader: shards -> batches, mixed by weight, in an exact, resumable order.

Stages (each a function or small class you can test alone):

    catalog          manifests, shard lists and shard indexes, read once for every rank
                     and worker                                                         (catalog.py)
    order            (seed, dataset, epoch) -> shard order and window shuffle           (order.py)
    mix              (seed, slot) -> which dataset fills each global slot               (order.py)
    split            global batch of world*B slots -> this rank's B slots;
                     rank batches -> DataLoader workers round-robin                     (here)
    read             (shard, member) -> bytes, by seeking via the shard's index         (shards.py)
    decode + check   PyAV or decord, frame count vs metadata, crop, loss mask            (clips.py)
    batch            pad (to the longest clip, or clip_frames), or pack several clips per
                     row: frames (B,T,H,W,3) uint8, loss_mask, pad_mask, task_id
                     (packed: per frame, and segment)                                    (here)
    hand off         a worker writes frames into a reused shared-memory slot             (handoff.py)

State is tiny: the next global slot and, per dataset, how many samples it has supplied. It is
the same on every rank, so a run resumes exactly with any number of workers, and with another
number of ranks it continues each dataset's sequence with no sample lost or repeated.

Bad samples: whatever reading, parsing or decoding one sample raises (``BadSample``, an
``OSError`` from a vanished shard, a tar, struct, numpy or decoder error; never Ctrl-C or
``SystemExit``) skips that sample. The worker records it with a kind (``clips.REASONS``) and a
reason naming the shard and key; the consumer counts it (``data/skipped``,
``data/skipped/KIND``) and logs it, rate-limited. The consumer also counts bad samples in a row:
``data.max_bad_in_a_row`` of them with no good one between stops the run with
``DataExhaustedError`` (the datasets, the commonest kinds, an example of each). Counting on the
consumer's side, from each batch's ``meta``, keeps that check in one place and its message
intact (an exception raised in a DataLoader worker reaches the consumer re-wrapped).

Waiting: ``Loader.iterate(should_stop)`` returns a ``Batches`` iterator whose ``wait(n)``
returns once ``n`` batches are ready, or False as soon as ``should_stop()`` is true (checked
between samples without workers, every ``_POLL_S`` with them). The trainer waits there, at a step
boundary, so a preemption signal is honoured while the data is late; nothing it waited for is
consumed, so the loader's state is still that of the last batch handed out.

Lockstep: with several ranks, a rank none of whose samples in a global batch was good gets a
placeholder batch (one all-padding clip: no loss, no gradient) instead of skipping ahead, so every
rank takes global batch n in the same step and the ranks' states stay equal.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from evav.config import ConfigError
from evav.data.augment import augments_for
from evav.data.catalog import Catalog, read_catalog
from evav.data.clips import REASONS, BadSample, Sample, check_decoder, make_sample
from evav.data.handoff import FrameSlots
from evav.data.order import DatasetOrder, mix_choices
from evav.data.shards import ShardReader
from evav.manifest import Manifest

log = logging.getLogger(__name__)

_PREFETCH = 2  # batches each DataLoader worker prepares ahead
_POLL_S = 0.2  # with workers, how often a wait for data checks should_stop


@dataclass
class DataConfig:
    # shard directories (each has manifest.json), local or URLs: s3://bucket/prefix/dataset,
    # https://host/dataset (credentials and endpoint from the AWS_* environment; evav[remote])
    train: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # one per directory; empty: equal
    mix_by: Literal["samples", "frames"] = "samples"  # weights count samples, or frames
    clip_frames: int = 16  # longer clips are cropped to this many frames (see crop)
    # a supervised clip longer than clip_frames: keep its task frame(s) and answer and the middle
    # of its input (middle), or skip it as too_long (refuse); pretraining clips keep a seeded
    # window. Counted: data/cropped_frac (of the samples served); evav train --dry-run estimates it
    crop: Literal["middle", "refuse"] = "middle"
    # batch layout: a clip per row padded to the longest clip, or to clip_frames (one shape);
    # pack: several clips per row of clip_frames frames, first fit by decreasing length (the
    # batch carries ``segment``; temporal attention stays inside a clip): far less padding
    pad_to: Literal["longest", "clip_frames", "pack"] = "longest"
    # training-split augmentation of each sample's input frames (never validation or eval):
    # flip_crop = random horizontal flip + pad-then-random-crop moving the content by up to 1/4
    # of the frame side (CIFAR-10's 8 of 32 px), reflected border (the paper's code);
    # flip_crop_zeros: the same with a black border. One value for every data.train directory,
    # or a list, one per directory (e.g. [flip_crop, none]). Image -> word tasks only: answer
    # frames are never transformed. Drawn from (seed, dataset, epoch, key); evav/data/augment.py
    augment: (
        Literal["none", "flip_crop", "flip_crop_zeros"]
        | list[Literal["none", "flip_crop", "flip_crop_zeros"]]
    ) = "none"
    num_workers: int = 0  # DataLoader worker processes per rank
    window: int = 4  # shards whose samples are shuffled together
    # decord: faster, trusted shards only (clips.py); needs the extra: pip install 'evav[decord]'
    decoder: Literal["pyav", "decord"] = "pyav"
    pin_workers: bool = False  # pin DataLoader worker w to CPU core w (mod the cores allowed)
    val_split: str = "val"  # split used for periodic validation (if the datasets have it)
    # stop (DataExhaustedError) after this many bad samples in a row on a rank (0: never): an
    # all-bad dataset stops in seconds; a mix with an all-bad one at weight 0.5 has a 0.5**1000 chance
    max_bad_in_a_row: int = 1000


class DataExhaustedError(RuntimeError):
    """No good sample in the last ``data.max_bad_in_a_row`` read; the message names the datasets,
    the commonest reasons (kinds, counts) and an example of each."""


class Loader:
    """Batches for one rank of one split; ``state_dict``/``load_state_dict`` resume exactly."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        infinite: bool = True,
        catalog: Catalog | None = None,
    ):
        if not cfg.train:
            raise ValueError("data.train is empty: give one or more shard directories")
        if cfg.weights and len(cfg.weights) != len(cfg.train):
            raise ValueError(
                f"data.weights has {len(cfg.weights)} entries for {len(cfg.train)} directories"
            )
        why = check_decoder(cfg.decoder)  # decord is an optional extra: refused here, once
        if why:
            raise ConfigError(why)
        if cfg.crop not in ("middle", "refuse"):
            raise ValueError(f"data.crop must be 'middle' or 'refuse', got {cfg.crop!r}")
        if cfg.pad_to not in ("longest", "clip_frames", "pack"):
            raise ValueError(
                f"data.pad_to must be 'longest', 'clip_frames' or 'pack', got {cfg.pad_to!r}"
            )
        if cfg.mix_by not in ("samples", "frames"):
            raise ValueError(f"data.mix_by must be 'samples' or 'frames', got {cfg.mix_by!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        augments = augments_for(cfg.augment, len(cfg.train))  # ConfigError naming the key
        bad = cfg.max_bad_in_a_row
        if not isinstance(bad, int) or isinstance(bad, bool) or bad < 0:
            raise ValueError(f"data.max_bad_in_a_row must be an int >= 0, got {bad!r}")
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.batch_size, self.seed, self.infinite = batch_size, seed, infinite
        self.split = cfg.val_split if split == "val" else split
        # augmentation is for training only: never the validation (or any other) split
        self.augments = augments if split == "train" else ["none"] * len(cfg.train)
        if catalog is None:  # read here; training reads it once, on rank 0 (catalog.py)
            catalog = read_catalog(cfg.train, [self.split])
        elif catalog.dirs != [str(d) for d in cfg.train]:
            raise ValueError(f"catalog of {catalog.dirs} given for data.train {cfg.train}")
        self.catalog = catalog
        self.manifests = catalog.manifests
        self.names = _dataset_names(cfg.train)
        _check_compatible(self.manifests, cfg.train)
        self.render_hash = self.manifests[0].render_hash
        self._render_hashes = [m.render_hash for m in self.manifests]  # a sample must match its own
        self.frame_size = self.manifests[0].frame_size
        self.task_names = sorted(
            {t for m in self.manifests for s in m.splits.values() for t in s.tasks}
        )
        self.task_ids = {t: i for i, t in enumerate(self.task_names)}
        self._stats = _new_stats(len(self.names))
        self._state = {"slot": 0, "counts": [0] * len(self.names)}
        self._datasets = None
        if self.has_split(self.split):
            self._setup()

    # -- setup --------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        split = self.cfg.val_split if split == "val" else split
        return all(split in m.splits for m in self.manifests)

    def _setup(self) -> None:
        self._datasets = []
        for n, (name, m) in enumerate(zip(self.names, self.manifests)):
            s = m.splits[self.split]
            paths = self.catalog.paths.get((n, self.split))
            if paths is None:
                raise ValueError(f"the catalog given has no {self.split!r} split of {name}")
            order = DatasetOrder(
                name,
                [sh.samples for sh in s.shards],
                self.seed,
                self.cfg.window,
                shuffle=self.infinite,
            )
            # frames a sample contributes after crop/pad (the manifest knows means, not each clip)
            frames = min(s.frames / max(1, s.samples), self.cfg.clip_frames)
            self._datasets.append((name, paths, order, frames))
        w = np.asarray(self.cfg.weights or [1.0] * len(self.names), dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"data.weights must be non-negative and not all zero, got {self.cfg.weights}"
            )
        if self.cfg.mix_by == "frames":  # a weight is a share of frames: fewer long clips
            w = w / np.array([mean for *_, mean in self._datasets])
        self.probs = w / w.sum()

    def shard_reader(self) -> ShardReader:
        """A reader of this loader's shards (one per worker: its own files; the catalog's
        indexes, read once for every rank and worker)."""
        c = self.catalog
        return ShardReader(indexes=c.indexes, no_index=c.no_index, listed=c.listed)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "slot": int(self._state["slot"]),
            "counts": [int(c) for c in self._state["counts"]],
            "datasets": list(self.names),
            "seed": self.seed,
        }

    def load_state_dict(
        self, state: dict | list[dict], saved_world_size: int | None = None
    ) -> None:
        """Restore a state (or the list of every rank's states, which are identical)."""
        states = state if isinstance(state, list) else [state]
        first = states[0]
        if any(s["slot"] != first["slot"] or s["counts"] != first["counts"] for s in states):
            raise ValueError("loader states differ across ranks; the checkpoint is inconsistent")
        if first["datasets"] != list(self.names):
            raise ValueError(
                f"checkpoint's datasets {first['datasets']} differ from data.train {self.names}; "
                "resuming would not continue the same sample order"
            )
        if first["seed"] != self.seed:
            raise ValueError(
                f"checkpoint's data seed {first['seed']} differs from seed {self.seed}"
            )
        self._state = {"slot": first["slot"], "counts": list(first["counts"])}

    def identity(self) -> list[dict]:
        """What each dataset is, for the resume contract (evav/resume.py): its name, builder,
        builder_version, render_hash and every split's shard sha256s in order, from the
        manifests (no shard is read), and ``digest``: 16 hex digits of a sha256 over all but the
        name (a moved folder is the same data; rebuilt shards are not)."""
        from evav.resume import identity_digest  # resume imports nothing of the data package

        out = []
        for name, m in zip(self.names, self.manifests):
            parts = {
                "name": name,
                "builder": m.builder,
                "builder_version": m.builder_version,
                "render_hash": m.render_hash,
                "splits": {s: [sh.sha256 for sh in m.splits[s].shards] for s in sorted(m.splits)},
            }
            out.append({**parts, "digest": identity_digest(parts)})
        return out

    def reset(self) -> None:
        """Back to the start, statistics too (validation reads its split afresh each time)."""
        self._state = {"slot": 0, "counts": [0] * len(self.names)}
        self._stats = _new_stats(len(self.names))

    def stats(self, reduce=None) -> dict[str, float]:
        """``data/skipped`` (bad samples since the start) and ``data/skipped/KIND`` for each kind
        of ``clips.REASONS`` that occurred, ``data/wait_s`` (seconds waited for data since the
        last call, mean over ranks) and the realised mix ``data/mix/NAME`` (share of samples, or
        of unpadded frames with ``mix_by=frames``, since the start); ``reduce(tensor, "sum")``
        sums over ranks (every rank sends the same fixed-length vector)."""
        st = self._stats
        skipped, served = st["skipped"], st["served"]
        t = torch.tensor(
            [st["wait_s"], st["good"], st["cropped"], *served, *skipped], dtype=torch.float64
        )
        st["wait_s"] = 0.0
        if reduce is not None:
            t = reduce(t, "sum")
        wait, good, cropped = t[0], t[1], t[2]
        served, skipped = t[3 : 3 + len(served)], t[3 + len(served) :]
        out = {"data/skipped": float(skipped.sum())}
        if good > 0:
            out["data/cropped_frac"] = float(cropped / good)
        out.update({f"data/skipped/{k}": float(n) for k, n in zip(REASONS, skipped) if n > 0})
        out["data/wait_s"] = float(wait) / max(1, self.world)
        if served.sum() > 0:
            out.update(
                {f"data/mix/{n}": float(served[i] / served.sum()) for i, n in enumerate(self.names)}
            )
        return out

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Batches:
        return self.iterate()

    def iterate(self, should_stop: Callable[[], bool] | None = None) -> Batches:
        """One pass from the current state (endless unless ``infinite=False``); ``should_stop``:
        a check that ends ``Batches.wait`` early (the trainer's preemption flag)."""
        if self._datasets is None:
            raise ValueError(f"split {self.split!r} is missing from some of {self.cfg.train}")
        return Batches(self, should_stop)

    def _consumed(self, meta: dict) -> None:
        """A batch was handed out: the state moves past it (and past the bad ones before it)."""
        self._state = {"slot": meta["slot"], "counts": list(meta["counts"])}
        self._stats["served"] += np.asarray(meta["served"])
        self._stats["good"] += meta["good"]
        self._stats["cropped"] += meta["cropped"]

    def placeholder(self) -> dict:
        """One all-padding clip: no frame is a target, so its loss is 0 and its gradient too."""
        t, (h, w) = self.cfg.clip_frames, self.frame_size
        return {
            "frames": torch.zeros((1, t, h, w, 3), dtype=torch.uint8),
            "loss_mask": torch.zeros((1, t), dtype=torch.bool),
            "pad_mask": torch.ones((1, t), dtype=torch.bool),
            "task_id": torch.zeros(1, dtype=torch.int64),
            "task": [""],
            "key": [""],
            "answer": [""],
        }


def _new_stats(num_datasets: int) -> dict:
    return {
        "skipped": np.zeros(len(REASONS), np.int64),  # per kind, in REASONS order
        "wait_s": 0.0,
        "served": np.zeros(num_datasets, np.int64),
        "good": 0,  # samples served
        "cropped": 0,  # of them, cropped to data.clip_frames
    }


_END = object()  # the pass is over (a finite split read to its end)


class Batches:
    """A Loader's batches: ``next()`` hands one out (and moves the loader's state past it);
    ``wait(n)`` returns True once ``n`` are ready, or False as soon as ``should_stop()`` is true
    (or the pass has ended), handing none out. ``next()`` itself waits as long as it takes.

    Batches arrive with their ``meta`` (state after them, samples served, every sample's outcome);
    the bad outcomes are counted, logged and checked against ``max_bad_in_a_row`` here, on
    arrival, in the order of the global batches.
    """

    def __init__(self, loader: Loader, should_stop: Callable[[], bool] | None = None):
        self.loader, self.should_stop = loader, should_stop
        cfg = loader.cfg
        self._slots = None
        if cfg.num_workers > 0:
            h, w = loader.frame_size
            nbytes = loader.batch_size * cfg.clip_frames * h * w * 3
            self._slots = FrameSlots(cfg.num_workers, _PREFETCH + 1, nbytes)
        self._stream = _Stream(loader, dict(loader._state), self._slots)
        if cfg.num_workers > 0:
            self._workers = iter(
                torch.utils.data.DataLoader(
                    self._stream,
                    batch_size=None,
                    num_workers=cfg.num_workers,
                    prefetch_factor=_PREFETCH,
                    collate_fn=_as_is,  # not default_convert: numpy arrays travel as bytes
                    worker_init_fn=_pin_worker if cfg.pin_workers else None,
                    timeout=_POLL_S,  # a get gives up after this long: wait() checks should_stop
                )
            )
        else:  # in this process: read plan by plan, checking should_stop between samples
            self._plans, self._plan = self._stream.plans(), None
            self._reader = loader.shard_reader()
        self._ready: deque[tuple[dict, dict]] = deque()  # arrived, not yet handed out
        self._bad = _BadRun(loader)
        self._ended = False

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        while not self._ready:
            if not self._receive(stoppable=False):
                raise StopIteration
        batch, meta = self._ready.popleft()
        self.loader._consumed(meta)
        return batch

    def wait(self, n: int = 1) -> bool:
        """Wait until ``n`` batches are ready; False if ``should_stop()`` came true first."""
        waited = False
        while len(self._ready) < n:
            if self.should_stop is not None and self.should_stop():
                if waited:  # (told to stop before it waited at all: nothing to report)
                    log.warning(
                        "stopped waiting for data: %d of %d batches ready", len(self._ready), n
                    )
                return False
            if not self._receive(stoppable=True):
                return False
            waited = True
        return True

    def _receive(self, stoppable: bool) -> bool:
        """Take what arrives within one poll (maybe nothing); False once the pass is over."""
        if self._ended:
            return False
        t0 = time.perf_counter()  # stall accounting: how long the consumer waits
        try:
            item = self._next_item(stoppable)
        finally:
            self.loader._stats["wait_s"] += time.perf_counter() - t0
        if item is _END:
            self._ended = True
            return False
        if item is not None:
            batch, meta = item
            self._bad.add(meta["outcomes"])  # may raise DataExhaustedError
            if batch is not None:
                self._ready.append((_to_torch(batch, self._slots), meta))
            elif self.loader.world > 1:  # no good sample of this rank: keep the ranks in step
                self._ready.append((self.loader.placeholder(), meta))
            # alone, nothing to hand out: the next batch's meta carries the state past this one
        return True

    def _next_item(self, stoppable: bool):
        """``(batch, meta)``, None (nothing yet, or interrupted by should_stop), or ``_END``."""
        if self._slots is None:
            if self._plan is None:
                self._plan = next(self._plans, _END)
                if self._plan is _END:
                    return _END
            stop = self.should_stop if stoppable else None
            item = self._stream.read(self._reader, self._plan, stop=stop)
            if item is not None:  # else interrupted: this plan is read again from its start
                self._plan = None
            return item
        try:
            return next(self._workers)
        except StopIteration:
            return _END
        except RuntimeError as e:
            # the DataLoader's own timeout (its workers still at it): poll again; a worker that
            # died is another RuntimeError, raised
            if str(e).startswith("DataLoader timed out"):
                return None
            raise


class _BadRun:
    """Counts bad samples (per kind, for ``stats``), logs them, and tracks the current run of bad
    samples with no good one between; ``max_bad_in_a_row`` of them raise DataExhaustedError."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.limit = loader.cfg.max_bad_in_a_row
        self._clear()

    def _clear(self) -> None:
        self.count, self.kinds, self.examples, self.datasets = 0, Counter(), {}, set()

    def add(self, outcomes: list[tuple[int, str | None, str | None]]) -> None:
        for d, kind, why in outcomes:
            if kind is None:  # a good sample ends the run
                if self.count:
                    self._clear()
                continue
            self.loader._stats["skipped"][REASONS.index(kind)] += 1
            _log_bad(kind, why)
            self.count += 1
            self.kinds[kind] += 1
            self.examples.setdefault(kind, why)
            self.datasets.add(d)
            if self.limit and self.count >= self.limit:
                raise DataExhaustedError(self.message())

    def message(self) -> str:
        dirs = ", ".join(str(self.loader.cfg.train[d]) for d in sorted(self.datasets))
        common = "; ".join(
            f"{n} {kind} (e.g. {_clip(self.examples[kind], 300)})"
            for kind, n in self.kinds.most_common(3)
        )
        rest = self.count - sum(n for _, n in self.kinds.most_common(3))
        return (
            f"no good sample in the last {self.count} read from {dirs}: {common}"
            + (f"; {rest} of other kinds" if rest else "")
            + f" (data.max_bad_in_a_row={self.limit}; 0 never stops)"
        )


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


_bad_logged = 0


def _log_bad(kind: str, why: str) -> None:
    """Rate-limited: the first 20, then every 100th (no sleeping, unlike warn_and_continue)."""
    global _bad_logged
    _bad_logged += 1
    if _bad_logged <= 20 or _bad_logged % 100 == 0:
        log.warning("skipped bad sample #%d (%s): %s", _bad_logged, kind, why)


@dataclass
class _Plan:
    """One global batch: the state after it, and this rank's slots as (dataset, index) pairs
    (dataset -1: no sample, past the end of a finite split)."""

    slot: int
    counts: list[int]
    mine: list[tuple[int, int]]


class _Stream(torch.utils.data.IterableDataset):
    """This rank's batches from a start state. ``plans()`` says which samples make each global
    batch (arithmetic, no reads); ``read`` reads this rank's share of one. In DataLoader worker w
    of W, iterating yields ``(batch, meta)`` for the global batches n = w mod W."""

    def __init__(self, loader: Loader, start: dict, slots: FrameSlots | None = None):
        self.loader, self.start, self.slots = loader, start, slots

    def __iter__(self) -> Iterator[tuple[dict | None, dict]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = self.loader.shard_reader()  # one per worker: its own file handles
        alloc = partial(self.slots.take, wid) if info and self.slots else None
        for n, plan in enumerate(self.plans()):
            if n % nw == wid:
                yield self.read(reader, plan, alloc)

    def plans(self) -> Iterator[_Plan]:
        ld = self.loader
        slot, counts = self.start["slot"], list(self.start["counts"])
        g = ld.batch_size * ld.world
        total = sum(o.epoch_len for _, _, o, _ in ld._datasets) if not ld.infinite else None
        mine = range(ld.rank * ld.batch_size, (ld.rank + 1) * ld.batch_size)
        while total is None or slot < total:
            if ld.infinite:
                choices = mix_choices(ld.seed, slot, g, ld.probs)
            else:
                choices = _sequential_choices(ld._datasets, slot, g)
            # dataset-local index of every slot of this global batch
            local = np.empty(g, dtype=np.int64)
            running = list(counts)
            for j, d in enumerate(choices):
                local[j] = running[d] if d >= 0 else -1
                if d >= 0:
                    running[d] += 1
            yield _Plan(slot + g, running, [(int(choices[j]), int(local[j])) for j in mine])
            slot, counts = slot + g, running

    def read(
        self,
        reader: ShardReader,
        plan: _Plan,
        alloc=None,
        stop: Callable[[], bool] | None = None,
    ) -> tuple[dict | None, dict] | None:
        """``(batch, meta)`` of this rank's samples of ``plan`` (batch None: none was good), or
        None if ``stop()`` came true between two samples (nothing of the plan is kept)."""
        ld = self.loader
        meta: dict[str, Any] = {
            "slot": plan.slot,
            "counts": plan.counts,
            "served": np.zeros(len(ld.names), np.int64),
            "good": 0,
            "cropped": 0,
            "outcomes": [],  # (dataset, kind, reason) per sample, in order; kind None: good
        }
        samples = []
        for d, index in plan.mine:
            if d < 0:
                continue
            if stop is not None and stop():
                return None
            s, bad = self._fetch(reader, d, index)
            meta["outcomes"].append((d, *bad) if s is None else (d, None, None))
            if s is not None:
                samples.append(s)
                meta["good"] += 1
                meta["cropped"] += s.cropped
                meta["served"][d] += len(s.frames) if ld.cfg.mix_by == "frames" else 1
        if ld.cfg.pad_to == "pack":
            return _collate_packed(samples, ld.task_ids, ld.cfg.clip_frames, alloc), meta
        pad = ld.cfg.clip_frames if ld.cfg.pad_to == "clip_frames" else None
        return _collate(samples, ld.task_ids, pad, alloc), meta

    def _fetch(self, reader: ShardReader, d: int, index: int) -> tuple[Sample | None, tuple]:
        """``(sample, None)``, or ``(None, (kind, reason))`` if anything about it is bad."""
        ld = self.loader
        _, paths, order, _ = ld._datasets[d]
        epoch, shard, member = order.locate(index)
        path, key = paths[shard], f"member #{member}"
        stage = "read_error"  # what an unexpected exception means: reading, then making
        try:
            got = reader.read(path, member)
            if got is None:
                idx = reader.index(path)
                if idx.unreadable:
                    raise BadSample(idx.error, "read_error")
                why = (
                    idx.error
                    or f"shard has {len(idx.keys)} samples, manifest says {order.sizes[shard]}"
                )
                raise BadSample(f"sample missing ({why})", "missing_sample")
            key, members = got
            if not members:
                raise BadSample("the shard ends inside this sample's data", "missing_sample")
            stage = "other"
            sample = make_sample(
                members,
                key,
                ld.cfg.clip_frames,
                ld.frame_size,
                ld.seed,
                ld.cfg.decoder,
                ld._render_hashes[d],
                ld.cfg.crop,
                ld.augments[d],
                (ld.names[d], epoch),
            )
            return sample, None
        except BadSample as e:
            kind, why = e.kind, str(e)
        except ImportError:  # a package not installed (decord) is the install's, no sample's
            raise
        except Exception as e:  # noqa: BLE001 - whatever one sample raises is that sample's
            # (KeyboardInterrupt and SystemExit are no Exception: they still stop the run)
            kind, why = stage, f"{type(e).__name__}: {_clip(str(e), 300)}"
        key = reader.key(path, member) or key
        return None, (kind, f"{path} key {key}: {why}")


def _as_is(item):
    return item


def _pin_worker(worker_id: int) -> None:
    """Pin a DataLoader worker to one core, so workers do not migrate and share caches."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[worker_id % len(cores)]})


def _sequential_choices(datasets, slot: int, g: int) -> np.ndarray:
    """Evaluation order: every dataset once, in order; -1 past the end."""
    bounds = np.cumsum([0] + [o.epoch_len for _, _, o, _ in datasets])
    pos = np.arange(slot, slot + g)
    d = np.searchsorted(bounds, pos, side="right") - 1
    d[pos >= bounds[-1]] = -1
    return d


def _collate(samples, task_ids: dict[str, int], pad_to: int | None, alloc=None) -> dict | None:
    """Pad the clips to ``pad_to`` frames (None: the longest clip) and stack them, writing each
    frame once: into a new array, or in a worker into ``alloc(shape)``'s shared-memory slot
    (whose handle the batch then carries instead of the frames, see handoff.py). Arrays stay numpy
    here: they travel from a worker as bytes in the queue message, not as shared tensors."""
    if not samples:
        return None
    b, t_max = len(samples), pad_to or max(len(s.frames) for s in samples)
    shape = (b, t_max, *samples[0].frames.shape[1:])
    frames, handle = alloc(shape) if alloc else (np.empty(shape, np.uint8), None)
    loss_mask = np.zeros((b, t_max), dtype=bool)
    pad_mask = np.ones((b, t_max), dtype=bool)
    for i, s in enumerate(samples):
        t = len(s.frames)
        frames[i, :t] = s.frames
        frames[i, t:] = 0
        loss_mask[i, :t] = s.loss_mask
        pad_mask[i, :t] = False
    return {
        "frames": frames if handle is None else handle,
        "loss_mask": loss_mask,
        "pad_mask": pad_mask,
        "task_id": np.array([task_ids.get(s.task, 0) for s in samples], dtype=np.int64),
        "task": [s.task for s in samples],
        "key": [s.key for s in samples],
        "answer": [s.answer for s in samples],
    }


def pack_rows(lengths: list[int], row_frames: int) -> list[list[int]]:
    """First fit by decreasing length: the sample indices of each row of ``row_frames`` frames,
    in the order they sit along it. Deterministic (ties keep the samples' order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > row_frames:
            raise ValueError(f"a clip of {n} frames does not fit a row of {row_frames}")
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([])
            room.append(row_frames)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    return rows


def _collate_packed(samples, task_ids: dict[str, int], row_frames: int, alloc=None) -> dict | None:
    """``_collate`` with several clips per row of ``row_frames`` frames (``pack_rows``). Each row
        has ``segment`` (B, T): the clip's number along its row, padding the next number; its
        ``loss_mask`` is False at each clip's first frame (nothing before it in the row predicts it)
        and ``task_id`` is per frame. ``task``, ``key`` and ``answer`` stay per sample; ``row_first``
    is the sample each row starts with (its segment 0)."""
    if not samples:
        return None
    rows = pack_rows([len(s.frames) for s in samples], row_frames)
    shape = (len(rows), row_frames, *samples[0].frames.shape[1:])
    frames, handle = alloc(shape) if alloc else (np.empty(shape, np.uint8), None)
    loss_mask = np.zeros(shape[:2], dtype=bool)
    pad_mask = np.ones(shape[:2], dtype=bool)
    segment = np.zeros(shape[:2], dtype=np.int64)
    task_id = np.zeros(shape[:2], dtype=np.int64)
    for r, members in enumerate(rows):
        t = 0
        for j, i in enumerate(members):
            s, n = samples[i], len(samples[i].frames)
            frames[r, t : t + n] = s.frames
            loss_mask[r, t : t + n] = s.loss_mask
            loss_mask[r, t] = False
            pad_mask[r, t : t + n] = False
            segment[r, t : t + n] = j
            task_id[r, t : t + n] = task_ids.get(s.task, 0)
            t += n
        frames[r, t:] = 0
        segment[r, t:] = len(members)
    return {
        "frames": frames if handle is None else handle,
        "loss_mask": loss_mask,
        "pad_mask": pad_mask,
        "task_id": task_id,
        "segment": segment,
        "row_first": [members[0] for members in rows],  # the sample at each row's start
        "task": [s.task for s in samples],
        "key": [s.key for s in samples],
        "answer": [s.answer for s in samples],
    }


def _to_torch(batch: dict, slots: FrameSlots | None) -> dict:
    """The consumer's side of ``_collate``: frames out of their slot, arrays as tensors."""
    if isinstance(batch["frames"], tuple):
        batch["frames"] = slots.receive(batch["frames"])
    for k in ("frames", "loss_mask", "pad_mask", "task_id", "segment"):
        if isinstance(batch.get(k), np.ndarray):
            batch[k] = torch.from_numpy(batch[k])
    return batch


def _dataset_names(dirs: list[str]) -> list[str]:
    names = [Path(d).name or str(d) for d in dirs]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _check_compatible(manifests: list[Manifest], dirs: list[str]) -> None:
    """Mixed datasets must share one RenderSpec; the error names the fields that differ."""
    first = manifests[0]
    for m, d in zip(manifests[1:], dirs[1:]):
        if m.render_hash == first.render_hash:
            continue
        ours, theirs = _flat(m.render_spec), _flat(first.render_spec)
        keys = sorted(ours.keys() | theirs.keys())
        diff = [k for k in keys if ours.get(k, _ABSENT) != theirs.get(k, _ABSENT)]
        if diff:
            what = ", ".join(
                f"{k}={_show(ours.get(k, _ABSENT))} ({dirs[0]}: {_show(theirs.get(k, _ABSENT))})"
                for k in diff[:4]
            ) + (f" and {len(diff) - 4} more field(s)" if len(diff) > 4 else "")
        else:  # same fields, other hash: the hash covers more than the fields (another version)
            what = (
                f"render hash {m.render_hash[:16]} ({dirs[0]}: {first.render_hash[:16]}) "
                "though the same render_spec fields (built by another evav version?)"
            )
        raise ValueError(f"{d}: rendered with {what}; mixed datasets must share one RenderSpec")


def _flat(spec: dict, prefix: str = "") -> dict[str, Any]:
    """A nested RenderSpec dict as dotted keys (``audio.sample_rate``)."""
    out = {}
    for k, v in spec.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = object()  # a field one spec has and the other lacks


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else _clip(repr(v) if isinstance(v, str) else str(v), 40)
