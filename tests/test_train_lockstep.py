"""Distributed steps that stay correct when batches go bad (issue 16, items 2-5).

- The loss weighs every scored frame alike: sums over frames divided by the step's count of
  scored frames on every rank, against a value computed frame by frame by hand.
- A frame that is not scored adds exactly zero gradient, even where the prediction is NaN.
- Through ``evav train`` with real DeepSpeed engines over gloo in 2 processes: a rank that reads
  only corrupt samples (ZeRO-3, training and validation) stays in lockstep and the run resumes;
  a NaN produced inside the forward pass of one rank's micro-batch (grad_accum_steps=2) skips
  the step on both ranks alike and never reaches the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evav import checkpoint
from evav import distributed as dist
from evav.metrics import read_metrics
from evav.model import ms_ssim, next_frame_loss, next_frame_loss_sums
from tests.test_hostile_loader import build_synthetic, corrupt_every_clip
from tools.check_host_sync import EVAV_FILES, HOST_ONLY
from tools.mlflow_server import free_port

REPO = Path(__file__).resolve().parents[1]
H = W = 16


def _frame_loss_by_hand(p_HWC: torch.Tensor, t_HWC: torch.Tensor) -> float:
    l1 = (p_HWC - t_HWC).abs().mean()
    ssim = ms_ssim(p_HWC.permute(2, 0, 1)[None], t_HWC.permute(2, 0, 1)[None])[0]
    return float(l1 + 1 - ssim)


def test_the_loss_weighs_every_scored_frame_alike_across_micro_batches():
    """Two micro-batches, one scoring 1 frame and one scoring 5: their loss is the mean over the
    6 frames, not the mean of the two batch means (which gives the lone frame 5 times the
    weight of each other one)."""
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 2, 4, H, W, 3, generator=g)  # (micro, B, T, H, W, C)
    pred = torch.rand(2, 2, 4, H, W, 3, generator=g)
    loss_mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    pad_mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    loss_mask[0, 0, 2] = True  # micro 0: one scored target (clip 0, frame 2)
    loss_mask[1, :, 1:] = True  # micro 1: frames 1-3 of both clips ...
    pad_mask[1, 1, 3] = True  # ... but clip 1's frame 3 is padding: 5 scored
    tasks = torch.tensor([[0, 1], [1, 0]])
    scored = [(0, 0, 2), (1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 1, 1), (1, 1, 2)]
    by_hand = {
        s: _frame_loss_by_hand(pred[s[0], s[1], s[2] - 1], frames[s[0], s[1], s[2]]) for s in scored
    }
    sums = [
        next_frame_loss_sums(pred[m], frames[m], loss_mask[m], pad_mask[m], tasks[m], 2)
        for m in range(2)
    ]
    total = sum(s.total for s in sums)
    count = sum(s.count for s in sums)
    assert count.item() == 6
    want = sum(by_hand.values()) / 6
    assert total.item() / count.item() == pytest.approx(want, rel=1e-5)
    means = [next_frame_loss(pred[m], frames[m], loss_mask[m], pad_mask[m])[0] for m in range(2)]
    assert abs(float(sum(means)) / 2 - want) > 1e-3  # the old weighting is really different
    tasks_2K = sum(s.tasks_2K for s in sums)
    task_of = {s: int(tasks[s[0], s[1]]) for s in scored}
    for k in range(2):
        mine = [v for s, v in by_hand.items() if task_of[s] == k]
        assert tasks_2K[1, k].item() == len(mine)
        assert tasks_2K[0, k].item() == pytest.approx(sum(mine), rel=1e-5)


def test_unscored_frames_add_exactly_zero_gradient_even_when_nan():
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(1, 4, H, W, 3, generator=g)
    pred = torch.rand(1, 4, H, W, 3, generator=g)
    pred[0, 0] = float("nan")  # predicts frame 1, which is not scored
    pred[0, 3] = float("inf")  # predicts nothing (the last frame has no target)
    pred.requires_grad_(True)
    loss_mask = torch.tensor([[False, False, True, True]])
    out = next_frame_loss_sums(pred, frames, loss_mask, None, torch.zeros(1, dtype=torch.long), 1)
    assert torch.isfinite(out.total) and out.count.item() == 2
    out.total.backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[0, 0] == 0).all() and (pred.grad[0, 3] == 0).all()
    assert (pred.grad[0, 1] != 0).any() and (pred.grad[0, 2] != 0).any()


# -- through the trainer, 2 processes --------------------------------------------------------
ARGS = [
    "configs/debug.yaml",
    "model.height=32",
    "model.width=32",
    "micro_batch=1",
    "log_every=1",
    "metrics.enabled=false",
    "optim.warmup_steps=1",
    "engine.torch_adam=true",
]


def torchrun(run_dir: Path, data: list[Path], *extra: str, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), "-m", "evav.cli", "train", *ARGS]
    cmd += [f"data.train=[{','.join(map(str, data))}]", f"run_dir={run_dir}", *extra]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Synthetic shards at 32x32 (4 samples a shard), the debug model's size set to match."""
    return build_synthetic(
        tmp_path_factory.mktemp("lockstep") / "good", render={"height": 32, "width": 32}
    )


