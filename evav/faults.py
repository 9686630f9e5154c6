"""Fault injection for the crash-safety tests: off unless ``EVAV_FAULT`` is set.

    EVAV_FAULT=kill_in_save:20      SIGKILL this process inside the save of step 20's checkpoint,
                                    after the engine shards are written, before the commit marker
    EVAV_FAULT=nan_loss:5,6,7       make the training loss non-finite at these step attempts
                                    (1-based, counted from the start of this process, skipped
                                    ones included)
    EVAV_FAULT=inf_grad:5           make a parameter's gradient infinite (the loss stays finite)
                                    in the backward passes of step attempt 5 (counted as for
                                    nan_loss)
    EVAV_FAULT=nan_forward:5        make the activations NaN inside the forward pass (a forward
                                    hook on the model's first child, its patch embedding) of
                                    micro-batch 0 of step attempt 5, on rank 0 only (RANK unset
                                    counts as 0)
    EVAV_FAULT=hold:30              at the end of step 30 of a fresh (not resumed) run, wait (at
                                    most 300 s) until a preemption signal has arrived: a
                                    preemption test then checkpoints mid-run however fast the
                                    machine trains, and its resumed run goes straight on
    EVAV_FAULT=kill_in_publish:3    SIGKILL this process while publishing staged files, once 3
                                    have been uploaded (evav/data/publish.py)

Several faults are separated by ``;``. The faults inside a training step (``nan_loss``,
``inf_grad``, ``nan_forward``, ``hold``) are ``FaultHooks``, the hooks object that
``evav.hooks.loop_hooks()`` gives the training loop only when ``EVAV_FAULT`` is set (otherwise
the loop runs with ``evav.hooks.NoHooks``, which does nothing). ``kill_in_save``
(evav/checkpoint.py) and ``kill_in_publish`` (evav/data/publish.py) are asked through ``active``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable

from evav.hooks import NoHooks

HOLD_TIMEOUT_S = 300.0


@functools.lru_cache(maxsize=1)
def _faults() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for part in filter(None, os.environ.get("EVAV_FAULT", "").split(";")):
        name, _, steps = part.partition(":")
        out[name.strip()] = {int(s) for s in steps.split(",") if s.strip()}
    return out


def active(name: str, step: int) -> bool:
    return step in _faults().get(name, ())


def kill_in_save(step: int) -> None:
    if active("kill_in_save", step):
        os.kill(os.getpid(), signal.SIGKILL)


class FaultHooks(NoHooks):
    """The training-loop hooks (evav/hooks.py) that inject the faults ``EVAV_FAULT`` names, at the
    step attempts (``hold``: the step) it lists; ``RANK`` is read once, when they are made."""

    def __init__(self) -> None:
        self.faults = _faults()
        self.rank = int(os.environ.get("RANK", "0"))

    def _at(self, name: str, step: int) -> bool:
        return step in self.faults.get(name, ())

    def forward(self, module, attempt: int, micro: int) -> contextlib.AbstractContextManager:
        """At the ``nan_forward`` attempts, micro-batch 0 on rank 0, the output of the module's
        first child (the patch embedding) is made NaN, so the NaN arises inside the forward and
        runs through every block (and every gradient is NaN), not only in the loss."""
        if not self._at("nan_forward", attempt) or micro != 0 or self.rank != 0:
            return contextlib.nullcontext()
        return _nan_forward(next(module.children()))

    def loss(self, total, attempt: int):
        """At the ``nan_loss`` attempts the loss is made NaN."""
        return total * float("nan") if self._at("nan_loss", attempt) else total

    def grads(self, module, attempt: int) -> contextlib.AbstractContextManager:
        """At the ``inf_grad`` attempts, the gradient reaching the module's first parameter is
        made inf (a tensor hook, so it acts before DeepSpeed's gradient hooks at every ZeRO
        stage)."""
        if not self._at("inf_grad", attempt):
            return contextlib.nullcontext()
        return _inf_grad(next(p for p in module.parameters() if p.requires_grad))

    def after_step(self, step: int, released: Callable[[], bool], resumed: bool) -> None:
        """At the ``hold`` step of a fresh run, wait (at most 300 s) until ``released()``."""
        if self._at("hold", step) and not resumed:
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while not released() and time.monotonic() < deadline:
                time.sleep(0.05)


@contextlib.contextmanager
def _nan_forward(child):
    handle = child.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _inf_grad(param):
    import torch  # only when the fault is on: faults.py stays light

    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        yield
    finally:
        handle.remove()
