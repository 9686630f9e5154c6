"""The one place where frames become patch tokens and tokens become frames.

A frame (H, W, 3) is cut into ``p x p`` patches in row-major order, each flattened as
(p, p, 3) -> p*p*3 values; ``unpatchify`` is the exact inverse. ``PatchEmbed`` projects patches
to tokens; ``PixelHead`` projects tokens back to patch pixels through a sigmoid, so every patch
of the predicted next frame comes out at once, in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn


def patchify(frames_BTHWC: torch.Tensor, p: int) -> torch.Tensor:
    """(B, T, H, W, C) -> (B, T, (H/p)*(W/p), p*p*C)."""
    B, T, H, W, C = frames_BTHWC.shape
    x = frames_BTHWC.reshape(B, T, H // p, p, W // p, p, C)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, T, (H // p) * (W // p), p * p * C)


def unpatchify(patches_BTPK: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    """(B, T, (H/p)*(W/p), p*p*C) -> (B, T, H, W, C); inverse of ``patchify``."""
    B, T, _, K = patches_BTPK.shape
    C = K // (p * p)
    x = patches_BTPK.reshape(B, T, height // p, width // p, p, p, C)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, T, height, width, C)


class PatchEmbed(nn.Module):
    """Frames (B, T, H, W, 3) in [0, 1] -> tokens (B, T, P, D), plus a learned embedding of each
    patch's place in the frame.

    Rotary positions in attention are relative; a pixel predictor also needs absolute places
    (where in the frame a glyph stroke goes), which a uniform frame (black, a separator) would
    not otherwise give it. Time has no absolute embedding, so clips can be any length.
    """

    def __init__(self, patch_size: int, dim: int, num_patches: int, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * channels, dim)
        self.pos_PD = nn.Parameter(torch.empty(num_patches, dim))

    def forward(self, frames_BTHWC: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(frames_BTHWC, self.patch_size)) + self.pos_PD


class PixelHead(nn.Module):
    """Tokens (B, T, P, D) -> frames (B, T, H, W, 3) in [0, 1]: RMSNorm, linear, sigmoid."""

    def __init__(self, patch_size: int, dim: int, height: int, width: int, channels: int = 3):
        super().__init__()
        self.patch_size, self.height, self.width = patch_size, height, width
        self.norm = nn.RMSNorm(dim)
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)

    def forward(self, x_BTPD: torch.Tensor) -> torch.Tensor:
        patches = torch.sigmoid(self.proj(self.norm(x_BTPD)))
        return unpatchify(patches, self.patch_size, self.height, self.width)
