"""ModelConfig: which model to build, as plain fields, and the named presets.

A preset names an architecture; any field left ``None`` takes the preset's value, any field
set explicitly overrides it, so a YAML ``model: {preset: B, depth: 16}`` is a deeper B:

    cfg = ModelConfig(preset="paper").resolved()   # every field filled in
    model = build_model(cfg)                        # evav.model.build_model

Families:

- ``flat``: an isotropic stack of divided space-time blocks at one token grid (``debug`` for
  tests, then ``S``, ``B``, ``L``, ``XL``).
- ``paper``: the U-Net hierarchy of Hudson et al. (token grids 8x8 -> 4x4 -> 2x2 for 64x64
  frames, merge/split with skip connections, windowed spatial attention at the fine levels,
  global at the bottleneck, width 512, about 74M parameters). ``depths`` lists the blocks per
  level, encoder to bottleneck to decoder (odd length: 2 * levels - 1); ``windows`` the spatial
  attention window side per level in tokens (0, or a window covering the grid: global attention).

Parameter counts and FLOPs of every preset: ``evav model-info`` and docs/models.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Family = Literal["flat", "paper"]

# Architecture presets. Fields not listed take the dataclass defaults of ModelConfig.
PRESETS: dict[str, dict] = {
    "debug": dict(family="flat", dim=128, depth=4, head_dim=32),
    "S": dict(family="flat", dim=384, depth=12, head_dim=64),
    "B": dict(family="flat", dim=768, depth=12, head_dim=64),
    "L": dict(family="flat", dim=1024, depth=24, head_dim=64),
    "XL": dict(family="flat", dim=2048, depth=24, head_dim=128),
    "paper-debug": dict(
        family="paper", dim=64, depths=[1, 1, 1, 1, 1], windows=[4, 4, 0], head_dim=32
    ),
    "paper": dict(family="paper", dim=512, depths=[3, 3, 4, 3, 3], windows=[4, 4, 0], head_dim=64),
}

# Values for architecture fields a preset leaves out.
ARCH_DEFAULTS: dict = dict(depth=0, depths=[], windows=[], head_dim=64, mlp_ratio=4.0)


@dataclass
class ModelConfig:
    """Everything that decides the model's architecture. ``None``: take the preset's value."""

    preset: str = "debug"
    family: Family | None = None
    dim: int | None = None  # token width
    depth: int | None = None  # flat: number of blocks
    depths: list[int] | None = None  # paper: blocks per level, encoder -> bottleneck -> decoder
    windows: list[int] | None = None  # paper: spatial window side per level (0: global)
    head_dim: int | None = None  # attention heads = dim // head_dim
    mlp_ratio: float | None = None
    height: int = 64  # frame size in pixels; must match the RenderSpec of the data
    width: int = 64
    patch_size: int = 8
    rope_theta: float = 10000.0  # temporal rotary base; works for clips longer than training ones
    init_std: float = 0.02
    grad_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)

    def resolved(self) -> ModelConfig:
        """A copy with every ``None`` filled from the preset, checked; ValueError when invalid."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose from {list(PRESETS)}")
        base = {**ARCH_DEFAULTS, **PRESETS[self.preset]}
        filled = {
            f.name: base[f.name] if getattr(self, f.name) is None else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        cfg = ModelConfig(**filled)
        cfg.check()
        return cfg

    @property
    def num_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (rows, cols) of one frame at the finest level."""
        return self.height // self.patch_size, self.width // self.patch_size

    @property
    def num_levels(self) -> int:
        return (len(self.depths) + 1) // 2 if self.family == "paper" else 1

    @property
    def num_blocks(self) -> int:
        return sum(self.depths) if self.family == "paper" else self.depth

    def check(self) -> None:
        """ValueError naming the first inconsistent field (call on a resolved config)."""
        p = self.patch_size
        if p <= 0 or self.height % p or self.width % p:
            raise ValueError(f"frame {self.height}x{self.width} is not divisible by patch {p}")
        if self.dim <= 0 or self.head_dim <= 0 or self.dim % self.head_dim:
            raise ValueError(
                f"dim {self.dim} must be a positive multiple of head_dim {self.head_dim}"
            )
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 (2D rotary)")
        if self.family == "flat":
            if self.depth <= 0:
                raise ValueError(f"flat model needs depth > 0, got {self.depth}")
            return
        if self.family != "paper":
            raise ValueError(f"unknown model family {self.family!r}; choose 'flat' or 'paper'")
        if len(self.depths) % 2 != 1 or any(d < 0 for d in self.depths):
            raise ValueError(
                f"paper depths must be an odd-length list of counts, got {self.depths}"
            )
        if len(self.windows) != self.num_levels:
            raise ValueError(f"paper windows needs {self.num_levels} entries, got {self.windows}")
        rows, cols = self.grid
        for level, window in enumerate(self.windows):
            scale = 2**level
            if rows % scale or cols % scale:
                raise ValueError(
                    f"token grid {rows}x{cols} cannot be halved {level} times for level {level}"
                )
            r, c = rows // scale, cols // scale
            if window < 0 or (self.window_at(level) and (r % window or c % window)):
                raise ValueError(f"level {level}: window {window} does not tile the {r}x{c} grid")

    def window_at(self, level: int) -> int:
        """Spatial window side at ``level``; 0 means global (also when it covers the grid)."""
        rows, cols = self.grid
        window = self.windows[level] if self.family == "paper" else 0
        return window if 0 < window < min(rows, cols) >> level else 0
