"""Preprocessing throughput: samples/s with 1 and 2 workers per modality, the speed-up, bytes/sample.

    .venv/bin/python tools/bench_preprocess.py            # prints the table, updates its section of docs/benchmarks.md
    .venv/bin/python tools/bench_preprocess.py --scale 0.25 --repeats 1   # a quick look

Each row is a whole `evav preprocess` build (preprocessing.runner.build, in-process, as the CLI
runs it) from ../shared/datasets or $EVAV_DATASETS: text (SST-2 train rows), audio (FSDD),
image (CIFAR-10 JPEGs), video (the real clips, 8 frames each, listed several times through
symlinks in a temporary folder) and generated video (Moving MNIST). One worker is one core:
torch, BLAS and FFmpeg's video decoder run one thread, in the 1-worker build (in-process) as in
the forked workers. Wall time covers everything a user waits for: listing, forking the
workers, rendering, encoding, writing shards and the manifest. The default --scale 3 makes each
build 5-25 s on 2 cores, so the fixed costs are a small part. Median of --repeats builds.
"""

# ruff: noqa: E402  (the thread settings below must come before numpy and torch load)
from __future__ import annotations

import os

# 1 worker = 1 core: no BLAS/OpenMP thread pools in this process or the workers it forks
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evav.frames.video import set_decode_threads  # noqa: E402
from preprocessing.runner import BuildConfig, build  # noqa: E402
from tools.benchlib import machine, write_section  # noqa: E402

OUT_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def datasets_root() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    root = Path(os.environ.get("EVAV_DATASETS", default))
    if not (root / "README.md").is_file():
        sys.exit(f"bench_preprocess: real datasets not found at {root} (set EVAV_DATASETS)")
    return root


def cases(root: Path, tmp: Path, scale: float) -> list[tuple[str, str, Path, dict, int]]:
    """(modality, builder, src, options, limit per split)."""
    videos = tmp / "videos"
    videos.mkdir()
    clips = sorted((root / "videos").glob("*_256.mp4")) + sorted(
        (root / "videos").glob("*x180.mp4")
    )
    for i in range(max(1, round(160 * scale))):
        src = clips[i % len(clips)]
        (videos / f"{i:03d}_{src.name}").symlink_to(src)
    n = lambda k: max(8, round(k * scale))  # noqa: E731
    return [
        ("text (SST-2)", "sst2", root / "sst2", {}, n(3000)),
        ("audio (FSDD)", "fsdd", root / "fsdd", {}, n(2000)),
        ("image (CIFAR-10)", "cifar10", root / "cifar10", {}, n(3000)),
        ("video (real clips, 8 frames)", "video", videos, {}, n(1000)),
        (
            "video (Moving MNIST, 8 frames)",
            "moving_mnist",
            root / "mnist",
            {"test_sequences": n(1500)},
            n(1500),
        ),
    ]


def run(
    builder: str, src: Path, options: dict, limit: int, workers: int, out: Path
) -> tuple[float, int, int]:
    """One build: (seconds, samples, bytes)."""
    t0 = time.perf_counter()
    m = build(
        BuildConfig(
            builder,
            str(out),
            str(src),
            options=options,
            workers=workers,
            limit=limit,
            shard_samples=max(4, limit // 64),
        )
    )
    dt = time.perf_counter() - t0
    assert m is not None
    return dt, m.num_samples, sum(sh.bytes for s in m.splits.values() for sh in s.shards)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scale",
        type=float,
        default=3.0,
        help="multiply the input counts (capped by each dataset's size)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--write",
        action="store_true",
        help="write its section of docs/benchmarks.md (default: print only)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 1 worker = 1 core (workers set this for themselves too)
    set_decode_threads(1)  # and FFmpeg decodes on the calling thread, as in the workers
    root = datasets_root()
    lines = [
        "| modality | samples | 1 worker: samples/s | 2 workers: samples/s | per worker | 2 vs 1 | bytes/sample |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, builder, src, options, limit in cases(root, tmp, args.scale):
            rates, size, count = {1: [], 2: []}, 0, 0
            for r in range(args.repeats):
                for w in (1, 2):
                    dt, count, size = run(
                        builder, src, options, limit, w, tmp / f"{builder}-{w}-{r}"
                    )
                    rates[w].append(count / dt)
            r1, r2 = statistics.median(rates[1]), statistics.median(rates[2])
            ratios.append(r2 / r1)
            row = f"| {name} | {count:,} | {r1:,.0f} | {r2:,.0f} | {r2 / 2:,.0f} | {r2 / r1:.2f}x | {size / count:,.0f} |"
            lines.append(row)
            print(row, flush=True)
    md = (
        "## Preprocessing (`tools/bench_preprocess.py`)\n\n"
        f"Machine: {machine()}. Whole builds (list, start workers, render, encode, write shards, "
        f"manifest) with the builders' default codecs, 64x64 frames; median of {args.repeats} "
        f"builds at --scale {args.scale:g} (5-25 s each, so listing, forking the workers and "
        "the merge are a small part). One worker is one core: torch, BLAS and FFmpeg's decoder "
        "run one thread in this process and in the workers. Real video (256-pixel clips "
        "decoded and resized) gains least; why was not investigated.\n\n"
        + "\n".join(lines)
        + f"\n\nMedian speed-up, 2 workers vs 1: **{statistics.median(ratios):.2f}x** (goal >= 1.8).\n"
    )
    if args.write:
        write_section("preprocess", md, OUT_MD)
        print(f"wrote {OUT_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
