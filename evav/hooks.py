"""The training loop's hooks: the few points inside a step where a test may reach in.

``evav.train`` makes one hooks object before its loop (``loop_hooks()``) and calls it at fixed
points of every step attempt::

    with hooks.forward(engine.module, attempt, i):   # around micro-batch i's forward
        pred = engine(...)
    total = hooks.loss(out.total, attempt)           # the micro-batch's loss, before backward
    with hooks.grads(engine.module, attempt):        # around its backward
        engine.backward(total * scale)
    hooks.after_step(step, released, resumed)        # after a step's logging and validation

``attempt`` counts step attempts from 1 in this process, skipped ones included; ``step`` is the
step just completed. By default the object is ``NoHooks``: every method does nothing (no
environment lookups, no allocation per step). Only when ``EVAV_FAULT`` is set (the crash-safety
tests set it; the syntax is in ``evav/faults.py``) is it ``evav.faults.FaultHooks``, which
injects those faults.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

_NULL = contextlib.nullcontext()  # reusable: entering it does nothing


class NoHooks:
    """Every hook a no-op: what training runs with unless a test asks for faults."""

    def forward(self, module, attempt: int, micro: int) -> contextlib.AbstractContextManager:
        """A context around micro-batch ``micro``'s forward pass at step attempt ``attempt``."""
        return _NULL

    def loss(self, total, attempt: int):
        """The micro-batch's loss as the step will use it (here: ``total`` itself)."""
        return total

    def grads(self, module, attempt: int) -> contextlib.AbstractContextManager:
        """A context around a micro-batch's backward pass at step attempt ``attempt``."""
        return _NULL

    def after_step(self, step: int, released: Callable[[], bool], resumed: bool) -> None:
        """Called once step ``step`` has been taken, logged and validated, before the next step's
        data is waited for and before its checkpoint; ``released()`` says whether a preemption
        signal has arrived, ``resumed`` whether this run started from a checkpoint."""


def loop_hooks() -> NoHooks:
    """The hooks for this process: ``NoHooks`` unless ``EVAV_FAULT`` is set (read once, here)."""
    if not os.environ.get("EVAV_FAULT"):
        return NoHooks()
    from evav.faults import FaultHooks  # only for the fault-injection tests

    return FaultHooks()
