"""KV-cached generation vs full recomputation: time per generated frame and speedup.

    .venv/bin/python tools/bench_generate.py                 # prints the table, updates its section of docs/benchmarks.md
    .venv/bin/python tools/bench_generate.py --presets debug,S --frames 16,32

For each preset (randomly initialised: speed does not depend on the weights) and each number
of generated frames, times ``generate`` (prefill the prompt, then one frame per step against the
temporal KV cache) and ``generate_recompute`` (a full forward over the clip so far for every new
frame), checks they agree, and reports the speedup. Recomputation costs grow with the square of
the clip length, the cached steps linearly, so the speedup grows with the number of frames.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evav.model.build import build_model  # noqa: E402
from evav.model.config import ModelConfig  # noqa: E402
from evav.model.generate import generate, generate_recompute  # noqa: E402
from tools.benchlib import machine, write_section  # noqa: E402

OUT_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` calls (after one warm-up), and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", default="debug,paper-debug,S,paper")
    ap.add_argument("--frames", default="16,32", help="numbers of generated frames")
    ap.add_argument("--prompt", type=int, default=4, help="prompt frames")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=64, help="frame height and width")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--write",
        action="store_true",
        help="write its section of docs/benchmarks.md (default: print only)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = [
        "| preset | batch | prompt | generated | KV cache ms/frame | recompute ms/frame "
        "| speedup | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for preset in args.presets.split(","):
        cfg = ModelConfig(preset=preset, height=args.size, width=args.size)
        model = build_model(cfg).eval()
        prompt = torch.rand(args.batch, args.prompt, args.size, args.size, 3)
        for n in (int(f) for f in args.frames.split(",")):
            t_cache, a = timed(lambda: generate(model, prompt, n), args.repeats)  # noqa: B023
            t_full, b = timed(lambda: generate_recompute(model, prompt, n), args.repeats)  # noqa: B023
            rows.append(
                f"| {preset} | {args.batch} | {args.prompt} | {n} | {1e3 * t_cache / n:.1f} "
                f"| {1e3 * t_full / n:.1f} | {t_full / t_cache:.1f}x "
                f"| {(a - b).abs().max().item():.1e} |"
            )
            print(rows[-1], flush=True)
    md = (
        "## Generation: KV cache vs recomputation\n\n"
        f"`tools/bench_generate.py` on {machine()}, {args.threads} threads, "
        f"{args.size}x{args.size} frames, fp32, best of {args.repeats} after a warm-up.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    print()
    print(md)
    if args.write:
        write_section("generate", md, OUT_MD)


if __name__ == "__main__":
    main()
