"""evav.data.handoff: the shared-memory slots that carry frames from loader workers."""

from __future__ import annotations

import threading

import pytest

from evav.data.handoff import FrameSlots


def test_frames_arrive_intact_and_are_copies_not_views_of_the_slot():
    slots = FrameSlots(workers=1, slots=2, nbytes=2 * 3 * 4)
    got = []
    for value in range(5):  # more batches than slots: each slot is written several times
        out, handle = slots.take(0, (2, 3, 4))
        out[:] = value
        got.append(slots.receive(handle))
    assert [int(t.unique().item()) for t in got] == [0, 1, 2, 3, 4]
    assert all(t.shape == (2, 3, 4) for t in got)


def test_a_worker_waits_for_a_free_slot_instead_of_overwriting_one():
    slots = FrameSlots(workers=1, slots=2, nbytes=8)
    first = slots.take(0, (8,))
    slots.take(0, (8,))
    third = []
    t = threading.Thread(target=lambda: third.append(slots.take(0, (8,))), daemon=True)
    t.start()
    t.join(1.5)  # longer than a take's 1 s wait between checks that the consumer lives
    assert t.is_alive() and not third  # both slots are still unread
    slots.receive(first[1])
    t.join(5)
    assert third and third[0][1][2] == 0  # it got slot 0 back, once that was copied out


def test_a_batch_larger_than_a_slot_is_an_error():
    slots = FrameSlots(workers=1, slots=1, nbytes=10)
    with pytest.raises(ValueError, match="does not fit"):
        slots.take(0, (11,))
