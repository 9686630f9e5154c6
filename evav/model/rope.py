"""Rotary positions: 1D over time (temporal attention), 2D axial over the token grid (spatial).

Angles are computed from integer positions on the fly, so temporal attention works at any frame
index, including clips longer than any seen in training and the offsets of a KV-cached
generation step. A head of ``head_dim`` channels is rotated as ``head_dim / 2`` pairs; in 2D the
first half of the pairs turns with the row, the second half with the column.
"""

from __future__ import annotations

import torch


def _angles(positions_L: torch.Tensor, num_pairs: int, theta: float) -> torch.Tensor:
    """(..., L) positions -> (..., L, num_pairs) angles, frequencies theta^(-i/num_pairs)."""
    freqs = theta ** (-torch.arange(num_pairs, device=positions_L.device) / num_pairs)
    return positions_L.float()[..., None] * freqs


def rope_1d(positions_L: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(L,) integer positions -> (L, head_dim / 2) angles; (B, L) -> (B, L, head_dim / 2)
    (packed rows: each clip's frames count from 0)."""
    return _angles(positions_L, head_dim // 2, theta)


def rope_2d(rows: int, cols: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Angles (rows * cols, head_dim / 2) of a row-major token grid: half by row, half by column."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    quarter = head_dim // 4
    return torch.cat([_angles(r, quarter, theta), _angles(c, quarter, theta)], dim=-1)


def rotation(angles_LE2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of rotary angles, computed once per stage and shared by its blocks."""
    return angles_LE2.cos(), angles_LE2.sin()


def apply_rope(x_NHLE: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x`` (..., L, E) by the angles whose ``rotation`` is
    ``rot`` (each (L, E/2), or broadcastable to x's (..., L, E/2)); keeps dtype."""
    cos, sin = rot
    x = x_NHLE.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x_NHLE.dtype)
