"""The global sample order: a pure function of (seed, dataset, epoch, index), never of the ranks.

Each dataset's split is an endless sequence of epochs. In epoch ``e``:

1. the shards are permuted with ``rng(seed, dataset, e)`` (shard-order shuffle);
2. consecutive runs of ``window`` shards form *windows*; the samples of one window are permuted
   with ``rng(seed, dataset, e, window)`` (the in-memory buffer shuffle, made exact: it is a
   permutation of a known set, not a stream buffer whose contents depend on timing).

So sample ``i`` of the dataset's sequence maps to ``(epoch, shard, member)`` by arithmetic: no
data is read to find it, a resumed loader seeks straight to its position, and the order is the
same whatever the number of ranks or workers. Several datasets are mixed by drawing, for each
global slot, which dataset supplies it, from ``rng(seed, first slot of the global batch)``.
"""

from __future__ import annotations

import bisect
import hashlib

import numpy as np


def rng(*keys: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of ints/strings (strings hashed stably)."""
    ints = [
        k
        if isinstance(k, int)
        else int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little")
        for k in keys
    ]
    return np.random.default_rng(ints)


class DatasetOrder:
    """Index -> (epoch, shard position, member) for one dataset split with known shard sizes."""

    def __init__(
        self, name: str, shard_sizes: list[int], seed: int, window: int = 4, shuffle: bool = True
    ):
        if not shard_sizes or sum(shard_sizes) == 0:
            raise ValueError(f"dataset {name}: no samples in its shards")
        self.name, self.sizes, self.seed = name, list(shard_sizes), seed
        self.window, self.shuffle = max(1, window), shuffle
        self.epoch_len = sum(shard_sizes)
        self._epochs: dict = {}  # epoch -> (windows, starts); a few recent ones
        self._perms: dict = {}  # (epoch, window) -> permutation of its samples

    def _epoch(self, epoch: int):
        """Shard order, window starts (cumulative sample counts) for one epoch."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        n = len(self.sizes)
        order = rng(self.seed, self.name, epoch).permutation(n) if self.shuffle else np.arange(n)
        windows = [order[i : i + self.window] for i in range(0, n, self.window)]
        starts = np.cumsum([0] + [sum(self.sizes[s] for s in w) for w in windows]).tolist()
        _remember(self._epochs, epoch, (windows, starts), 2)
        return windows, starts

    def _window_perm(self, epoch: int, w: int) -> np.ndarray:
        perm = self._perms.get((epoch, w))
        if perm is None:
            windows, starts = self._epoch(epoch)
            size = starts[w + 1] - starts[w]
            perm = (
                rng(self.seed, self.name, epoch, w).permutation(size)
                if self.shuffle
                else np.arange(size)
            )
            _remember(self._perms, (epoch, w), perm, 4)
        return perm

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(epoch, shard, member)`` of the dataset's ``index``-th sample."""
        epoch, offset = divmod(index, self.epoch_len)
        windows, starts = self._epoch(epoch)
        w = bisect.bisect_right(starts, offset) - 1
        within = int(self._window_perm(epoch, w)[offset - starts[w]])
        for shard in windows[w]:
            if within < self.sizes[shard]:
                return epoch, int(shard), within
            within -= self.sizes[shard]
        raise AssertionError("unreachable: window sizes are consistent")


def _remember(cache: dict, key, value, size: int) -> None:
    """A per-instance cache of the ``size`` most recent entries (reads move sequentially)."""
    cache[key] = value
    while len(cache) > size:
        cache.pop(next(iter(cache)))


def mix_choices(seed: int, slot: int, count: int, probs: np.ndarray) -> np.ndarray:
    """Which dataset fills each of ``count`` global slots starting at ``slot``."""
    if len(probs) == 1:
        return np.zeros(count, dtype=np.int64)
    return rng(seed, "mix", slot).choice(len(probs), size=count, p=probs)
