"""What a training config will do, worked out before anything starts: `evav train --dry-run`, and
the start-up summary of a real run.

    evav train configs/debug.yaml data.train=[shards/synthetic] --dry-run [--world-size 8]

``describe(cfg, world_size)`` resolves the config, reads every dataset's catalog (manifests,
shard lists, shard indexes: what the loader checks before its first sample), builds the Loader
(compatible render specs, frame size against the model, the mix weights), reads a sample of each
dataset's clips (``clip_lengths``: their lengths against ``data.clip_frames``, how many would be
cropped or refused by ``data.crop``), builds the model on the meta device (its parameter count,
no memory) and estimates the FLOPs of a step and the memory per rank for every ZeRO stage and
precision (``memory_table``). No process group, no DeepSpeed: seconds. A mistake is the same
one-line error the real run gives.

Memory: the model states per rank are exact bookkeeping (ZeRO paper, Rajbhandari et al. 2020,
counted as DeepSpeed's estimators count them: bf16 keeps 16-bit weights and gradients and, in
fp32, the gradients it accumulates, master weights and Adam's two moments, 2 + 2 + 16 bytes a
parameter (ZeRO 0: no fp32 gradients), of which ZeRO-1 partitions the 16 fp32 bytes over the
ranks, ZeRO-2 the 16-bit gradients too, ZeRO-3 everything but its largest layer, gathered whole
(DeepSpeed's ZeRO-3 estimator leaves out the rank's partition of the 16-bit weights, 2 bytes a
parameter over the ranks: counted here); fp32 keeps 4 + 4 + 8). Activations: what autograd
keeps for backward, measured (``torch.autograd.graph.saved_tensors_hooks``, storages counted
once, parameters left out; tests/test_plan.py checks it on flat and paper models): per block,
76 bytes per token and channel under bf16 autocast (plus its bf16 copy of the weights, 2 bytes a
parameter) and 126 in fp32, attention through SDPA keeping no score matrix. With
``model.grad_checkpointing`` only each block's input is kept, and one block is recomputed at a
time. Framework buffers, the allocator's fragmentation and DeepSpeed's communication buckets are
not counted: leave 10-20 % free.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from evav.data import Loader
from evav.data.catalog import Catalog, read_catalog
from evav.data.clips import BadSample, crop_window
from evav.manifest import parse_sample_meta
from evav.model import build_model, train_flops_per_frame
from evav.model.build import num_params
from evav.version import code_version, git_commit

CLIPS_READ = 64  # clips read per dataset for the length statistics


@dataclass
class Lengths:
    """Clip lengths of a sample of one dataset's clips, against ``data.clip_frames``."""

    read: int  # clips read
    of: int  # clips in the split
    frames: list[int]
    cropped: int  # longer than clip_frames, kept in part (data.crop=middle)
    refused: int  # too long to keep their task frame and answer (or data.crop=refuse)

    def line(self, clip_frames: int) -> str:
        if not self.frames:
            return "no clip could be read"
        f = sorted(self.frames)
        p90 = f[min(len(f) - 1, int(0.9 * len(f)))]
        share = f"{self.read} of {self.of} read" if self.read < self.of else f"all {self.of}"
        out = (
            f"clip frames min {f[0]} median {statistics.median(f):g} p90 {p90} max {f[-1]} "
            f"({share}): {self.cropped / self.read:.0%} cropped to clip_frames={clip_frames}"
        )
        if self.refused:
            out += f", {self.refused / self.read:.0%} too long (skipped as too_long)"
        return out


def clip_lengths(loader: Loader, n: int = CLIPS_READ) -> list[Lengths]:
    """For each dataset of ``loader`` (its split), ``n`` clips spread evenly over its shards:
    their ``KEY.json`` frame counts, and what ``data.crop`` does to them."""
    out = []
    reader = loader.shard_reader()
    cfg = loader.cfg
    try:
        for d, m in enumerate(loader.manifests):
            s = m.splits[loader.split]
            paths = loader.catalog.paths[(d, loader.split)]
            where = [(p, j) for p, sh in zip(paths, s.shards) for j in range(sh.samples)]
            picks = np.linspace(0, len(where) - 1, min(n, len(where))).round().astype(int)
            got = Lengths(0, len(where), [], 0, 0)
            for i in sorted(set(picks.tolist())):
                path, member = where[i]
                try:
                    key, members = reader.read(path, member) or ("", {})
                    meta = parse_sample_meta(members["json"], f"{path} {key}.json")
                except (OSError, KeyError, ValueError):
                    continue  # a bad sample: the loader skips and counts it; not a length
                got.read += 1
                got.frames.append(meta.num_frames)
                try:
                    pieces = crop_window(meta, meta.num_frames, cfg.clip_frames, 0, key, cfg.crop)
                    got.cropped += pieces != [(0, meta.num_frames)]
                except BadSample:
                    got.refused += 1
            out.append(got)
    finally:
        reader.close()
    return out


