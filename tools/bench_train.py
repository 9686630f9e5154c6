"""Benchmark `evav train`: steps/s, frames/s and achieved FLOP/s per model preset, ZeRO stage and
number of processes, against this machine's measured matmul peak.

    python tools/bench_train.py          # CPU: debug and S, ZeRO 0-3, 1 and 2 processes
    python tools/bench_train.py --device cuda --presets B,L --procs 1 --peak-flops 989e12

Every cell is a real training run (`python -m evav.cli train configs/debug.yaml
model.preset=P engine.zero_stage=Z ...`, through torchrun for several processes) on synthetic
shards built into a temporary folder (or --data). The first --warmup steps are not timed; the
step time is the median of the trainer's own ``speed/step_s`` over the remaining steps.

- frames/s counts every frame the model computes on (micro_batch x clip_frames x processes per
  step, padding included), which is what the FLOP count is per.
- achieved FLOP/s = ``evav.model.train_flops_per_frame`` x frames/s (matmuls and attention,
  forward + backward; norms, softmax, the loss and the optimizer are not counted).
- peak: a timed large matmul in this process, on as many threads as the runs use in all (on CPU
  each of N processes gets cores/N threads): fp32 and bf16 at the start, and bf16 again just
  before each cell (its column shows what other jobs on a shared machine left to the cell).
  The runs train in bf16, so "of peak" is against the highest bf16 figure measured,
  the closest to what the machine can do. With --peak-flops (a device's nominal dense bf16
  peak, e.g. 989e12 for an H100/H200) the table also has MFU against it.

The machine may be shared: the 1-minute load average before each cell is in the table. Writes
the section ``train`` of docs/benchmarks.md (tools.benchlib.write_section) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evav.metrics import read_metrics  # noqa: E402
from evav.model import ModelConfig, build_model, train_flops_per_frame  # noqa: E402
from tools.benchlib import machine, write_section  # noqa: E402
from tools.mlflow_server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCH = {"debug": 8, "S": 2, "B": 32, "L": 16, "XL": 8}  # clips per process per step


def matmul_peak(dtype: torch.dtype, device: str, threads: int, seconds: float = 2.0) -> float:
    """FLOP/s of repeated square matmuls (n = 2048 on CPU, 8192 on GPU) on ``threads`` threads."""
    n = 8192 if device == "cuda" else 2048
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        per_sync = 10 if device == "cuda" else 1  # GPU: queue several, then wait for them
        for _ in range(3):
            a @ b
        sync()
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(per_sync):
                a @ b
            sync()
            count += per_sync
        return 2 * n**3 * count / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def build_data(root: Path) -> Path:
    """Synthetic shards (every modality pair, a few clips per task) for the runs to read."""
    out = root / "synthetic"
    cmd = [
        sys.executable,
        "-m",
        "evav.cli",
        "preprocess",
        "synthetic",
        "--out",
        str(out),
        "train_per_task=24",
        "val_per_task=2",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            "bench_train: building shards failed:\n" + done.stdout[-2000:] + done.stderr[-2000:]
        )
    return out


def flash_check(preset: str, micro_batch: int, clip_frames: int, size: int = 64) -> str:
    """Whether the model's attention runs on the flash kernels in bf16: a forward and backward
    with only SDPA's flash backend allowed (an error if it cannot serve a call), timed against
    the math backend. A sentence for the table's notes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model(ModelConfig(preset=preset, height=size, width=size)).cuda()
    x = torch.rand(micro_batch, clip_frames, size, size, 3, device="cuda")

    def step_ms(backend) -> float:
        with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
            for i in range(8):  # 3 warm-up, 5 timed
                if i == 3:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                model(x).float().square().mean().backward()
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 5 * 1e3

    try:
        flash = step_ms(SDPBackend.FLASH_ATTENTION)
    except RuntimeError as e:
        return (
            f"Flash attention: NOT usable for preset {preset} at {size}x{size} "
            f"({str(e).splitlines()[0][:120]})."
        )
    math = step_ms(SDPBackend.MATH)
    return (
        f"Flash attention: preset {preset}'s forward + backward ({micro_batch} clips of "
        f"{clip_frames} frames at {size}x{size}) ran with only SDPA's flash backend allowed, "
        f"{flash:.1f} ms against {math:.1f} ms on the math backend ({math / flash:.1f}x)."
    )


