"""The divided space-time block (pre-norm residual), and a run of blocks at one token grid.

    x = x + SpatialAttention(RMSNorm(x))     # within each frame, bidirectional
    x = x + TemporalAttention(RMSNorm(x))    # across frames at each token position, causal
    x = x + MLP(RMSNorm(x))

Tensors are (B, T, P, D): batch, frames, tokens per frame, width.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from evav.model.attention import (
    SPATIAL_ROPE_THETA,
    KVCache,
    SpatialAttention,
    TemporalAttention,
    packed_causal_mask,
)
from evav.model.rope import rope_1d, rope_2d, rotation


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc2.is_residual_out = True
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, layer: int):
        super().__init__()
        self.norm_s = nn.RMSNorm(dim)
        self.spatial = SpatialAttention(dim, head_dim)
        self.norm_t = nn.RMSNorm(dim)
        self.temporal = TemporalAttention(dim, head_dim, layer)
        self.norm_m = nn.RMSNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(
        self,
        x_BTPD: torch.Tensor,
        grid: tuple[int, int],
        window: int,
        rot_s: tuple[torch.Tensor, torch.Tensor],
        rot_t: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        mask_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rot_s``/``rot_t``: the spatial and temporal rotary ``(cos, sin)`` (rope.rotation)."""
        x = x_BTPD + self.spatial(self.norm_s(x_BTPD), grid, window, rot_s)
        x = x + self.temporal(self.norm_t(x), rot_t, cache, mask_t)
        return x + self.mlp(self.norm_m(x))


class Stage(nn.Module):
    """``depth`` blocks at one token grid, sharing its rotary angles; optional checkpointing.

    ``first_layer`` numbers the blocks' KV-cache slots so they are unique across the model.
    """

    def __init__(
        self,
        depth: int,
        dim: int,
        head_dim: int,
        mlp_ratio: float,
        grid: tuple[int, int],
        window: int,
        first_layer: int,
        rope_theta: float,
        grad_checkpointing: bool,
    ):
        super().__init__()
        self.grid, self.window, self.head_dim = grid, window, head_dim
        self.rope_theta, self.grad_checkpointing = rope_theta, grad_checkpointing
        self.blocks = nn.ModuleList(
            Block(dim, head_dim, mlp_ratio, first_layer + i) for i in range(depth)
        )

    def forward(
        self,
        x_BTPD: torch.Tensor,
        positions_T: torch.Tensor,
        cache: KVCache | None = None,
        segments_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``positions`` (T,) frame indices; a packed batch: (B, T) within each clip, and
        ``segments`` (B, T) numbering the clips of each row (temporal attention stays inside
        a clip)."""
        rows, cols = (self.window, self.window) if self.window else self.grid
        angles_s = rope_2d(rows, cols, self.head_dim, SPATIAL_ROPE_THETA, x_BTPD.device)
        angles_t = rope_1d(positions_T, self.head_dim, self.rope_theta)
        mask_t = None
        if segments_BT is not None:
            B, T, P, _ = x_BTPD.shape
            angles_t = angles_t[:, None].expand(B, P, T, -1).reshape(B * P, 1, T, -1)
            mask_t = packed_causal_mask(segments_BT, P)
        # cos and sin once per stage, not in every block's q and k
        args = (self.grid, self.window, rotation(angles_s), rotation(angles_t), cache, mask_t)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and cache is None:
                x_BTPD = checkpoint(block, x_BTPD, *args, use_reentrant=False)
            else:
                x_BTPD = block(x_BTPD, *args)
        return x_BTPD