def test_a_rank_reading_only_corrupt_samples_stays_in_lockstep_under_zero3(small, tmp_path):
    """Two datasets mixed 1:1 with one sample per rank a micro-step: whenever one rank draws the
    all-corrupt dataset it trains on the loader's placeholder (weight 0) while the other trains,
    in training and in validation (whose corrupt split ends the bad rank's share early); nothing
    hangs, the ranks' loader states agree (the resume below needs that) and the weights stay
    finite."""
    bad = shutil.copytree(small, tmp_path / "bad")
    corrupt_every_clip(bad)
    corrupt_every_clip(bad, "val")
    run = tmp_path / "run"
    common = ["engine.zero_stage=3", "data.weights=[1,1]", "val_every=2", "val_batches=3"]
    done = torchrun(run, [small, bad], "steps=4", *common)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = read_metrics(run)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["train/loss"] == r["train/loss"] for r in train)  # finite: no NaN from 0/0
    assert train[-1]["data/skipped"] > 0  # the bad dataset was drawn, skipped and counted
    val = [r for r in records if "val/skipped" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val/skipped"] > 0 for r in val)
    assert all("val/loss" in r for r in val)  # the good rank's share was scored
    # the resume reads every rank's loader state: they must agree (lockstep)
    again = torchrun(run, [small, bad], "steps=6", *common)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_nan_inside_the_forward_of_one_ranks_micro_batch_skips_the_step_on_both(small, tmp_path):
    """grad_accum_steps=2, fp32 at ZeRO 0 (where DeepSpeed has no overflow check of its own):
    rank 0's first micro-batch of step attempt 2 has NaN activations from its patch embedding
    on. Both ranks skip that step (the same one), count it, and train 4 steps; every weight
    of the final checkpoint is finite (a NaN update would have made them all NaN)."""
    run = tmp_path / "run"
    done = torchrun(
        run,
        [small],
        "steps=4",
        "val_every=0",
        "engine.grad_accum_steps=2",
        "engine.precision=fp32",
        env={"EVAV_FAULT": "nan_forward:2"},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "step 2: non-finite loss in a micro-batch (on this or another rank)" in out
    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["train/skipped_steps"] == 1
    last = checkpoint.last_good(run)
    assert last is not None
    states = list((last / "engine").rglob("*model_states.pt"))
    assert states
    for f in states:
        with torch.serialization.safe_globals(dist.engine_safe_globals()):
            sd = torch.load(f, map_location="cpu", weights_only=True)["module"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


ACCUM_PROBE = """
import os, sys, torch
from evav import distributed as dist
from evav.model import ModelConfig, build_model
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[2])
cfg = dist.EngineConfig(zero_stage=int(sys.argv[1]), precision="bf16", grad_accum_steps=2)
dist.init(cfg)
mcfg = ModelConfig(preset="debug", height=16, width=16)
engine, _ = dist.build_engine(build_model(mcfg), cfg, dist.OptimConfig(), 1, 10, 1)
x = torch.rand(1, 3, 16, 16, 3).bfloat16()
for i in range(2):
    engine.backward(engine(x).float().mean())
    engine.step()
print("DTYPES", *engine.get_data_types(), type(engine.optimizer).__name__, engine.global_steps)
"""


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_accumulate_in_fp32_by_default(stage):
    """Under bf16 the gradients of the micro-batches of a step add up in fp32 at ZeRO 1-3
    (DeepSpeed refuses the mix at ZeRO 0): the engine DeepSpeed builds from evav's config says
    so, and at ZeRO 1 it is DeepSpeed's BF16_Optimizer (fp32 gradient buffers); an
    accumulated step runs."""
    done = subprocess.run(
        [sys.executable, "-c", ACCUM_PROBE, str(stage), str(free_port())],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("DTYPES"))
    _, model_dtype, accum_dtype, optimizer, steps = line.split()
    assert (model_dtype, accum_dtype, steps) == ("torch.bfloat16", "torch.float32", "1")
    if stage == 1:
        assert optimizer == "BF16_Optimizer"


def test_a_training_step_reads_one_value_from_the_device():
    """Item 5 by proxy on the CPU (tools/check_host_sync.py --cpu): every read of a tensor's
    value into Python during training steps is counted by its caller; outside logging steps evav
    makes exactly one per step (``dist.optimizer_step``'s all-reduced flags and counts), besides
    reads of tensors it keeps in host memory on purpose. DeepSpeed's own checks are counted apart
    (on a GPU: tools/check_host_sync.py without --cpu)."""
    cmd = [sys.executable, "tools/check_host_sync.py", "--cpu", "--steps", "3"]
    cmd += ["engine.precision=bf16", "engine.zero_stage=1", "engine.grad_accum_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    evav_sites = {
        k: v
        for k, v in result["sites"].items()
        if k not in HOST_ONLY and k.split(":")[0] in EVAV_FILES
    }
    assert evav_sites == {"distributed.py:optimizer_step": 1.0}, result
    assert result["evav"] == 1.0
    assert result["host_only"] == 4.0  # two micro-batches' host masks, read twice each
