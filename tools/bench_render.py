"""Renderer throughput: frames/s on one core for each modality, and cached vs uncached text.

    .venv/bin/python tools/bench_render.py            # prints the table, updates docs/benchmarks.md
    .venv/bin/python tools/bench_render.py

Inputs are real files from ../shared/datasets when present (FSDD wav, CIFAR-10 JPEG, a real
clip, SST-2 sentences), else generated ones. One core: torch and the codecs are limited to one
thread, so the figures are per core. Each figure is the median of --repeats timed passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evav.frames import (  # noqa: E402
    RenderSpec,
    TextRenderer,
    render_audio,
    render_image,
    render_video,
    split_words,
)
from tools.benchlib import machine, write_section  # noqa: E402


def timed(fn, n_frames_fn, repeats: int) -> float:
    """Median frames/s over ``repeats`` passes of ``fn``."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = n_frames_fn(fn())
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--datasets", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets")
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--write",
        action="store_true",
        help="write its section of docs/benchmarks.md (default: print only)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = Path(args.datasets)
    spec = RenderSpec()

    sentences = [ln.rsplit("\t", 1)[0] for ln in (ds / "sst2/dev.tsv").read_text().splitlines()[1:]]
    words = [w for s in sentences for w in split_words(s)][:3000]
    wavs = sorted((ds / "fsdd/recordings").glob("*.wav"))[:100]
    jpgs = sorted((ds / "cifar10/test").glob("*/*.jpg"))[:300]
    video = ds / "videos/brink_30_320x180.mp4"

    rows = []
    fresh = TextRenderer(spec)
    uncached = timed(lambda: [fresh.uncached_render_token(w) for w in words], len, args.repeats)
    warm = TextRenderer(spec)
    warm.render_tokens(words)
    cached = timed(lambda: warm.render_tokens(words), len, args.repeats)
    rows += [
        ("text, uncached (3,000 SST-2 dev tokens)", uncached),
        ("text, glyph cache warm", cached),
    ]
    rows.append(
        (
            "image (CIFAR-10 JPEG 32x32 -> 64x64)",
            timed(lambda: [render_image(p, spec) for p in jpgs], len, args.repeats),
        )
    )
    rows.append(
        (
            "audio (FSDD wav -> 1 log-mel frame)",
            timed(lambda: [render_audio(p, spec) for p in wavs], len, args.repeats),
        )
    )
    rows.append(
        (
            "video (320x180 H.264, 16 of 30 frames kept)",
            timed(lambda: render_video(video, spec, 16), len, args.repeats),
        )
    )

    table = "\n".join(f"| {name} | {rate:,.0f} |" for name, rate in rows)
    md = (
        f"## Rendering (`tools/bench_render.py`)\n\nMachine: {machine()}. 64x64 frames, one "
        f"core, median of {args.repeats} passes.\n\n| renderer | frames/s per core |\n|---|---:|\n"
        f"{table}\n\nText glyph cache: warm/uncached = **{cached / uncached:.0f}x** faster.\n"
    )
    print(md)
    if args.write:
        write_section("render", md)


if __name__ == "__main__":
    main()
