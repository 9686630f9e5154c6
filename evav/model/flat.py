"""The flat family: an isotropic stack of divided space-time blocks at the patch grid.

Presets ``debug`` (~1M parameters, for tests) through ``S``, ``B``, ``L``, ``XL`` (~1.6B); see
docs/models.md for their parameters and FLOPs per frame.
"""

from __future__ import annotations

import torch

from evav.model.attention import KVCache
from evav.model.base import NextFrameModel
from evav.model.blocks import Stage
from evav.model.config import ModelConfig


class FlatModel(NextFrameModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.stage = Stage(
            cfg.depth, cfg.dim, cfg.head_dim, cfg.mlp_ratio, cfg.grid, window=0, first_layer=0,
            rope_theta=cfg.rope_theta, grad_checkpointing=cfg.grad_checkpointing,
        )  # fmt: skip

    def trunk(
        self,
        x_BTPD: torch.Tensor,
        positions_T: torch.Tensor,
        cache: KVCache | None,
        segments_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.stage(x_BTPD, positions_T, cache, segments_BT)
