"""The paper family: a U-Net hierarchy of divided space-time blocks (Hudson et al., 2024).

For 64x64 frames and 8x8 patches (``preset="paper"``, width 512, about 74M parameters):

    8x8 tokens:  encoder blocks (4x4-window spatial attention) ---------- skip ---+
       merge 2x2 -> 4x4 tokens: encoder blocks ----------------- skip --+        |
          merge 2x2 -> 2x2 tokens: bottleneck blocks (global)           |        |
       split -> 4x4 tokens, fuse with skip (concat + linear): decoder blocks     |
    split -> 8x8 tokens, fuse with skip: decoder blocks -> pixel head  ----------+

Merge concatenates each 2x2 group of tokens (4D) and projects to D; split projects D to 4D and
spreads it back over the 2x2 group, both through ``patchify``/``unpatchify`` on the token grid.
All merges and splits are within a frame, so temporal causality is kept at every level.
"""

from __future__ import annotations

import torch
from torch import nn

from evav.model.attention import KVCache
from evav.model.base import NextFrameModel
from evav.model.blocks import Stage
from evav.model.config import ModelConfig
from evav.model.patches import patchify, unpatchify


class Merge(nn.Module):
    """(B, T, rows*cols, D) -> (B, T, rows*cols/4, D): each 2x2 group of tokens into one."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x_BTPD: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, T, _, D = x_BTPD.shape
        return self.proj(patchify(x_BTPD.view(B, T, *grid, D), 2))


class Split(nn.Module):
    """(B, T, rows*cols/4, D) -> (B, T, rows*cols, D), fused with the skip of the finer level."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 4 * dim, bias=False)
        self.fuse = nn.Linear(2 * dim, dim, bias=False)

    def forward(
        self, x_BTPD: torch.Tensor, skip_BTPD: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        x = unpatchify(self.proj(x_BTPD), 2, *grid).flatten(2, 3)
        return self.fuse(torch.cat([x, skip_BTPD], dim=-1))


class PaperModel(NextFrameModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        levels, rows, cols = cfg.num_levels, *cfg.grid
        self.grids = [(rows >> lv, cols >> lv) for lv in range(levels)]
        # depths run encoder level 0 .. bottleneck (level L-1) .. decoder level 0
        stage_levels = list(range(levels)) + list(range(levels - 2, -1, -1))
        stages, layer = [], 0
        for depth, lv in zip(cfg.depths, stage_levels):
            stages.append(
                Stage(
                    depth,
                    cfg.dim,
                    cfg.head_dim,
                    cfg.mlp_ratio,
                    self.grids[lv],
                    cfg.window_at(lv),
                    layer,
                    cfg.rope_theta,
                    cfg.grad_checkpointing,
                )  # fmt: skip
            )
            layer += depth
        self.encoders = nn.ModuleList(stages[: levels - 1])
        self.bottleneck = stages[levels - 1]
        self.decoders = nn.ModuleList(stages[levels:])  # coarse to fine
        self.merges = nn.ModuleList(Merge(cfg.dim) for _ in range(levels - 1))
        self.splits = nn.ModuleList(Split(cfg.dim) for _ in range(levels - 1))  # coarse to fine

    def trunk(
        self,
        x_BTPD: torch.Tensor,
        positions_T: torch.Tensor,
        cache: KVCache | None,
        segments_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        time = (positions_T, cache, segments_BT)
        skips = []
        for lv, (stage, merge) in enumerate(zip(self.encoders, self.merges)):
            x_BTPD = stage(x_BTPD, *time)
            skips.append(x_BTPD)
            x_BTPD = merge(x_BTPD, self.grids[lv])
        x_BTPD = self.bottleneck(x_BTPD, *time)
        for stage, split in zip(self.decoders, self.splits):
            skip = skips.pop()
            x_BTPD = stage(split(x_BTPD, skip, self.grids[len(skips)]), *time)
        return x_BTPD
