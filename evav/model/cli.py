"""``evav model-info``: parameters and FLOPs per frame of every model preset, as a markdown table.

    evav model-info                       # 64x64 frames, FLOPs for 16-frame clips
    evav model-info --frames 32 height=128 width=128

``key=value`` overrides apply to every preset's ModelConfig. Models are built on the meta
device, so even XL costs no memory.
"""

from __future__ import annotations

import argparse
import sys

import torch

from evav.config import apply_overrides, from_dict
from evav.model.build import build_model, num_params
from evav.model.config import PRESETS, ModelConfig
from evav.model.flops import forward_flops_per_frame, train_flops_per_frame


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frames", type=int, default=16, help="clip length for the temporal attention FLOPs"
    )
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("overrides", nargs="*", default=[], help="ModelConfig key=value")


def preset_table(presets: list[str], num_frames: int, overrides: list[str]) -> str:
    """Markdown table: architecture, parameters and GFLOPs per frame of each preset."""
    rows = [
        f"| preset | family | dim | blocks | heads | frame | parameters "
        f"| fwd GFLOP/frame (T={num_frames}) | train GFLOP/frame (T={num_frames}) |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for name in presets:
        cfg = from_dict(ModelConfig, apply_overrides({"preset": name}, overrides)).resolved()
        with torch.device("meta"):
            params = num_params(build_model(cfg))
        blocks = str(cfg.depth) if cfg.family == "flat" else "+".join(map(str, cfg.depths))
        rows.append(
            f"| {name} | {cfg.family} | {cfg.dim} | {blocks} | {cfg.num_heads} "
            f"| {cfg.height}x{cfg.width}/p{cfg.patch_size} | {params / 1e6:,.1f}M "
            f"| {forward_flops_per_frame(cfg, num_frames) / 1e9:,.2f} "
            f"| {train_flops_per_frame(cfg, num_frames) / 1e9:,.2f} |"
        )
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        unknown = [p for p in presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"unknown presets {unknown}; choose from {list(PRESETS)}")
        table = preset_table(presets, args.frames, list(getattr(args, "overrides", [])))
    except ValueError as e:  # a bad preset, override or frame count: a user error
        print(f"evav model-info: error: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0
