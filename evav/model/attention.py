"""Divided space-time attention: spatial within a frame, temporal (causal) per token position.

Every attention is one ``scaled_dot_product_attention`` call without a mask tensor (spatial:
bidirectional; temporal: ``is_causal=True``), so GPUs get flash kernels. A packed batch (several
clips per row, ``packed_causal_mask``) gives temporal attention a block-causal boolean mask
instead: a frame attends to the earlier frames of its own clip only (fused memory-efficient
kernels on GPU). Windowed spatial
attention reshapes the token grid into windows, batched, instead of masking.

Temporal attention can run against a ``KVCache``: a prefill (the prompt, from frame 0) writes
its keys/values and attends causally; each later call adds one frame whose query attends to
every cached frame and itself, which is exactly the causal row of a full recomputation. Spatial
attention is within a frame, so only temporal keys/values are cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evav.model.rope import apply_rope

SPATIAL_ROPE_THETA = 100.0  # grids are at most a few dozen tokens across


class KVCache:
    """Temporal keys/values of every temporal attention layer, for ``max_frames`` frames.

    ``pos`` is the number of frames already processed; the model advances it after each call.
    Buffers are allocated on first use, shaped (B * tokens, heads, max_frames, head_dim).
    """

    def __init__(self, max_frames: int):
        self.max_frames = max_frames
        self.pos = 0
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(
        self, layer: int, k_NHTE: torch.Tensor, v_NHTE: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store frames ``pos .. pos+T`` of ``layer``; return its keys/values of frames ``0 .. pos+T``."""
        end = self.pos + k_NHTE.shape[2]
        if end > self.max_frames:
            raise ValueError(f"KV cache holds {self.max_frames} frames; frame {end - 1} requested")
        if layer not in self.kv:
            shape = (*k_NHTE.shape[:2], self.max_frames, k_NHTE.shape[3])
            self.kv[layer] = (k_NHTE.new_empty(shape), v_NHTE.new_empty(shape))
        k_all, v_all = self.kv[layer]
        k_all[:, :, self.pos : end] = k_NHTE
        v_all[:, :, self.pos : end] = v_NHTE
        return k_all[:, :, :end], v_all[:, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention over (N, L, D) with rotary q/k; no biases."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.num_heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.is_residual_out = True  # scaled down at init (see base.init_weights)

    def qkv_heads(self, x_NLD: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]):
        """Project to rotated q, k and v, each (N, heads, L, head_dim); ``rot``: the rotary
        ``(cos, sin)`` (``rope.rotation``)."""
        q, k, v = self.qkv(x_NLD).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        return apply_rope(q, rot), apply_rope(k, rot), v

    def out(self, o_NHLE: torch.Tensor) -> torch.Tensor:
        return self.proj(o_NHLE.transpose(1, 2).flatten(2))


class SpatialAttention(Attention):
    """Bidirectional attention among the tokens of one frame, globally or in square windows."""

    def forward(
        self, x_BTPD: torch.Tensor, grid: tuple[int, int], window: int, rot_LE2: tuple
    ) -> torch.Tensor:
        """``rot`` is the rotation of the grid (global) or of one window (local); ``window`` 0 =
        global."""
        B, T, P, D = x_BTPD.shape
        if window:
            x = to_windows(x_BTPD, grid, window)
        else:
            x = x_BTPD.reshape(B * T, P, D)
        q, k, v = self.qkv_heads(x, rot_LE2)
        x = self.out(F.scaled_dot_product_attention(q, k, v))
        if window:
            return from_windows(x, (B, T), grid, window)
        return x.view(B, T, P, D)


class TemporalAttention(Attention):
    """Causal attention across frames, separately at each token position."""

    def __init__(self, dim: int, head_dim: int, layer: int):
        super().__init__(dim, head_dim)
        self.layer = layer  # this layer's slot in a KVCache

    def forward(
        self,
        x_BTPD: torch.Tensor,
        rot_TE2: tuple,
        cache: KVCache | None = None,
        mask_N1TT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``rot`` (cos, sin) each (T, E/2), or per row (B*P, 1, T, E/2) with a packed batch's
        ``mask``."""
        B, T, P, D = x_BTPD.shape
        x = x_BTPD.transpose(1, 2).reshape(B * P, T, D)
        q, k, v = self.qkv_heads(x, rot_TE2)
        if mask_N1TT is not None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_N1TT)
        elif cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.pos
            if start > 0 and T > 1:
                raise ValueError("after the prefill, a KV-cached step takes one frame at a time")
            k, v = cache.update(self.layer, k, v)
            # prefill: square and causal; a later step: one new frame sees all earlier ones
            o = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0)
        return self.out(o).view(B, P, T, D).transpose(1, 2)


def packed_causal_mask(segments_BT: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B*tokens, 1, T, T) bool, True where frame i may attend to frame j of a packed row:
    j <= i and both in the same clip (``segments`` numbers the clips of each row)."""
    B, T = segments_BT.shape
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=segments_BT.device).tril()
    allowed_BTT = (segments_BT[:, :, None] == segments_BT[:, None, :]) & causal_TT
    return allowed_BTT[:, None].expand(B, tokens, T, T).reshape(B * tokens, 1, T, T)


def clip_positions(segments_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) frame index of each frame within its own clip of a packed row."""
    B, T = segments_BT.shape
    t_BT = torch.arange(T, device=segments_BT.device).expand(B, T)
    starts = torch.ones_like(segments_BT, dtype=torch.bool)
    starts[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
    return t_BT - torch.where(starts, t_BT, 0).cummax(dim=1).values


def to_windows(x_BTPD: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """(B, T, rows*cols, D) -> (B*T*num_windows, window*window, D), each window row-major."""
    B, T, _, D = x_BTPD.shape
    rows, cols = grid
    x = x_BTPD.view(B * T, rows // window, window, cols // window, window, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, D)


def from_windows(
    x_NWD: torch.Tensor, bt: tuple[int, int], grid: tuple[int, int], window: int
) -> torch.Tensor:
    """Inverse of ``to_windows``."""
    (B, T), (rows, cols), D = bt, grid, x_NWD.shape[-1]
    x = x_NWD.view(B * T, rows // window, cols // window, window, window, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, T, rows * cols, D)
