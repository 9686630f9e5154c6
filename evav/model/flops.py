"""Analytic model FLOPs per frame: matmuls and attention, PaLM convention.

    forward_flops_per_frame(cfg, num_frames=16)   # one forward pass, per frame of the clip
    train_flops_per_frame(cfg, num_frames=16)     # forward + backward = 3x forward

A matmul (m x k) @ (k x n) is 2mkn FLOPs. Attention is counted in full (a causal mask does not
halve it), as PaLM and ``torch.utils.flop_counter`` do: scores and weighted values cost
4 * queries * keys * width per attention group. Spatial attention has ``tokens`` (or window)
keys per query; temporal attention has ``num_frames`` keys per query, so the per-frame cost
grows with the clip length. Norms, activations, rotary and softmax are not counted. MFU =
``train_flops_per_frame * frames_per_second / peak FLOP/s``.
"""

from __future__ import annotations

from evav.model.config import ModelConfig


def _block(cfg: ModelConfig, tokens: int, window: int, num_frames: int) -> int:
    """Forward FLOPs of one block, per frame, with ``tokens`` tokens per frame."""
    D, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    keys_spatial = window * window if window else tokens
    projections = 2 * (2 * tokens * D * 4 * D)  # spatial and temporal: qkv (3D) + out (D)
    attention = 4 * tokens * keys_spatial * D + 4 * tokens * num_frames * D
    mlp = 2 * 2 * tokens * D * hidden
    return projections + attention + mlp


def forward_flops_per_frame(cfg: ModelConfig, num_frames: int) -> int:
    """Forward FLOPs per frame for clips of ``num_frames`` frames."""
    cfg = cfg.resolved()
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    rows, cols = cfg.grid
    D, patch_values = cfg.dim, cfg.patch_size**2 * 3
    flops = 2 * 2 * rows * cols * patch_values * D  # patch embedding and pixel head
    if cfg.family == "flat":
        return flops + cfg.depth * _block(cfg, rows * cols, 0, num_frames)
    levels = cfg.num_levels
    stage_levels = list(range(levels)) + list(range(levels - 2, -1, -1))
    for depth, lv in zip(cfg.depths, stage_levels):
        flops += depth * _block(cfg, (rows >> lv) * (cols >> lv), cfg.window_at(lv), num_frames)
    for lv in range(1, levels):  # merge into level lv, split out of it and fuse with the skip
        coarse, fine = (rows >> lv) * (cols >> lv), (rows >> (lv - 1)) * (cols >> (lv - 1))
        flops += 2 * coarse * 4 * D * D + 2 * coarse * D * 4 * D + 2 * fine * 2 * D * D
    return flops


def train_flops_per_frame(cfg: ModelConfig, num_frames: int) -> int:
    """Forward + backward FLOPs per frame (3x forward)."""
    return 3 * forward_flops_per_frame(cfg, num_frames)


# nominal dense bf16 peak FLOP/s per device (vendor data sheets), most specific name first
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
)


def peak_bf16_flops(device_name: str) -> float:
    """The nominal dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name()``);
    0.0 for a device not in ``PEAK_BF16`` (then set ``peak_flops`` in the config for MFU)."""
    for name, flops in PEAK_BF16:
        if name in device_name:
            return flops
    return 0.0
