"""The training loop's hooks (evav/hooks.py): no-ops unless EVAV_FAULT is set, and then the
faults of evav/faults.py at exactly the step attempts, micro-batch and rank it names."""

from __future__ import annotations

import math

import torch

from evav import faults
from evav.hooks import NoHooks, loop_hooks


def fault_hooks(monkeypatch, value: str, rank: str = "0") -> faults.FaultHooks:
    monkeypatch.setenv("EVAV_FAULT", value)
    monkeypatch.setenv("RANK", rank)
    faults._faults.cache_clear()
    hooks = loop_hooks()
    faults._faults.cache_clear()  # the parse of this test's EVAV_FAULT is not left cached
    assert type(hooks) is faults.FaultHooks
    return hooks


def test_without_evav_fault_the_hooks_do_nothing(monkeypatch):
    for value in (None, ""):
        if value is None:
            monkeypatch.delenv("EVAV_FAULT", raising=False)
        else:
            monkeypatch.setenv("EVAV_FAULT", value)
        hooks = loop_hooks()
        assert type(hooks) is NoHooks
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        total = torch.tensor(1.5)
        with hooks.forward(model, 1, 0), hooks.grads(model, 1):
            model(torch.ones(1, 2)).sum().backward()
        assert hooks.loss(total, 1) is total
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert hooks.after_step(1, lambda: False, resumed=False) is None  # returns at once


def test_fault_hooks_act_at_the_named_attempts_only(monkeypatch):
    hooks = fault_hooks(monkeypatch, "nan_loss:2;inf_grad:3;nan_forward:4")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert math.isnan(hooks.loss(torch.tensor(1.0), 2).item())
    assert hooks.loss(torch.tensor(1.0), 3).item() == 1.0
    for attempt, micro in ((3, 0), (4, 0), (4, 1), (5, 0)):
        model.zero_grad()
        with hooks.forward(model, attempt, micro):
            out = model(torch.ones(1, 2)).sum()
        with hooks.grads(model, attempt):
            out.backward()
        first = next(model.parameters()).grad
        assert math.isnan(out.item()) == ((attempt, micro) == (4, 0))
        assert bool(torch.isinf(first).all()) == (attempt == 3)
    with hooks.forward(model, 4, 0):  # the forward hook is removed on leaving
        pass
    assert not math.isnan(model(torch.ones(1, 2)).sum().item())


def test_nan_forward_is_on_rank_0_only(monkeypatch):
    hooks = fault_hooks(monkeypatch, "nan_forward:1", rank="1")
    model = torch.nn.Sequential(torch.nn.Linear(2, 1))
    with hooks.forward(model, 1, 0):
        assert not math.isnan(model(torch.ones(1, 2)).item())


def test_hold_waits_for_the_release_on_a_fresh_run_only(monkeypatch):
    hooks = fault_hooks(monkeypatch, "hold:3")
    calls = []

    def released() -> bool:
        calls.append(1)
        return len(calls) >= 3

    hooks.after_step(2, released, resumed=False)
    hooks.after_step(3, released, resumed=True)
    assert calls == []  # another step, or a resumed run: no wait
    hooks.after_step(3, released, resumed=False)
    assert len(calls) == 3  # polled until released
