"""Autoregressive generation, frame by frame, with a temporal KV cache.

    frames_BNHWC = generate(model, prompt_BTHWC, num_frames=8)   # only the new frames

The prompt is run once (prefill, filling the cache); then each step feeds the last predicted
frame and attends to the cached keys/values of every earlier frame, so a step costs one frame
of compute instead of the whole clip. ``generate_recompute`` is the reference without a cache
(a full forward over the clip so far for every new frame); both return the same frames up to
floating-point rounding. Predictions are fed back as floats in [0, 1], unquantised.
"""

from __future__ import annotations

import torch
from torch import nn

from evav.model.attention import KVCache


def _check(prompt_BTHWC: torch.Tensor, num_frames: int) -> None:
    if prompt_BTHWC.ndim != 5 or prompt_BTHWC.shape[1] < 1:
        raise ValueError(f"prompt must be (B, T>=1, H, W, C), got {tuple(prompt_BTHWC.shape)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


@torch.no_grad()
def generate(model: nn.Module, prompt_BTHWC: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Generate ``num_frames`` frames after the prompt, batched; returns (B, num_frames, H, W, C)."""
    _check(prompt_BTHWC, num_frames)
    cache = KVCache(max_frames=prompt_BTHWC.shape[1] + num_frames - 1)
    frame = model(prompt_BTHWC, cache)[:, -1:]
    out = [frame]
    for _ in range(num_frames - 1):
        frame = model(frame, cache)
        out.append(frame)
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_recompute(
    model: nn.Module, prompt_BTHWC: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """Reference for ``generate``: recompute the whole clip for every new frame."""
    _check(prompt_BTHWC, num_frames)
    clip = prompt_BTHWC
    for _ in range(num_frames):
        clip = torch.cat([clip, model(clip)[:, -1:]], dim=1)
    return clip[:, prompt_BTHWC.shape[1] :]
