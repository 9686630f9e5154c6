"""Throughput features that must not change what is learned (issue 17).

- Packing: several clips in one row of ``clip_frames`` frames, temporal attention block-causal
  within each clip and each clip's temporal positions from 0: the predictions of a packed row are
  those of each clip alone; the loss masks, task ids and segments of a packed batch.
- torch.compile per block: a block is one graph (no graph break) with and without a packed
  batch's mask; the compiled model's loss and gradients match eager, with activation
  checkpointing too.
- Through ``evav train``: packed and compiled training gives the eager, padded run's losses
  within a stated tolerance, reports ``data/useful_frac``, and resumes exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evav.data.clips import Sample
from evav.data.loader import _collate, _collate_packed, pack_rows
from evav.metrics import read_metrics
from evav.model import ModelConfig, build_model, compile_blocks, next_frame_loss_sums
from evav.model.attention import clip_positions, packed_causal_mask
from evav.model.blocks import Block
from tests.test_hostile_loader import build_synthetic

REPO = Path(__file__).resolve().parents[1]


def _model(preset: str, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset=preset, **kw)).eval()


@pytest.mark.parametrize("preset", ["debug", "paper"])
def test_a_packed_row_predicts_each_clip_as_if_it_were_alone(preset):
    m = _model(preset)
    H, W = m.cfg.height, m.cfg.width
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(1, n, H, W, 3, generator=g) for n in (5, 3, 4))
    rows = torch.cat(
        [torch.cat([a, b, torch.zeros(1, 2, H, W, 3)], 1), torch.cat([c, a, b[:, :1]], 1)]
    )
    seg = torch.tensor([[0] * 5 + [1] * 3 + [2] * 2, [0] * 4 + [1] * 5 + [2]])
    with torch.no_grad():
        packed = m(rows, segments_BT=seg)
        alone = {k: m(x) for k, x in (("a", a), ("b", b), ("c", c))}
        torch.testing.assert_close(packed[0:1, :5], alone["a"], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[0:1, 5:8], alone["b"], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[1:2, :4], alone["c"], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[1:2, 4:9], alone["a"], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[1:2, 9:], m(b[:, :1]), atol=1e-5, rtol=0)
        # without the mask the second clip of a row would see the first: really different
        assert (m(rows)[0:1, 5:8] - alone["b"]).abs().max() > 1e-3


def test_packed_mask_and_positions():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert clip_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = packed_causal_mask(seg, tokens=2)
    assert mask.shape == (2, 1, 6, 6)
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], want) and torch.equal(mask[1, 0], want)


def test_pack_rows_is_first_fit_decreasing_and_refuses_a_clip_too_long():
    assert pack_rows([3, 8, 5, 2, 8], 8) == [[1], [4], [2, 0], [3]]
    assert pack_rows([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="9 frames does not fit a row of 8"):
        pack_rows([9], 8)


def _sample(n: int, task: str, key: str, value: int, hw: int = 4) -> Sample:
    frames = np.full((n, hw, hw, 3), value, np.uint8)
    loss_mask = np.zeros(n, bool)
    loss_mask[n // 2 :] = True
    return Sample(frames=frames, loss_mask=loss_mask, task=task, key=key, answer=key.upper())


def test_a_packed_batch_keeps_every_clip_its_masks_task_and_key():
    samples = [_sample(3, "a", "k0", 10), _sample(6, "b", "k1", 20), _sample(2, "b", "k2", 30)]
    tasks = {"a": 0, "b": 1}
    b = _collate_packed(samples, tasks, 8)
    assert b["frames"].shape[:2] == (2, 8)  # 11 frames in 2 rows of 8, not 3 rows
    assert b["key"] == ["k0", "k1", "k2"] and b["answer"] == ["K0", "K1", "K2"]
    # row 0: k1 (6 frames) then k2 (2); row 1: k0 (3) then padding
    assert b["segment"].tolist() == [[0] * 6 + [1] * 2, [0] * 3 + [1] * 5]
    assert b["task_id"][0].tolist() == [1] * 8 and b["task_id"][1, :3].tolist() == [0] * 3
    assert (b["frames"][0, :6] == 20).all() and (b["frames"][0, 6:] == 30).all()
    assert (b["frames"][1, :3] == 10).all() and (b["frames"][1, 3:] == 0).all()
    assert b["pad_mask"].tolist() == [[False] * 8, [False] * 3 + [True] * 5]
    # each clip's own mask, except at its first frame (nothing before it in the row predicts it)
    assert b["loss_mask"][0].tolist() == [False, False, False, True, True, True, False, True]
    assert b["loss_mask"][1].tolist() == [False, True, True] + [False] * 5
    padded = _collate(samples, tasks, None)
    assert padded["frames"].shape[:2] == (3, 6)
    # the same frames are scored, packed or not: the loss sees the same targets
    packed_n = int((b["loss_mask"][:, 1:] & ~b["pad_mask"][:, 1:]).sum())
    padded_n = int((padded["loss_mask"][:, 1:] & ~padded["pad_mask"][:, 1:]).sum())
    assert packed_n == padded_n == 2 + 3 + 1


def test_the_loss_of_a_packed_batch_is_that_of_the_padded_batch():
    m = _model("debug")
    H, W = m.cfg.height, m.cfg.width
    rng = np.random.default_rng(0)
    samples = []
    for i, n in enumerate((3, 6, 2, 5)):
        s = _sample(n, "ab"[i % 2], f"k{i}", 0, hw=H)
        s.frames[:] = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
        samples.append(s)
    tasks = {"a": 0, "b": 1}
    sums = {}
    for name, b in (
        ("padded", _collate(samples, tasks, None)),
        ("packed", _collate_packed(samples, tasks, 8)),
    ):
        t = {k: torch.from_numpy(v) for k, v in b.items() if isinstance(v, np.ndarray)}
        x = t["frames"].float() / 255
        kw = {"segments_BT": t["segment"]} if "segment" in t else {}
        with torch.no_grad():
            pred = m(x, **kw)
        sums[name] = next_frame_loss_sums(pred, x, t["loss_mask"], t["pad_mask"], t["task_id"], 2)
    assert sums["packed"].count == sums["padded"].count == 2 + 3 + 1 + 3
    torch.testing.assert_close(sums["packed"].total, sums["padded"].total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sums["packed"].tasks_2K, sums["padded"].tasks_2K, rtol=1e-5, atol=1e-5
    )


# -- torch.compile ---------------------------------------------------------------------------
def _block_inputs(m, B: int = 2, T: int = 6, packed: bool = False):
    stage = m.stage
    P, D = stage.grid[0] * stage.grid[1], m.cfg.dim
    x = torch.randn(B, T, P, D)
    from evav.model.rope import rope_1d, rope_2d, rotation

    rot_s = rotation(rope_2d(*stage.grid, stage.head_dim, 100.0))
    if not packed:
        return x, stage.grid, 0, rot_s, rotation(rope_1d(torch.arange(T), stage.head_dim, 1e4))
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]])
    angles_t = rope_1d(clip_positions(seg), stage.head_dim, 10000.0)
    angles_t = angles_t[:, None].expand(B, P, T, -1).reshape(B * P, 1, T, -1)
    return x, stage.grid, 0, rot_s, rotation(angles_t), None, packed_causal_mask(seg, P)


@pytest.mark.parametrize("packed", [False, True])
def test_a_block_compiles_as_one_graph(packed):
    m = _model("debug")
    block = next(b for b in m.modules() if isinstance(b, Block))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(*_block_inputs(m, packed=packed))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_the_compiled_model_trains_as_eager_does(grad_checkpointing):
    eager = _model("debug", grad_checkpointing=grad_checkpointing).train()
    compiled = _model("debug", grad_checkpointing=grad_checkpointing).train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_blocks(compiled) == eager.cfg.depth
    H, W = eager.cfg.height, eager.cfg.width
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 6, H, W, 3, generator=g)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    loss_mask = torch.ones(2, 6, dtype=torch.bool)
    pad_mask = torch.zeros(2, 6, dtype=torch.bool)
    losses = []
    for m in (eager, compiled):
        s = next_frame_loss_sums(
            m(x, segments_BT=seg), x, loss_mask, pad_mask, torch.zeros(2, dtype=torch.long), 1
        )
        s.total.backward()
        losses.append(s.total.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # parameter names are unchanged (checkpoints and exports read the same keys)
    assert list(compiled.state_dict()) == list(eager.state_dict())


# -- through the trainer ---------------------------------------------------------------------
ARGS = [
    "configs/debug.yaml",
    "model.height=32",
    "model.width=32",
    "micro_batch=4",
    "log_every=1",
    "val_every=0",
    "metrics.enabled=false",
    "engine.torch_adam=true",
    "engine.precision=fp32",
    "optim.warmup_steps=1",
]


def _train(run: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "evav.cli", "train", *ARGS, f"data.train=[{data}]"]
    cmd += [f"run_dir={run}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "train/loss" in r}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return build_synthetic(
        tmp_path_factory.mktemp("pack") / "syn", render={"height": 32, "width": 32}
    )


def test_packed_compiled_training_matches_padded_eager_and_resumes_exactly(synthetic, tmp_path):
    """ZeRO 2 (gradients partitioned), activation checkpointing on, and ZeRO-3: the same
    samples in the same steps, so the losses agree to float tolerance; useful_frac is reported and higher
    packed; a packed run stopped at step 2 and resumed gives the uninterrupted run's losses."""
    common = ["engine.zero_stage=2", "model.grad_checkpointing=true"]
    padded = _train(tmp_path / "padded", synthetic, "steps=4", *common)
    assert padded.returncode == 0, padded.stderr[-3000:]
    packed = _train(
        tmp_path / "packed", synthetic, "steps=4", "data.pad_to=pack", "compile=true", *common
    )
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "torch.compile: 4 blocks" in packed.stdout + packed.stderr
    a, b = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4)
        assert b[step]["train/frames"] == a[step]["train/frames"]  # the same real frames
        assert 0 < a[step]["data/useful_frac"] <= b[step]["data/useful_frac"] <= 1
    assert sum(r["data/useful_frac"] for r in b.values()) > sum(
        r["data/useful_frac"] for r in a.values()
    )
    # ZeRO-3 compiles too (warned: DeepSpeed's parameter hooks split each block's graph)
    z3 = _train(
        tmp_path / "z3", synthetic, "steps=2", "data.pad_to=pack", "compile=true",
        "engine.zero_stage=3",
    )  # fmt: skip
    assert z3.returncode == 0, z3.stderr[-3000:]
    assert "compile=true at ZeRO-3" in z3.stdout + z3.stderr
    for step, r in _losses(tmp_path / "z3").items():
        assert r["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4)
    # exact resume of a packed run (eager): 2 steps, stop, 2 more == 4 straight
    run = tmp_path / "resumed"
    first = _train(run, synthetic, "steps=2", "data.pad_to=pack", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(run, synthetic, "steps=4", "data.pad_to=pack", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    c = _losses(run)
    for step in (3, 4):
        assert c[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-4)
