"""A debug model overfits a few real FSDD clips (spectrogram -> digit word) on CPU.

Clips are real: FSDD recordings rendered by ``evav.frames`` as
[task frame][spectrogram frame][separator]["digit word" frame], the word frame supervised.
Skips when ../shared/datasets (or $EVAV_DATASETS) is absent.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from evav.frames import RenderSpec, TextRenderer, build_clip, render_audio
from evav.model import ModelConfig, build_model, next_frame_loss

DATASETS = Path(
    os.environ.get(
        "EVAV_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    )
)
WORDS = "zero one two three four five six seven eight nine".split()
RECORDINGS = ["0_george_0", "3_jackson_0", "7_lucas_0"]


def fsdd_clips() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4, 64, 64, 3) float frames and (B, 4) loss masks of a few real recordings."""
    recordings = DATASETS / "fsdd" / "recordings"
    if not recordings.is_dir():
        pytest.skip(f"FSDD recordings not found at {recordings} (set EVAV_DATASETS)")
    spec = RenderSpec()
    text = TextRenderer(spec)
    clips = [
        build_clip(
            text,
            task="fsdd",
            inputs=render_audio(recordings / f"{name}.wav", spec),
            outputs=text.render_text(WORDS[int(name[0])]),
        )
        for name in RECORDINGS
    ]
    frames = torch.from_numpy(np.stack([c.frames for c in clips])).float() / 255
    return frames, torch.from_numpy(np.stack([c.loss_mask for c in clips]))


def test_debug_model_overfits_real_fsdd_clips_within_500_steps():
    frames, loss_mask = fsdd_clips()
    assert loss_mask[:, -1].all() and not loss_mask[:, :-1].any()  # the word frame only
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug"))
    steps, lr = 500, 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    # A step budget, not a time budget: speed is measured in tools/ benchmarks, not asserted here
    first = None
    for _ in range(steps):
        loss, _ = next_frame_loss(model(frames), frames, loss_mask)
        first = loss.item() if first is None else first
        if loss.item() < 0.03:
            break
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    assert first > 0.5
    assert loss.item() < 0.05, f"loss {loss.item():.3f} after {steps} steps"
    # each clip's predicted answer is nearest to its own digit word, not another clip's
    with torch.no_grad():
        answers = model(frames)[:, -2]
    dist = (answers[:, None] - frames[None, :, -1]).abs().mean(dim=(2, 3, 4))
    assert torch.equal(dist.argmin(dim=1), torch.arange(len(RECORDINGS)))