def run_cell(
    data: Path,
    run_dir: Path,
    preset: str,
    zero: int,
    procs: int,
    threads: int,
    micro_batch: int,
    clip_frames: int,
    steps: int,
    device: str,
    timeout_s: float,
    workers: int = 0,
) -> dict:
    """One training run; returns its step times and peak memory (or the error)."""
    train = [
        "-m",
        "evav.cli",
        "train",
        "configs/debug.yaml",
        f"data.train=[{data}]",
        f"run_dir={run_dir}",
        f"model.preset={preset}",
        f"engine.zero_stage={zero}",
        f"micro_batch={micro_batch}",
        f"data.clip_frames={clip_frames}",
        "data.pad_to=clip_frames",
        f"data.num_workers={workers}",
        f"steps={steps}",
        "log_every=1",
        "val_every=0",
        "ckpt_every=0",
        "keep_last=1",
        "optim.warmup_steps=1",
        "metrics.enabled=false",
        "metrics.image_every=0",
    ]
    cmd = [sys.executable, *train]
    if procs > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_port",
            str(free_port()),
            *train,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    records = [r for r in read_metrics(run_dir) if "speed/step_s" in r]
    if done.returncode != 0 or len(records) < steps:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        return {"error": f"exit {done.returncode}, {len(records)}/{steps} steps"}
    return {
        "step_s": [r["speed/step_s"] for r in records],
        "mem_gb": max(r.get("mem/peak_gb", 0.0) for r in records),
        "wait": statistics.median(r.get("data/wait_frac", 0.0) for r in records),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--presets", help="comma-separated (default: debug,S on cpu, B,L on cuda)")
    ap.add_argument("--zero", default="0,1,2,3", help="ZeRO stages, comma-separated")
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    ap.add_argument(
        "--micro-batch", type=int, help="clips per process per step (default: per preset)"
    )
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument(
        "--workers", type=int, help="loader workers per process (default 0 cpu, 4 cuda)"
    )
    ap.add_argument("--steps", type=int, help="timed steps (default 3 on cpu, 30 on cuda)")
    ap.add_argument("--warmup", type=int, help="untimed first steps (default 2 on cpu, 10 on cuda)")
    ap.add_argument(
        "--peak-flops",
        type=float,
        default=0.0,
        help="nominal peak FLOP/s per device for MFU (e.g. 989e12 for H100/H200 bf16)",
    )
    ap.add_argument("--data", type=Path, help="shards to train on (default: synthetic, built here)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train: --device cuda but torch sees no GPU")
    cuda = args.device == "cuda"
    presets = (args.presets or ("B,L" if cuda else "debug,S")).split(",")
    stages = [int(z) for z in args.zero.split(",")]
    procs_list = [int(p) for p in args.procs.split(",")]
    steps = args.steps or (30 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.workers = args.workers if args.workers is not None else (4 if cuda else 0)
    cores = len(os.sched_getaffinity(0))
    start = time.time()
    if cuda and max(procs_list) > torch.cuda.device_count():
        sys.exit(f"bench_train: {max(procs_list)} processes but {torch.cuda.device_count()} GPU(s)")

    peak_threads = cores if not cuda else torch.get_num_threads()
    peak = {
        name: matmul_peak(dt, args.device, peak_threads)
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"matmul peak on {peak_threads} threads: fp32 {peak['fp32'] / 1e9:,.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:,.0f} GFLOP/s",
        flush=True,
    )

    flash = ""
    if cuda:  # at the bench's frame size, and at 256x256 (1,024 tokens a frame)
        mb = args.micro_batch or MICRO_BATCH.get(presets[0], 4)
        flash = " ".join(
            [
                flash_check(presets[0], mb, args.clip_frames),
                flash_check(presets[0], max(1, mb // 16), args.clip_frames, 256),
            ]
        )
    if flash:
        print(flash, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        data = args.data or build_data(Path(tmp))
        for preset in presets:
            cfg = ModelConfig(preset=preset)
            params_m = sum(p.numel() for p in build_model(cfg).parameters()) / 1e6
            flops_frame = train_flops_per_frame(cfg, args.clip_frames)
            mb = args.micro_batch or MICRO_BATCH.get(preset, 4)
            for procs in procs_list:
                threads = max(1, cores // procs)
                for zero in stages:
                    load = os.getloadavg()[0]
                    cell_peak = matmul_peak(torch.bfloat16, args.device, peak_threads, 1.5)
                    run_dir = Path(tmp) / f"{preset}-z{zero}-p{procs}"
                    t0 = time.perf_counter()
                    res = run_cell(
                        data,
                        run_dir,
                        preset,
                        zero,
                        procs,
                        threads,
                        mb,
                        args.clip_frames,
                        warmup + steps,
                        args.device,
                        args.timeout,
                        args.workers,
                    )
                    row = {
                        "preset": preset,
                        "params_m": params_m,
                        "zero": zero,
                        "procs": procs,
                        "threads": threads,
                        "micro_batch": mb,
                        "load": load,
                        "peak": cell_peak,
                        "wall_s": time.perf_counter() - t0,
                        **res,
                    }
                    if "step_s" in res:
                        step_s = statistics.median(res["step_s"][warmup:])
                        fps = mb * args.clip_frames * procs / step_s
                        row.update(
                            step_s=step_s,
                            steps_per_s=1 / step_s,
                            frames_per_s=fps,
                            flops=fps * flops_frame,
                        )
                        if args.peak_flops:
                            row["mfu"] = fps * flops_frame / (args.peak_flops * procs)
                    rows.append(row)
                    print(
                        json.dumps(
                            {k: v for k, v in row.items() if k != "step_s"}
                            | {"step_s": row.get("step_s")}
                        ),
                        flush=True,
                    )

    md = section(rows, peak, peak_threads, args, cores, steps, warmup, time.time() - start, flash)
    print(md)
    if not args.no_write:
        write_section("train" if not cuda else "train-cuda", md)


def section(rows, peak, peak_threads, args, cores, steps, warmup, wall, flash="") -> str:
    mfu = bool(args.peak_flops)
    head = (
        "| preset | params | ZeRO | procs x threads | clips/proc | load (1 min) "
        "| bf16 peak GFLOP/s | step s | steps/s | frames/s | achieved GFLOP/s | of peak |"
        + (" MFU |" if mfu else "")
        + " peak mem GB | data wait |"
    )
    sep = "|---" * (head.count("|") - 1) + "|"
    lines = [head, sep]
    best = max([peak["bf16"]] + [r["peak"] for r in rows])
    for r in rows:
        cells = [
            r["preset"],
            f"{r['params_m']:.1f}M",
            str(r["zero"]),
            f"{r['procs']} x {r['threads']}",
            str(r["micro_batch"]),
            f"{r['load']:.1f}",
            f"{r['peak'] / 1e9:,.0f}",
        ]
        if "error" in r:
            cells += [f"failed: {r['error']}"] + [""] * (6 + mfu)
        else:
            cells += [
                f"{r['step_s']:.3f}",
                f"{r['steps_per_s']:.2f}",
                f"{r['frames_per_s']:,.0f}",
                f"{r['flops'] / 1e9:,.1f}",
                f"{r['flops'] / best:.1%}",
            ]
            cells += [f"{r['mfu']:.1%}"] if mfu else []
            cells += [f"{r['mem_gb']:.2f}", f"{r['wait']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    device = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {cores} cores usable"
    )
    data = f"the shards in {args.data}" if args.data else "synthetic shards"
    n = 8192 if args.device == "cuda" else 2048
    mfu_note = f" MFU is against a nominal {args.peak_flops:.3g} FLOP/s per device." if mfu else ""
    title = "Training throughput" + (" on a GPU" if args.device == "cuda" else "")
    reading = READING_CUDA if args.device == "cuda" else READING_CPU
    return f"""## {title} (`tools/bench_train.py`)

{machine()}; {device}. `evav train` on {data}, bf16 (DeepSpeed bf16: fp32 master weights), AdamW,
clips of {args.clip_frames} frames at 64x64; each cell is one run of {warmup} untimed +
{steps} timed steps (median step time; {wall / 60:.1f} min for the table). frames/s counts every frame computed
on (padding included); achieved FLOP/s = `train_flops_per_frame` (matmuls + attention, forward
and backward) x frames/s. Matmul peak: a timed {n}x{n} matmul on {peak_threads} threads, at the
start (fp32 {peak["fp32"] / 1e9:,.0f} GFLOP/s, bf16 {peak["bf16"] / 1e9:,.0f} GFLOP/s) and in bf16
just before each cell (its column); "of peak" is against the highest bf16 figure,
{best / 1e9:,.0f} GFLOP/s.{mfu_note} Loader: {args.workers} worker(s) per process; "data wait" is
the median share of a step spent waiting for the next batch (`data/wait_frac`). {flash}

{chr(10).join(lines)}

{reading}"""


READING_CPU = """Reading: two processes share the same cores as one (each gets half the threads), so on CPU they
measure the cost of data parallelism and ZeRO partitioning (gradient reduction, parameter
gathering for ZeRO 3), not a speed-up. The small debug model is bound by per-step overhead
(DeepSpeed, gloo collectives, Python) more than by matmuls. The load and per-cell peak columns
show what other jobs left to each cell: on a machine shared with other work, a cell that ran
while the load was high is slower, and a process with several OpenMP threads suffers more from
busy cores than single-threaded processes do (every parallel region waits for its slowest
thread), so compare rows with similar load. (A run of this table at load 5-9 had the 1 x 2
cells 5-10x slower than 2 x 1; on an idle machine they are level or faster, as above.) On CPU
the optimizer is torch's AdamW (`engine.torch_adam`), which resumes bit for bit.
"""

READING_CUDA = """Reading: one GPU, so the ZeRO stages measure their own overhead (partitioning,
gathering for ZeRO 3) with nothing to gain from sharding. The clips are small (64 tokens a frame,
8 frames a clip), so the attention sequences are 64 (spatial) and 8 (temporal) long: at such
lengths the flash kernels are no faster than the math backend (at 256x256 they are, see the
note above), kernels are small, and per-step overhead weighs more than it would at real frame
sizes; MFU here is a floor, not what the model reaches on 256x256 frames. "data wait" near 0
says the loader (4 workers, PyAV) keeps the GPU fed at these step rates. The first cell's wall
time includes DeepSpeed's JIT build of its fused Adam (about 40 s, cached for the later cells).
"""


if __name__ == "__main__":
    main()
