"""Evaluation throughput: samples/s for generation + read-out, per model preset, on CPU.

    .venv/bin/python tools/bench_eval.py                       # debug and S; updates docs/benchmarks.md
    .venv/bin/python tools/bench_eval.py --presets debug --per-task 16

Builds a small synthetic suite (every task kind the suite has: classification over images,
audio, text and video, and video prediction) in a temporary directory, then runs the real
``evaluate`` (KV-cached batched generation, decoding, read-out, scoring) with randomly
initialised models: speed does not depend on the weights. Reports samples/s per preset, and the
share of the time spent outside the model (clip decoding + read-out + scoring), measured by
running the same evaluation with a model that returns its input (zero model cost) as baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evav.eval.load import Loaded  # noqa: E402
from evav.eval.run import EvalOptions, evaluate  # noqa: E402
from evav.eval.samples import load_eval_data  # noqa: E402
from evav.model import ModelConfig, build_model, num_params  # noqa: E402
from evav.train import TrainConfig  # noqa: E402
from tools.benchlib import machine, write_section  # noqa: E402


class Echo(torch.nn.Module):
    """Zero-cost stand-in model: predicts that every next frame equals the current one."""

    def forward(self, frames, cache=None):
        return frames


def run(model, data, batch_size: int) -> float:
    cfg = TrainConfig()
    loaded = Loaded(model, cfg, 0, data.render_hash, None, None, Path("bench"))
    t0 = time.perf_counter()
    evaluate(loaded, data, EvalOptions(batch_size=batch_size, progress=False))
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="debug,S")
    p.add_argument("--per-task", type=int, default=32, help="evaluated samples per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--write",
        action="store_true",
        help="write its section of docs/benchmarks.md (default: print only)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "synthetic"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "evav.cli",
                "preprocess",
                "synthetic",
                "--out",
                str(shards),
                "train_per_task=1",
                f"val_per_task={args.per_task}",
            ],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        data = load_eval_data([str(shards)], "val")
        n = len(data.samples)
        base = min(run(Echo(), data, args.batch_size) for _ in range(2))
        rows = []
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            model = build_model(ModelConfig(preset=preset)).eval()
            run(model, data, args.batch_size)  # warm-up
            t = min(run(model, data, args.batch_size) for _ in range(2))
            rows.append((preset, num_params(model), n, t, n / t, base / t))
            print(
                f"{preset}: {n} samples in {t:.2f} s = {n / t:.1f} samples/s "
                f"(outside the model: {base / t:.0%})",
                flush=True,
            )
    load = os.getloadavg()[0]
    md = [
        "## Evaluation: generation + read-out (`tools/bench_eval.py`)",
        "",
        f"Machine: {machine()}; torch threads {torch.get_num_threads()}; load average at the end "
        f"{load:.1f}.",
        f"Synthetic suite, {args.per_task} samples per task (5 tasks: 4 classification, 1 video "
        f"prediction of 2 frames), batch {args.batch_size}, fp32, randomly initialised models. "
        "'Outside the model' = the same evaluation with a zero-cost model (clip decoding, "
        "read-out and scoring) as a share of the total.",
        "",
        "| preset | parameters | samples | seconds | samples/s | outside the model |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {p_} | {params / 1e6:.1f}M | {n_} | {t:.2f} | {sps:.1f} | {share:.0%} |"
        for p_, params, n_, t, sps, share in rows
    ]
    text = "\n".join(md)
    print(text)
    if args.write:
        write_section("eval", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
