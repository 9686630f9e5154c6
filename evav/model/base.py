"""NextFrameModel: what both families share: patch embedding, pixel head, positions, init.

    pred_BTHWC = model(frames_BTHWC)      # frames in [0, 1]; pred[:, t] predicts frame t + 1
    pred_BTHWC = model(frames_BTHWC, segments_BT=seg)  # packed rows: several clips per row

A packed row holds several clips one after another; ``segments[b, t]`` numbers the clip of frame
t (0, 1, ... along the row; padding its own number). Temporal attention stays within a clip and
each clip's frames are at temporal positions 0, 1, ... as if it were alone in its row.

A family implements only ``trunk`` (tokens -> tokens). With a ``KVCache`` the frames are the
next ones after ``cache.pos`` (a prefill from frame 0, then one frame per call); see
``evav.model.generate``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from evav.model.attention import KVCache, clip_positions
from evav.model.config import ModelConfig
from evav.model.patches import PatchEmbed, PixelHead


class NextFrameModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg.patch_size, cfg.dim, cfg.grid[0] * cfg.grid[1])
        self.head = PixelHead(cfg.patch_size, cfg.dim, cfg.height, cfg.width)

    def trunk(
        self,
        x_BTPD: torch.Tensor,
        positions_T: torch.Tensor,
        cache: KVCache | None,
        segments_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        frames_BTHWC: torch.Tensor,
        cache: KVCache | None = None,
        segments_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frames (B, T, H, W, 3) float in [0, 1] -> next-frame predictions, same shape."""
        cfg = self.cfg
        if frames_BTHWC.ndim != 5 or frames_BTHWC.shape[2:] != (cfg.height, cfg.width, 3):
            raise ValueError(
                f"expected frames (B, T, {cfg.height}, {cfg.width}, 3), got {tuple(frames_BTHWC.shape)}"
            )
        if not frames_BTHWC.is_floating_point():
            raise ValueError(f"expected float frames in [0, 1], got {frames_BTHWC.dtype}")
        B, T = frames_BTHWC.shape[:2]
        if segments_BT is not None:
            if cache is not None:
                raise ValueError("a packed batch (segments) cannot run against a KV cache")
            if segments_BT.shape != (B, T):
                raise ValueError(f"segments must be ({B}, {T}), got {tuple(segments_BT.shape)}")
            positions = clip_positions(segments_BT)
        else:
            start = cache.pos if cache is not None else 0
            positions = torch.arange(start, start + T, device=frames_BTHWC.device)
        x = self.trunk(self.embed(frames_BTHWC), positions, cache, segments_BT)
        if cache is not None:
            cache.pos += T
        return self.head(x)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Set every parameter: linear weights N(0, init_std) truncated at 3 std (residual output
        projections scaled by 1/sqrt(2 * blocks), GPT-2 style), the patch position embedding
        N(0, init_std) truncated, biases 0, norm scales 1: ``init_module`` on every module, in
        ``self.modules()`` order."""
        for m in self.modules():
            self.init_module(m)

    @torch.no_grad()
    def init_module(self, m: nn.Module) -> None:
        """Set the parameters ``m`` owns itself (not its children's), as ``init_weights`` does.

        A caller whose parameters live elsewhere (ZeRO-3 partitions them across ranks:
        ``evav.distributed.build_model``) makes each module's own parameters whole around this
        call, one module at a time, in ``self.modules()`` order: the same random draws as
        ``init_weights``."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * max(self.cfg.num_blocks, 1))
        if isinstance(m, nn.Linear):
            s = out_std if getattr(m, "is_residual_out", False) else std
            nn.init.trunc_normal_(m.weight, std=s, a=-3 * s, b=3 * s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RMSNorm):
            nn.init.ones_(m.weight)
        elif isinstance(m, PatchEmbed):
            nn.init.trunc_normal_(m.pos_PD, std=std, a=-3 * std, b=3 * std)
