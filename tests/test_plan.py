"""`evav train --dry-run` (evav/plan.py): the memory estimate against what autograd really keeps
and against DeepSpeed's own estimators; the dry run on a real dataset (seconds, no process
group, clip lengths against clip_frames); user mistakes as one line, exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from evav.model import ModelConfig, build_model
from evav.plan import activation_bytes, state_bytes
from tests.conftest import REPO


def saved_bytes(mcfg: ModelConfig, clips: int, frames: int, precision: str) -> tuple[int, int]:
    """(bytes autograd keeps for backward in one forward, parameters): storages counted once,
    parameters' own storages left out."""
    torch.manual_seed(0)
    model = build_model(mcfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.rand(clips, frames, mcfg.height, mcfg.width, 3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x)
    n = sum(p.numel() for p in model.parameters())
    return sum(v for k, v in seen.items() if k not in params), n


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize(
    "overrides",
    [
        {"preset": "debug"},
        {"preset": "debug", "dim": 192, "depth": 3, "height": 48, "width": 80},
        {"preset": "paper-debug"},
        {"preset": "S", "depth": 2},
    ],
)
def test_activation_estimate_is_within_a_fifth_of_what_autograd_keeps(overrides, precision):
    mcfg = ModelConfig(**overrides).resolved()
    got, params = saved_bytes(mcfg, clips=3, frames=5, precision=precision)
    est = activation_bytes(mcfg, params, 3, 5, precision)
    assert 0.8 < est / got < 1.2, (est, got)


@pytest.mark.parametrize("world", [1, 3, 8])
def test_model_states_agree_with_deepspeeds_estimators(world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest = 12_345_678, 1_234_567
    _, z2 = estimate_zero2_model_states_mem_needs(params, world, 1, cpu_offload=False)
    _, z3, _ = estimate_zero3_model_states_mem_needs(
        params, largest, world, 1, cpu_offload=False, zero_init=True
    )
    assert abs(state_bytes(params, "bf16", 2, world) - z2) <= 1
    # DeepSpeed's ZeRO-3 estimate leaves out each rank's partition of the 16-bit weights
    assert abs(state_bytes(params, "bf16", 3, world, largest) - z3 - 2 * params / world) <= 1
    # partitioning only ever helps, and more ranks help more
    by_stage = [state_bytes(params, "bf16", s, world, largest) for s in range(4)]
    if world > 1:
        assert by_stage[1] < by_stage[0] + 4 * params and by_stage[3] < by_stage[2] < by_stage[1]


def evav(*args, env=None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "evav.cli", *map(str, args)],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "syn"
    done = evav("preprocess", "synthetic", "--out", out, "train_per_task=12", "val_per_task=2")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_dry_run_reports_the_run_in_seconds_without_training(syn, tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    done = evav(
        "train",
        "configs/debug.yaml",
        f"data.train=[{syn}]",
        f"run_dir={run}",
        "data.clip_frames=5",
        "--dry-run",
        "--world-size",
        "4",
    )
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert seconds < 60
    assert not run.exists()  # nothing written, nothing trained
    assert "dry run: nothing was trained" in out
    assert re.search(r"model debug \(flat, dim \d+\), [\d.]+M parameters", out)
    assert "x 4 rank(s) = 32 clips per step" in out  # micro_batch 8 of configs/debug.yaml
    # synthetic clips are 4-8 frames: some are longer than 5, and the report says how many
    m = re.search(r"clip frames min (\d+) .* max (\d+) \(all 60\): (\d+)% cropped", out)
    assert m and int(m[1]) <= 5 < int(m[2]) and 0 < int(m[3]) < 100, out
    assert re.search(r"\| 3 \| bf16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out)  # every stage
    assert "validation: every" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.train=[{missing}]", "does not exist"),
        ("model.height=32", "do not match the data's frames"),
        ("model.preset=nope", "unknown model preset 'nope'"),
        ("data.crop=sideways", "data.crop"),
    ],
)
def test_dry_run_mistakes_are_one_line_exit_2(syn, tmp_path, override, message):
    override = override.format(missing=tmp_path / "nowhere")
    done = evav("train", "configs/debug.yaml", f"data.train=[{syn}]", override, "--dry-run")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_dry_run_says_validation_is_off_without_a_val_split(tmp_path):
    out = tmp_path / "noval"
    done = evav("preprocess", "synthetic", "--out", out, "train_per_task=4", "val_per_task=0")
    assert done.returncode == 0, done.stderr[-2000:]
    done = evav("train", "configs/debug.yaml", f"data.train=[{out}]", "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "validation: off (no 'val' split in" in done.stdout
