"""Shared-memory slots through which DataLoader workers hand batches of frames to the consumer.

A tensor returned by a DataLoader worker is moved into a fresh shared-memory segment and its
file descriptor is passed over a socket (torch's ``file_descriptor`` strategy): every batch pays
page faults on new memory, a socket round trip per tensor, and a thread in the worker that
competes with decoding for the GIL. On 64x64 clips that was 15-20% of a worker's time
(docs/benchmarks.md, loader section). Here each worker owns a few fixed segments, allocated once
before the workers start: it writes a batch's frames into its next slot and sends only
``(worker, slot, shape)``; the consumer copies the frames out and frees the slot.

A counting semaphore per worker makes a worker wait for a free slot, so a slot is never
overwritten before it was copied. Slots are written and freed in the same order, because the
DataLoader returns each worker's batches in order. With ``prefetch_factor + 1`` slots per worker
the wait never happens in practice: a worker gets its next index only after the consumer took an
earlier batch of its, and the consumer copies a batch out before it asks for the next one.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.multiprocessing as mp


class FrameSlots:
    def __init__(self, workers: int, slots: int, nbytes: int):
        self.slots, self.nbytes = slots, nbytes
        self._buf = [
            [torch.empty(nbytes, dtype=torch.uint8).share_memory_() for _ in range(slots)]
            for _ in range(workers)
        ]
        self._free = [mp.get_context().Semaphore(slots) for _ in range(workers)]
        self._next = 0  # in a worker: the slot it writes next (each worker has its own copy)
        self._consumer = os.getpid()

    def take(self, worker: int, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
        """In worker ``worker``: its next free slot as a uint8 array of ``shape``, and the handle
        to send in its place."""
        n = int(np.prod(shape))
        if n > self.nbytes:
            raise ValueError(f"a batch of shape {shape} does not fit a {self.nbytes}-byte slot")
        while not self._free[worker].acquire(timeout=1.0):
            if os.getpid() != self._consumer and os.getppid() != self._consumer:
                raise SystemExit(0)  # the consumer is gone: nobody will free a slot
        slot, self._next = self._next, (self._next + 1) % self.slots
        return self._buf[worker][slot][:n].numpy().reshape(shape), ("slot", worker, slot, shape)

    def receive(self, handle: tuple) -> torch.Tensor:
        """In the consumer: copy the frames out of the slot ``handle`` names, then free it."""
        _, worker, slot, shape = handle
        try:
            # numpy's copy, on this thread: torch's would wake its OpenMP pool, whose threads then
            # spin on the cores the workers decode on (measured: main process at 80% of a core)
            view = self._buf[worker][slot][: int(np.prod(shape))].numpy().reshape(shape)
            return torch.from_numpy(view.copy())
        finally:
            self._free[worker].release()
