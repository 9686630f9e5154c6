"""The streaming loader: shards -> batches, mixed by weight, in an exact, resumable order.

Stages (each a function or small class you can test alone):

    list shards      manifests of every dataset dir -> per-split shard lists and sizes  (manifest)
    order            (seed, dataset, epoch) -> shard order and window shuffle           (order.py)
    mix              (seed, slot) -> which dataset fills each global slot               (order.py)
    split            global batch of world*B slots -> this rank's B slots;
                     rank batches -> DataLoader workers round-robin                     (here)
    read             (shard, member) -> bytes, by seeking via a header index            (shards.py)
    decode + check   PyAV or decord, frame count vs metadata, crop, loss mask            (clips.py)
    batch            pad (to the longest clip, or clip_frames): frames (B,T,H,W,3) uint8,
                     loss_mask, pad_mask, task_id                                        (here)
    hand off         a worker writes frames into a reused shared-memory slot             (handoff.py)

State is tiny: the next global slot and, per dataset, how many samples it has supplied. It is
the same on every rank, so a run resumes exactly with any number of workers, and with another
number of ranks it continues each dataset's sequence with no sample lost or repeated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from evav.data.clips import DECODERS, BadSample, make_sample
from evav.data.handoff import FrameSlots
from evav.data.order import DatasetOrder, mix_choices
from evav.data.shards import ShardReader, shard_paths
from evav.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

_PREFETCH = 2  # batches each DataLoader worker prepares ahead


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard directories (each has manifest.json)
    weights: list[float] = field(default_factory=list)  # one per directory; empty: equal
    mix_by: Literal["samples", "frames"] = "samples"  # weights count samples, or frames
    clip_frames: int = 16  # longer clips are cropped to this many frames
    pad_to: Literal["longest", "clip_frames"] = "longest"  # batch length (clip_frames: one shape)
    num_workers: int = 0  # DataLoader worker processes per rank
    window: int = 4  # shards whose samples are shuffled together
    decoder: Literal["pyav", "decord"] = "pyav"  # decord: faster, trusted shards only (clips.py)
    pin_workers: bool = False  # pin DataLoader worker w to CPU core w (mod the cores allowed)
    val_split: str = "val"  # split used for periodic validation (if the datasets have it)


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
    ):
        if not cfg.train:
            raise ValueError("data.train is empty: give one or more shard directories")
        if cfg.weights and len(cfg.weights) != len(cfg.train):
            raise ValueError(
                f"data.weights has {len(cfg.weights)} entries for {len(cfg.train)} directories"
            )
        if cfg.decoder not in DECODERS:
            raise ValueError(f"data.decoder must be one of {DECODERS}, got {cfg.decoder!r}")
        if cfg.pad_to not in ("longest", "clip_frames"):
            raise ValueError(f"data.pad_to must be 'longest' or 'clip_frames', got {cfg.pad_to!r}")
        if cfg.mix_by not in ("samples", "frames"):
            raise ValueError(f"data.mix_by must be 'samples' or 'frames', got {cfg.mix_by!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        for d in cfg.train:  # shell-command URLs: the reader seeks into files, it never runs pipes
            if str(d).startswith("pipe:"):
                raise ValueError(
                    f"data.train entry {d!r} is a shell command (pipe:); give a directory"
                )
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.batch_size, self.seed, self.infinite = batch_size, seed, infinite
        self.split = cfg.val_split if split == "val" else split
        self.manifests = [load_manifest(d) for d in cfg.train]
        self.names = _dataset_names(cfg.train)
        _check_compatible(self.manifests, cfg.train)
        self.render_hash = self.manifests[0].render_hash
        self._render_hashes = [m.render_hash for m in self.manifests]  # a sample must match its own
        self.frame_size = self.manifests[0].frame_size
        self.task_names = sorted(
            {t for m in self.manifests for s in m.splits.values() for t in s.tasks}
        )
        self.task_ids = {t: i for i, t in enumerate(self.task_names)}
        self._stats = {"skipped": 0, "wait_s": 0.0, "served": np.zeros(len(self.names), np.int64)}
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
        for name, m, d in zip(self.names, self.manifests, self.cfg.train):
            s = m.splits[self.split]
            paths = shard_paths(d, s)
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

    def reset(self) -> None:
        self._state = {"slot": 0, "counts": [0] * len(self.names)}

    def stats(self, reduce=None) -> dict[str, float]:
        """``data/skipped`` (since the start), ``data/wait_s`` (seconds waited for data since the
        last call, mean over ranks) and the realised mix ``data/mix/NAME`` (share of samples, or
        of unpadded frames with ``mix_by=frames``, since the start); ``reduce(tensor, "sum")``
        sums over ranks."""
        t = torch.tensor(
            [
                float(self._stats["skipped"]),
                self._stats["wait_s"],
                *self._stats["served"].astype(float),
            ]
        )
        self._stats["wait_s"] = 0.0
        if reduce is not None:
            t = reduce(t, "sum")
        served = t[2:]
        out = {"data/skipped": float(t[0]), "data/wait_s": float(t[1]) / max(1, self.world)}
        if served.sum() > 0:
            out.update(
                {f"data/mix/{n}": float(served[i] / served.sum()) for i, n in enumerate(self.names)}
            )
        return out

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self):
        if self._datasets is None:
            raise ValueError(f"split {self.split!r} is missing from some of {self.cfg.train}")
        slots = None
        if self.cfg.num_workers > 0:
            h, w = self.frame_size
            nbytes = self.batch_size * self.cfg.clip_frames * h * w * 3
            slots = FrameSlots(self.cfg.num_workers, _PREFETCH + 1, nbytes)
        stream = _Stream(self, dict(self._state), slots)
        if self.cfg.num_workers > 0:
            it = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.cfg.num_workers,
                    prefetch_factor=_PREFETCH,
                    collate_fn=_as_is,  # not default_convert: numpy arrays travel as bytes
                    worker_init_fn=_pin_worker if self.cfg.pin_workers else None,
                )
            )
        else:
            it = iter(stream)
        while True:
            t0 = time.perf_counter()  # stall accounting: how long the consumer waits
            try:
                batch, meta = next(it)
            except StopIteration:
                return
            self._stats["wait_s"] += time.perf_counter() - t0
            self._state = {"slot": meta["slot"], "counts": meta["counts"]}
            self._stats["skipped"] += meta["skipped"]
            self._stats["served"] += np.asarray(meta["served"])
            for msg in meta["errors"]:
                _log_bad(msg)
            if batch is not None:
                yield _to_torch(batch, slots)


_bad_logged = 0


def _log_bad(msg: str) -> None:
    """Rate-limited: the first 20, then every 100th (no sleeping, unlike warn_and_continue)."""
    global _bad_logged
    _bad_logged += 1
    if _bad_logged <= 20 or _bad_logged % 100 == 0:
        log.warning("skipped bad sample #%d: %s", _bad_logged, msg)


class _Stream(torch.utils.data.IterableDataset):
    """Yields ``(batch, meta)`` for one rank from a start state; worker w takes batches n = w mod W."""

    def __init__(self, loader: Loader, start: dict, slots: FrameSlots | None = None):
        self.loader, self.start, self.slots = loader, start, slots

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        ld = self.loader
        reader = ShardReader()  # one per worker: its own file handles and indexes
        slot, counts = self.start["slot"], list(self.start["counts"])
        b, world = ld.batch_size, ld.world
        total = sum(o.epoch_len for _, _, o, _ in ld._datasets) if not ld.infinite else None
        by_frames = ld.cfg.mix_by == "frames"
        n = 0
        while True:
            g = b * world
            if total is not None and slot >= total:
                return
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
            mine = range(ld.rank * b, (ld.rank + 1) * b)
            meta = {
                "slot": slot + g,
                "counts": running,
                "skipped": 0,
                "errors": [],
                "served": np.zeros(len(ld.names), np.int64),
            }
            if n % nw == wid:
                samples = []
                for j in mine:
                    d = int(choices[j])
                    if d < 0:
                        continue
                    s = self._fetch(reader, d, int(local[j]), meta)
                    if s is not None:
                        samples.append(s)
                        meta["served"][d] += len(s.frames) if by_frames else 1
                pad = ld.cfg.clip_frames if ld.cfg.pad_to == "clip_frames" else None
                alloc = partial(self.slots.take, wid) if info and self.slots else None
                yield _collate(samples, ld.task_ids, pad, alloc), meta
            slot, counts, n = slot + g, running, n + 1

    def _fetch(self, reader: ShardReader, d: int, index: int, meta: dict):
        ld = self.loader
        _, paths, order, _ = ld._datasets[d]
        _, shard, member = order.locate(index)
        path, key = paths[shard], f"member #{member}"
        try:
            got = reader.read(path, member)
            if got is None:
                idx = reader.index(path)
                why = (
                    idx.error
                    or f"shard has {len(idx.keys)} samples, manifest says {order.sizes[shard]}"
                )
                raise BadSample(f"sample missing ({why})")
            key, members = got
            return make_sample(
                members,
                key,
                ld.cfg.clip_frames,
                ld.frame_size,
                ld.seed,
                ld.cfg.decoder,
                ld._render_hashes[d],
            )
        except BadSample as e:  # counted and logged by the consumer, rate-limited
            meta["skipped"] += 1
            meta["errors"].append(f"{path} key {key}: {e}")
            return None


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


def _to_torch(batch: dict, slots: FrameSlots | None) -> dict:
    """The consumer's side of ``_collate``: frames out of their slot, arrays as tensors."""
    if isinstance(batch["frames"], tuple):
        batch["frames"] = slots.receive(batch["frames"])
    for k in ("frames", "loss_mask", "pad_mask", "task_id"):
        if isinstance(batch[k], np.ndarray):
            batch[k] = torch.from_numpy(batch[k])
    return batch


def _dataset_names(dirs: list[str]) -> list[str]:
    names = [Path(d).name or str(d) for d in dirs]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _check_compatible(manifests: list[Manifest], dirs: list[str]) -> None:
    first = manifests[0]
    for m, d in zip(manifests[1:], dirs[1:]):
        if m.render_hash != first.render_hash:
            raise ValueError(
                f"{d}: rendered with hash {m.render_hash}, but {dirs[0]} with "
                f"{first.render_hash}; mixed datasets must share one RenderSpec"
            )