def state_bytes(
    params: int, precision: str, zero_stage: int, world: int, largest: int = 0
) -> float:
    """Model states per rank (weights, gradients, optimizer; see the module docstring), as
    DeepSpeed's own estimators count them at ZeRO 2 and 3 (``largest``: the parameters of the
    largest layer, gathered whole at ZeRO-3)."""
    if precision == "bf16":  # 16-bit weights and gradients; fp32 gradients, master, Adam
        weights, grads, optim = 2 * params, 2 * params, (4 + 4 + 8) * params
        if zero_stage == 0:  # no fp32 gradient buffer at ZeRO 0 (bf16 accumulation)
            optim -= 4 * params
    else:
        weights, grads, optim = 4 * params, 4 * params, 8 * params
    if zero_stage >= 1:
        optim /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage >= 3:
        weights = weights / world + 4 * largest
    return weights + grads + optim


def block_tokens(mcfg) -> list[int]:
    """Tokens per frame of each block of the (resolved) model."""
    rows, cols = mcfg.grid
    if mcfg.family == "flat":
        return [rows * cols] * mcfg.depth
    levels = list(range(mcfg.num_levels)) + list(range(mcfg.num_levels - 2, -1, -1))
    return [
        (rows >> lv) * (cols >> lv) for depth, lv in zip(mcfg.depths, levels) for _ in range(depth)
    ]


ACT_BYTES = {"bf16": 76, "fp32": 126}  # kept per token, channel and block (measured, above)


def activation_bytes(mcfg, params: int, clips: int, frames: int, precision: str) -> float:
    """Activations kept for backward on one rank for a micro-batch (see the module docstring)."""
    tokens = [t * clips * frames for t in block_tokens(mcfg)]
    per = ACT_BYTES[precision]
    if mcfg.grad_checkpointing:  # block inputs, plus one block recomputed in backward
        kept = sum(tokens) * mcfg.dim * (2 if precision == "bf16" else 4)
        kept += max(tokens) * mcfg.dim * per
    else:
        kept = sum(tokens) * mcfg.dim * per
    return kept + (2 * params if precision == "bf16" else 0)


def memory_table(cfg, params: int, world: int) -> str:
    mcfg = cfg.model.resolved()
    largest = largest_layer(cfg)
    rows = ["| ZeRO stage | precision | model states GiB | + activations GiB | total GiB |"]
    rows.append("|---:|---|---:|---:|---:|")
    for precision in ("bf16", "fp32"):
        act = activation_bytes(mcfg, params, cfg.micro_batch, cfg.data.clip_frames, precision)
        for stage in (0, 1, 2, 3):
            st = state_bytes(params, precision, stage, world, largest)
            mark = (
                " (this config)"
                if (stage, precision)
                == (
                    cfg.engine.zero_stage,
                    cfg.engine.precision,
                )
                else ""
            )
            rows.append(
                f"| {stage}{mark} | {precision} | {st / 2**30:.2f} | {act / 2**30:.2f} "
                f"| {(st + act) / 2**30:.2f} |"
            )
    return "\n".join(rows)


