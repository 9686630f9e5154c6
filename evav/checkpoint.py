"""Crash-safe checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNNN/``, visible only when complete.

A checkpoint directory holds

    engine/            DeepSpeed's shards (model, optimizer, scheduler), written by every rank
    train_state.pt     step, samples and frames seen, every rank's loader state and RNG states,
                       the MLflow run id, the RenderSpec hash
    config.yaml        the resolved config
    COMPLETE           the commit marker (JSON), written atomically last

Saving: every rank writes its shards -> barrier -> rank 0 writes the train state and config ->
barrier -> rank 0 writes ``COMPLETE`` (temp file + rename) -> barrier. A kill at any point
before the rename leaves a directory without a marker, which is never resumed from and is
removed by the next save. DeepSpeed's own ``latest`` file is not written and not trusted
(its loader silently starts from scratch when it is missing): evav finds checkpoints itself.

Retention: the last ``keep_last`` complete checkpoints, plus every one whose step is a multiple
of ``keep_every``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from evav import distributed as dist
from evav import faults

MARKER = "COMPLETE"
STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_RE.match(p.name)
            if m and (p / MARKER).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest(run_dir: str | Path) -> Path | None:
    """The newest committed checkpoint, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def save(
    engine,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    config_yaml: str,
    is_main: bool,
    keep_last: int = 2,
    keep_every: int = 0,
) -> Path:
    """Write a checkpoint collectively (every rank calls this) and commit it."""
    path = step_dir(run_dir, step)
    if is_main and path.exists():
        shutil.rmtree(path)  # an uncommitted leftover of a killed save
    dist.barrier()
    dist.save_engine(engine, path, "engine")
    dist.barrier()
    if is_main:
        _atomic_torch_save(state, path / "train_state.pt")
        _atomic_write(path / "config.yaml", config_yaml)
    faults.kill_in_save(step)
    dist.barrier()
    if is_main:
        marker = {"step": step, "time": time.time(), "world_size": state.get("world_size", 1)}
        _atomic_write(path / MARKER, json.dumps(marker))
        _prune(run_dir, keep_last, keep_every)
    dist.barrier()
    return path


def load(engine, path: Path) -> dict[str, Any]:
    """Load the engine shards and return the train state of committed checkpoint ``path``."""
    if not (path / MARKER).is_file():
        raise ValueError(f"checkpoint {path}: no {MARKER} marker; it was never completed")
    dist.load_engine(engine, path, "engine")
    return torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)


def read_state(path: Path) -> dict[str, Any]:
    """The train state alone (for evaluation and tools), without DeepSpeed."""
    return torch.load(Path(path) / "train_state.pt", map_location="cpu", weights_only=False)


def _prune(run_dir: Path, keep_last: int, keep_every: int) -> None:
    done = complete_checkpoints(run_dir)
    keep = {p for _, p in done[-max(1, keep_last) :]}
    keep |= {p for s, p in done if keep_every and s % keep_every == 0}
    newest = done[-1][0] if done else -1
    for _, p in done:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    for p in root.iterdir():  # uncommitted leftovers older than the newest commit
        m = STEP_RE.match(p.name)
        if m and int(m.group(1)) < newest and not (p / MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
