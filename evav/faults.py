"""Fault injection for the crash-safety tests: off unless ``EVAV_FAULT`` is set.

    EVAV_FAULT=kill_in_save:20      SIGKILL this process inside the save of step 20's checkpoint,
                                    after the engine shards are written, before the commit marker
    EVAV_FAULT=nan_loss:5,6,7       make the training loss non-finite at these step attempts (1-based,
                                    counted from the start of this process, skipped ones included)
    EVAV_FAULT=inf_grad:5           make a parameter's gradient infinite (the loss stays finite)
                                    in the backward passes of step attempt 5 (counted as for nan_loss)
    EVAV_FAULT=nan_forward:5        make the activations NaN inside the forward pass (a forward
                                    hook on the model's first child, its patch embedding) of micro-batch 0 of step attempt 5, on
                                    rank 0 only (RANK unset counts as 0)
    EVAV_FAULT=hold:30              at the end of step 30 of a fresh (not resumed) run, wait (at
                                    most 300 s) until a preemption signal has arrived: a
                                    preemption test then checkpoints mid-run however fast the
                                    machine trains, and its resumed run goes straight on

Several faults are separated by ``;``. The hooks cost one dict lookup when unset.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable


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


def hold(step: int, released: Callable[[], bool], resumed: bool, timeout_s: float = 300.0) -> None:
    if active("hold", step) and not resumed:
        deadline = time.monotonic() + timeout_s
        while not released() and time.monotonic() < deadline:
            time.sleep(0.05)


def inf_grad(module, step: int) -> contextlib.AbstractContextManager:
    """A context for the backward pass: at the ``inf_grad`` attempts, the gradient reaching the
    module's first parameter is made inf (a tensor hook, so it acts before DeepSpeed's gradient
    hooks at every ZeRO stage)."""
    if not active("inf_grad", step):
        return contextlib.nullcontext()
    return _inf_grad(next(p for p in module.parameters() if p.requires_grad))


def nan_forward(module, step: int, micro: int) -> contextlib.AbstractContextManager:
    """A context for the forward pass: at the ``nan_forward`` attempts, micro-batch 0 on rank 0,
    the output of the module's first child (the patch embedding) is made NaN, so the NaN arises
    inside the forward and runs through every block (and every gradient is NaN), not only in
    the loss."""
    if not active("nan_forward", step) or micro != 0 or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return _nan_forward(next(module.children()))


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