def describe(cfg, world_size: int = 1, catalog: Catalog | None = None) -> str:
    """The dry run's report (see the module docstring); raises what a real run would raise."""
    splits = ["train"] + ([cfg.data.val_split] if cfg.val_every else [])
    if catalog is None:
        catalog = read_catalog(cfg.data.train, splits)
    loader = Loader(
        cfg.data, split="train", batch_size=cfg.micro_batch, seed=cfg.seed, catalog=catalog
    )
    mcfg = cfg.model.resolved()
    if (mcfg.height, mcfg.width) != tuple(loader.frame_size):
        raise ValueError(
            f"model.height/width {mcfg.height}x{mcfg.width} do not match the data's frames "
            f"{loader.frame_size[0]}x{loader.frame_size[1]}"
        )
    params = model_params(cfg)
    gas = cfg.engine.grad_accum_steps
    global_batch = cfg.micro_batch * gas * world_size
    lines = [
        f"config resolved: model {cfg.model.preset} ({mcfg.family}, dim {mcfg.dim}), "
        f"{params / 1e6:,.2f}M parameters; {mcfg.height}x{mcfg.width} frames, patch "
        f"{mcfg.patch_size}",
        f"batch: {cfg.micro_batch} clips per rank x {gas} micro-steps x {world_size} rank(s) = "
        f"{global_batch} clips per step; {cfg.steps} steps = {global_batch * cfg.steps:,} clips",
        f"engine: ZeRO {cfg.engine.zero_stage}, {cfg.engine.precision}; data.crop={cfg.data.crop}, "
        f"data.clip_frames={cfg.data.clip_frames}, data.pad_to={cfg.data.pad_to}",
        "datasets:",
    ]
    mean_frames = []
    for d, m in enumerate(loader.manifests):
        tr = m.splits["train"]
        splits_txt = ", ".join(f"{s} {v.samples:,}" for s, v in m.splits.items())
        tasks = ", ".join(f"{t} {n:,}" for t, n in sorted(tr.tasks.items()))
        lines.append(
            f"  {cfg.data.train[d]}: {m.builder}, render {m.render_hash[:12]}, {splits_txt} "
            f"clips; mix weight {loader.probs[d]:.3f}; train tasks: {tasks}"
        )
        mean_frames.append(min(tr.frames / max(1, tr.samples), cfg.data.clip_frames))
    for d, got in enumerate(clip_lengths(loader)):
        lines.append(f"  {loader.names[d]}: {got.line(cfg.data.clip_frames)}")
    lacking = without_val(cfg, loader.manifests)
    if cfg.val_every and lacking:
        lines.append(f"validation: off (no {cfg.data.val_split!r} split in {', '.join(lacking)})")
    elif cfg.val_every:
        lines.append(
            f"validation: every {cfg.val_every} steps, {cfg.val_batches} batches of "
            f"{cfg.data.val_split!r}"
        )
    frames = float(np.dot(loader.probs, mean_frames))
    flops = train_flops_per_frame(mcfg, cfg.data.clip_frames) * frames * global_batch
    lines += [
        f"compute: {train_flops_per_frame(mcfg, cfg.data.clip_frames) / 1e9:,.3f} GFLOP per frame "
        f"(train, clips of {cfg.data.clip_frames}); ~{frames:.1f} frames per clip -> "
        f"{flops / 1e12:,.3f} TFLOP per step, {flops * cfg.steps / 1e15:,.3f} PFLOP in all",
        f"memory per rank at {world_size} rank(s) (estimate; module docstring of evav/plan.py):",
        memory_table(cfg, params, world_size),
    ]
    return "\n".join(lines)


def without_val(cfg, manifests) -> list[str]:
    """The datasets of ``data.train`` without clips in a ``data.val_split`` split: with any,
    training validates on nothing (and says so)."""
    split = cfg.data.val_split
    return [
        str(d)
        for d, m in zip(cfg.data.train, manifests)
        if split not in m.splits or m.splits[split].samples == 0
    ]


def largest_layer(cfg) -> int:
    """Parameters of the model's largest module without children (ZeRO-3 gathers it whole)."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def model_params(cfg) -> int:
    """The model's parameter count, built on the meta device (no memory)."""
    with torch.device("meta"):
        return num_params(build_model(cfg.model))


def summary_tags(cfg, params: int, world_size: int) -> dict[str, str]:
    """MLflow tags of a run's start: what it trains, on how many ranks, from which code."""
    tags = {
        "parameters": str(params),
        "world_size": str(world_size),
        "global_batch": str(cfg.micro_batch * cfg.engine.grad_accum_steps * world_size),
        "datasets": json.dumps([str(d) for d in cfg.data.train]),
        "evav_version": code_version(),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    for env, tag in (
        ("SLURM_JOB_ID", "slurm_job_id"),
        ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
