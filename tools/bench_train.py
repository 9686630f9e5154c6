"""Benchmark `evav train`: step time, frames/s, tokens/s and achieved FLOP/s per model preset,
frame size, ZeRO stage and number of processes, against this machine's measured matmul peak;
and, with --variants, eager vs compiled and padded vs packed batches of one preset.

    python tools/bench_train.py          # CPU: debug and S, ZeRO 0-3, 1 and 2 processes
    python tools/bench_train.py --device cuda --presets B,L --sizes 64,128 --zero 0,2 --procs 1 \\
        --compile on --pad-to pack --mix real --clip-frames 16
    python tools/bench_train.py --variants   # debug (CPU) or B (GPU): eager/compiled x padded/packed

Every cell is a real training run (`python -m evav.cli train configs/debug.yaml
model.preset=P engine.zero_stage=Z ...`, through torchrun for several processes). Data: synthetic
shards (`--mix synthetic`, the grid's default) or a mix of real ones (`--mix real`, the variants'
default: FSDD spoken digits, SST-2 sentences and CIFAR-10 images from ../shared/datasets or
--datasets, --limit inputs of each training split (`evav preprocess --limit`: stratified by
class, seeded), equal mixing weights), rendered at
each --sizes frame size and built into --work (a temporary folder by default; kept and reused
when given), or --data. The first --warmup steps are not timed; the step time is the median of
the trainer's own ``speed/step_s`` over the remaining steps. A run is stopped (its process group
killed) as soon as it has logged the steps the bench needs, so the checkpoint the trainer always
writes at its last step costs nothing.

- frames/s counts every frame the model computes on (padding included), which is what the FLOP
  count is per; "real frames/s" and tokens/s count only the clips' own frames (the trainer's
  ``speed/frames_per_s`` and ``speed/tokens_per_s``); "useful" is real / computed frames over
  the run (``data/useful_frac``). Both frames/s figures are totals over the timed steps, without
  the steps that took over 3x the median (a recompile, see "slow steps").
- achieved FLOP/s = ``evav.model.train_flops_per_frame`` x frames/s (matmuls and attention,
  forward + backward; norms, softmax, the loss and the optimizer are not counted). MFU is the
  trainer's ``speed/mfu``: real frames only, against the GPU's nominal bf16 peak
  (``evav.model.flops.PEAK_BF16``) or --peak-flops.
- peak: a timed large matmul in this process, on as many threads as the runs use in all (on CPU
  each of N processes gets cores/N threads, or --threads): fp32 and bf16 at the start, and bf16
  again just before each cell (its column shows what other jobs on a shared machine left to the
  cell). "of peak" is against the highest bf16 figure measured.
- torch.compile (``compile=true``): the first step compiles the blocks; a batch of a new shape
  (packed batches have a varying number of rows) can recompile later. "first step s" and "slow
  steps" (count, and their time beyond the median) show it. Compiled kernels are cached in
  WORK/inductor (TORCHINDUCTOR_CACHE_DIR, unless set), shared by the cells of one --work.

--budget caps the whole bench's wall time: each cell gets what is left (at most --timeout), a cell
cut short keeps its figures if it has two timed steps, and cells with too little time left are
listed as skipped. The machine may be shared: the 1-minute load average before each cell is in
the table. Writes the section ``train`` (``train-cuda`` on a GPU; with --variants
``train-variants`` or ``train-variants-cuda``; --section overrides) of docs/benchmarks.md
(tools.benchlib.write_section) only with --write.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
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
DATASETS = REPO.parent / "shared" / "datasets"
# the real mix: (builder, its folder under --datasets); see ../shared/datasets/README.md
REAL_MIX = (("fsdd", "fsdd"), ("sst2", "sst2"), ("cifar10", "cifar10"))
# the --variants rows: (name, compile, data.pad_to); the first is the reference of the ratios
VARIANTS = (
    ("eager + padded", False, "longest"),
    ("eager + packed", False, "pack"),
    ("compiled + padded", True, "longest"),
    ("compiled + packed", True, "pack"),
)
SLOW = 3.0  # a step over SLOW x the median is a "slow step" (a compile or recompile)
MIN_CELL_S = 20.0  # under --budget, a cell with less time left is skipped


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


# -- data -----------------------------------------------------------------------------------


def _preprocess(builder: str, out: Path, args: list[str]) -> subprocess.Popen | None:
    """Start ``evav preprocess BUILDER --out OUT ...`` (None when OUT is already built)."""
    if (out / "manifest.json").exists():
        return None
    cmd = [sys.executable, "-m", "evav.cli", "preprocess", builder, "--out", str(out), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_built(jobs: dict[str, subprocess.Popen | None]) -> None:
    for name, job in jobs.items():
        if job is None:
            continue
        out = job.communicate()[0].decode(errors="replace")
        if job.returncode != 0:
            sys.exit(f"bench_train: building the {name} shards failed:\n{out[-3000:]}")


def render_args(size: int) -> list[str]:
    return [f"render.height={size}", f"render.width={size}"]


def build_data(root: Path, size: int = 64) -> Path:
    """Synthetic shards (every modality pair, a few clips per task) at ``size`` x ``size``."""
    out = root / f"synthetic-{size}"
    job = _preprocess("synthetic", out, ["train_per_task=24", "val_per_task=2", *render_args(size)])
    _wait_built({"synthetic": job})
    return out


def build_real_mix(root: Path, datasets: Path, size: int, limit: int) -> list[Path]:
    """FSDD, SST-2 and CIFAR-10 shards (the first ``limit`` inputs of each split) at ``size``,
    the three builds at once."""
    outs = {b: root / f"real-{size}-{limit}" / b for b, _ in REAL_MIX}
    workers = str(max(1, len(os.sched_getaffinity(0)) // len(REAL_MIX)))
    jobs = {
        b: _preprocess(
            b,
            outs[b],
            ["--src", str(datasets / src), "--limit", str(limit), "--workers", workers]
            + render_args(size),
        )
        for b, src in REAL_MIX
    }
    _wait_built(jobs)
    return list(outs.values())


def mix_summary(dirs: list[Path]) -> str:
    """'fsdd 300 clips (4.0 frames on average), ...' from the manifests' training splits."""
    parts = []
    for d in dirs:
        try:
            m = json.loads((d / "manifest.json").read_text())
            split = m["splits"]["train"]
            parts.append(
                f"{m.get('builder', d.name)} {split['samples']} clips "
                f"({split['frames'] / max(1, split['samples']):.1f} frames on average, uncropped)"
            )
        except (OSError, KeyError, ValueError, TypeError):
            parts.append(d.name)
    return ", ".join(parts)


def train_data(args, work: Path, size: int) -> tuple[list[Path], str]:
    """The shards of one frame size and a phrase saying what they are."""
    if args.data:
        return list(args.data), "the shards in " + ", ".join(str(d) for d in args.data)
    if args.mix == "real":
        dirs = build_real_mix(work / "data", args.datasets, size, args.limit)
        return dirs, (
            f"a real mix with equal weights ({mix_summary(dirs)}; the first {args.limit} "
            f"inputs of each training split of {args.datasets})"
        )
    return [build_data(work / "data", size)], "synthetic shards"


# -- one run --------------------------------------------------------------------------------


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (the trainer, torchrun's ranks, loader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _logged_steps(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_bytes().count(b'"speed/step_s"')
    except OSError:
        return 0


def run_cell(
    data: Path | list[Path],
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
    size: int = 64,
    pad_to: str = "clip_frames",
    compile: bool | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """One training run of ``steps`` logged steps, stopped once they are logged; returns the
    trainer's per-step records (``records``), and ``error`` when it failed or was cut short."""
    dirs = data if isinstance(data, list) else [data]
    train = [
        "-m",
        "evav.cli",
        "train",
        "configs/debug.yaml",
        "data.train=[" + ",".join(str(d) for d in dirs) + "]",
        f"run_dir={run_dir}",
        f"model.preset={preset}",
        f"model.height={size}",
        f"model.width={size}",
        f"engine.zero_stage={zero}",
        f"micro_batch={micro_batch}",
        f"data.clip_frames={clip_frames}",
        f"data.pad_to={pad_to}",
        f"data.num_workers={workers}",
        f"steps={steps + 1}",  # stopped after `steps`: the last step's checkpoint never starts
        "log_every=1",
        "val_every=0",
        "ckpt_every=0",
        "keep_last=1",
        "optim.warmup_steps=1",
        "metrics.enabled=false",
        "metrics.image_every=0",
        *([f"compile={str(compile).lower()}"] if compile is not None else []),
        *extra,
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
    log = run_dir.with_suffix(".log")
    shutil.rmtree(run_dir, ignore_errors=True)  # a reused --work: no old records, no resume
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        while proc.poll() is None and _logged_steps(run_dir) < steps:
            if time.perf_counter() - t0 > timeout_s:
                break
            time.sleep(0.2)
        finished = proc.poll() is not None
        _kill(proc)
    records = [r for r in read_metrics(run_dir) if "speed/step_s" in r][:steps]
    res = {"records": records}
    if len(records) >= steps:
        return res
    if finished:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        res["error"] = f"exit {proc.returncode}, {len(records)}/{steps} steps"
    else:
        res["error"] = f"cut at {timeout_s:.0f} s after {len(records)}/{steps} steps"
    return res


def summarise(res: dict, warmup: int, flops_frame: float, tokens_per_frame: int) -> dict:
    """A run's figures from its records (see the module's docstring), or its error."""
    recs = res["records"]
    out = {"error": res["error"]} if "error" in res else {}
    if len(recs) < warmup + 2:  # fewer than 2 timed steps: nothing to report
        out.setdefault("error", "no timed steps")
        return out
    step = [r["speed/step_s"] for r in recs]
    real = [r["speed/frames_per_s"] * r["speed/step_s"] for r in recs]  # frames of each step
    computed = [f / max(r.get("data/useful_frac", 1.0), 1e-9) for f, r in zip(real, recs)]
    timed = range(warmup, len(recs))
    median = statistics.median(step[i] for i in timed)
    kept = [i for i in timed if step[i] <= SLOW * median]
    seconds = sum(step[i] for i in kept)
    slow = [t for t in step[1:] if t > SLOW * median]
    real_fps = sum(real[i] for i in kept) / seconds
    fps = sum(computed[i] for i in kept) / seconds
    mfu = [r["speed/mfu"] / r["speed/frames_per_s"] for r in recs if r.get("speed/mfu")]
    out.update(
        step_s=median,
        timed_steps=len(timed),
        first_s=step[0],
        slow=len(slow),
        slow_excess_s=sum(t - median for t in slow),
        frames_per_s=fps,
        real_fps=real_fps,
        tokens_per_s=real_fps * tokens_per_frame,
        useful=sum(real) / sum(computed),
        flops=fps * flops_frame,
        mem_gb=max(r.get("mem/peak_gb", 0.0) for r in recs),
        wait=statistics.median(recs[i].get("data/wait_frac", 0.0) for i in timed),
    )
    if mfu:
        out["mfu"] = real_fps * mfu[0]
    return out


class Budget:
    """The seconds left to the bench (--budget; 0: unlimited), each cell's at most --timeout."""

    def __init__(self, seconds: float, per_cell: float):
        self.end = time.monotonic() + seconds if seconds > 0 else None
        self.per_cell = per_cell

    def cell_timeout(self) -> float | None:
        """The next cell's timeout, or None when too little is left to start it."""
        if self.end is None:
            return self.per_cell
        left = self.end - time.monotonic()
        return min(self.per_cell, left) if left >= MIN_CELL_S else None


def model_info(preset: str, size: int, clip_frames: int) -> tuple[float, int, int]:
    """(parameters in millions, training FLOPs per frame, tokens per frame)."""
    cfg = ModelConfig(preset=preset, height=size, width=size)
    params_m = sum(p.numel() for p in build_model(cfg).parameters()) / 1e6
    r = cfg.resolved()
    tokens = (r.height // r.patch_size) * (r.width // r.patch_size)
    return params_m, train_flops_per_frame(r, clip_frames), tokens


# -- the grid: presets x sizes x processes x ZeRO stages ----------------------------------------


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


def measure(row, args, ctx, data, run_dir, peak_threads, flops_frame, tokens, **cell) -> None:
    """Fill ``row`` with one cell: the bf16 matmul peak just before it, then its training run
    (``run_cell`` with ``cell``'s settings, unless the --budget is spent) summarised; printed."""
    row["peak"] = matmul_peak(torch.bfloat16, args.device, peak_threads, ctx["cell_peak_s"])
    timeout = ctx["budget"].cell_timeout()
    t0 = time.perf_counter()
    if timeout is None:
        row["error"] = "skipped: over the --budget"
    else:
        res = run_cell(
            data,
            run_dir,
            cell["preset"],
            cell["zero"],
            cell["procs"],
            cell["threads"],
            cell["micro_batch"],
            args.clip_frames,
            args.warmup + args.steps,
            args.device,
            timeout,
            args.workers,
            cell["size"],
            cell["pad_to"],
            cell["compile"],
            ctx["extra"],
        )
        row.update(summarise(res, args.warmup, flops_frame, tokens))
    row["wall_s"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)


def run_grid(args, ctx: dict, work: Path) -> tuple[list[dict], str]:
    rows, data_note = [], ""
    for size in args.sizes:
        data, data_note = train_data(args, work, size)
        for preset in args.presets:
            params_m, flops_frame, tokens = model_info(preset, size, args.clip_frames)
            mb = args.micro_batch or MICRO_BATCH.get(preset, 4)
            for procs in args.procs:
                threads = args.threads or max(1, ctx["cores"] // procs)
                for zero in args.zero:
                    row = {
                        "preset": preset,
                        "params_m": params_m,
                        "size": size,
                        "zero": zero,
                        "procs": procs,
                        "threads": threads,
                        "micro_batch": mb,
                        "load": os.getloadavg()[0],
                    }
                    run_dir = work / "runs" / f"{preset}-{size}-z{zero}-p{procs}"
                    cell = dict(preset=preset, zero=zero, procs=procs, threads=threads)
                    cell.update(micro_batch=mb, size=size, pad_to=args.pad_to)
                    measure(row, args, ctx, data, run_dir, ctx["peak_threads"], flops_frame,
                            tokens, compile=args.compile, **cell)  # fmt: skip
                    rows.append(row)
    return rows, data_note


def _failed(r: dict) -> str:
    return r["error"] if r["error"].startswith("skipped") else f"failed: {r['error']}"


def _fmt_slow(r: dict) -> str:
    return f"{r['slow']} ({r['slow_excess_s']:.1f} s)" if r["slow"] else "0"


def grid_section(rows, args, ctx, data_note) -> str:
    mfu = any("mfu" in r for r in rows)
    head = (
        "| preset | params | size | ZeRO | procs x threads | clips/proc | load (1 min) "
        "| bf16 peak GFLOP/s | step s | first step s | slow steps | frames/s | real frames/s "
        "| tokens/s | useful | achieved GFLOP/s | of peak |"
        + (" MFU |" if mfu else "")
        + " peak mem GB | data wait |"
    )
    sep = "|---" * (head.count("|") - 1) + "|"
    lines = [head, sep]
    peak = ctx["peak"]
    best = max([peak["bf16"]] + [r["peak"] for r in rows])
    for r in rows:
        cells = [
            r["preset"],
            f"{r['params_m']:.1f}M",
            f"{r['size']}x{r['size']}",
            str(r["zero"]),
            f"{r['procs']} x {r['threads']}",
            str(r["micro_batch"]),
            f"{r['load']:.1f}",
            f"{r['peak'] / 1e9:,.0f}",
        ]
        if "step_s" not in r:
            cells += [_failed(r)] + [""] * (10 + mfu)
        else:
            cut = f" ({r['error']})" if "error" in r else ""
            cells += [
                f"{r['step_s']:.3f}{cut}",
                f"{r['first_s']:.1f}",
                _fmt_slow(r),
                f"{r['frames_per_s']:,.0f}",
                f"{r['real_fps']:,.0f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['useful']:.1%}",
                f"{r['flops'] / 1e9:,.1f}",
                f"{r['flops'] / best:.1%}",
            ]
            cells += [f"{r['mfu']:.1%}" if "mfu" in r else ""] if mfu else []
            cells += [f"{r['mem_gb']:.2f}", f"{r['wait']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    cuda = args.device == "cuda"
    n = 8192 if cuda else 2048
    mfu_note = (
        " MFU: the trainer's `speed/mfu` (real frames only), against "
        + (f"{args.peak_flops:.3g} FLOP/s" if args.peak_flops else "the GPU's nominal bf16 peak")
        + " per device."
        if mfu
        else ""
    )
    title = "Training throughput" + (" on a GPU" if cuda else "")
    reading = READING_CUDA if cuda else READING_CPU
    sizes = ", ".join(f"{s}x{s}" for s in args.sizes)
    return f"""## {title} (`tools/bench_train.py`)

{machine()}; {ctx["device_name"]}. Command: `{ctx["command"]}`. `evav train` on {data_note},
bf16 (DeepSpeed bf16: fp32 master weights), AdamW, clips of up to {args.clip_frames} frames at
{sizes}, `data.pad_to={args.pad_to}`, `compile={ctx["compile_word"]}`; each cell is one run of
{args.warmup} untimed + {args.steps} timed steps (median step time; {ctx["wall"] / 60:.1f} min
for the table). frames/s counts every frame computed on (padding included), real frames/s and
tokens/s the clips' own; useful = real / computed frames (`data/useful_frac`); achieved FLOP/s =
`train_flops_per_frame` (matmuls + attention, forward and backward) x frames/s. "first step s"
includes compiling (with `compile=true`), "slow steps" are steps over {SLOW:g}x the median
(recompiles), left out of the frames/s figures. Matmul peak: a timed {n}x{n} matmul on
{ctx["peak_threads"]} threads, at the start (fp32 {peak["fp32"] / 1e9:,.0f} GFLOP/s, bf16
{peak["bf16"] / 1e9:,.0f} GFLOP/s) and in bf16 just before each cell (its column); "of peak" is
against the highest bf16 figure, {best / 1e9:,.0f} GFLOP/s.{mfu_note} Loader: {args.workers}
worker(s) per process; "data wait" is the median share of a step spent waiting for the next
batch (`data/wait_frac`). {ctx["flash"]}

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
gathering for ZeRO 3) with nothing to gain from sharding. At 64x64 a frame is 64 tokens and at
128x128 256 (patch 8), so spatial attention runs over 64 or 256 tokens and temporal attention
over at most clip_frames frames: kernels are small, and per-step overhead weighs more than it
would at 256x256; MFU here is a floor. MFU counts real frames only, so padding lowers it and
packing raises it. "data wait" near 0 says the loader keeps the GPU fed at these step rates.
The first cell's wall time includes DeepSpeed's JIT build of its fused Adam (cached for the
later cells), and the first cell of each preset and size compiles its blocks cold (the compiled
kernels are cached for the other ZeRO stage).
"""


# -- variants: eager/compiled x padded/packed, one preset ---------------------------------------


def run_variants(args, ctx: dict, work: Path) -> tuple[list[dict], dict]:
    preset, size, zero = args.presets[0], args.sizes[0], args.zero[0]
    mb = args.micro_batch or MICRO_BATCH.get(preset, 4)
    threads = args.threads or ctx["cores"]
    data, data_note = train_data(args, work, size)
    params_m, flops_frame, tokens = model_info(preset, size, args.clip_frames)
    load_before = os.getloadavg()
    rows = []
    for name, compile, pad_to in VARIANTS:
        row = {"variant": name, "compile": compile, "pad_to": pad_to, "load": os.getloadavg()[0]}
        run_dir = work / "runs" / f"variant-{preset}-{size}-{'c' if compile else 'e'}-{pad_to}"
        cell = dict(preset=preset, zero=zero, procs=1, threads=threads, micro_batch=mb)
        measure(row, args, ctx, data, run_dir, threads, flops_frame, tokens,
                size=size, pad_to=pad_to, compile=compile, **cell)  # fmt: skip
        rows.append(row)
    info = dict(
        preset=preset,
        params_m=params_m,
        size=size,
        zero=zero,
        threads=threads,
        micro_batch=mb,
        data_note=data_note,
        load_before=load_before,
        load_after=os.getloadavg(),
    )
    return rows, info


def _ratio(r: dict, ref: dict, key: str) -> str:
    if key not in r or key not in ref:
        return ""
    return f"{r[key] / ref[key]:.2f}x"


def variants_section(rows, args, ctx, info) -> str:
    mfu = any("mfu" in r for r in rows)
    head = (
        "| variant | `compile` | `data.pad_to` | load (1 min) | bf16 peak GFLOP/s | step s "
        "| vs eager + padded "
        "| real frames/s | vs eager + padded | tokens/s | useful |"
        + (" MFU |" if mfu else "")
        + " first step s | slow steps | peak mem GB | data wait |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    ref = rows[0]
    for r in rows:
        cells = [r["variant"], str(r["compile"]).lower(), r["pad_to"], f"{r['load']:.1f}"]
        cells += [f"{r['peak'] / 1e9:,.0f}"]
        if "step_s" not in r:
            cells += [_failed(r)] + [""] * (9 + mfu)
        else:
            cut = f" ({r['error']})" if "error" in r else ""
            cells += [
                f"{r['step_s']:.3f}{cut}",
                _ratio(ref, r, "step_s"),  # > 1: this row's step is shorter
                f"{r['real_fps']:,.0f}",
                _ratio(r, ref, "real_fps"),
                f"{r['tokens_per_s']:,.0f}",
                f"{r['useful']:.1%}",
            ]
            cells += [f"{r['mfu']:.1%}" if "mfu" in r else ""] if mfu else []
            cells += [f"{r['first_s']:.1f}", _fmt_slow(r), f"{r['mem_gb']:.2f}", f"{r['wait']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    by = {(r["compile"], r["pad_to"]): r for r in rows}
    compile_notes = []
    for pad_to in ("longest", "pack"):
        e, c = by.get((False, pad_to), {}), by.get((True, pad_to), {})
        if "first_s" in e and "first_s" in c:
            compile_notes.append(
                f"{c['first_s'] - e['first_s']:.1f} s with `pad_to={pad_to}` "
                f"(first step {c['first_s']:.1f} s compiled, {e['first_s']:.1f} s eager)"
            )
    compile_note = (
        "Compile time (the compiled row's first step minus the eager row's, same layout; the "
        f"kernel cache WORK/inductor started empty unless reused): {'; '.join(compile_notes)}."
        if compile_notes
        else ""
    )
    useful = {
        p: by[(False, p)]["useful"] for p in ("longest", "pack") if "useful" in by[(False, p)]
    }
    useful_note = (
        f"Useful frames (real / computed, `data/useful_frac`): {useful['longest']:.1%} padded "
        f"(`longest`), {useful['pack']:.1%} packed."
        if len(useful) == 2
        else ""
    )
    lb, la = info["load_before"], info["load_after"]
    device = (
        f"{ctx['device_name']}, {info['threads']} thread(s)"
        if args.device == "cpu"
        else ctx["device_name"]
    )
    cpu_note = (
        "On a CPU shared with other work, the load and the bf16 matmul peak measured just "
        "before each row show what the row had: compare rows that had alike. (The trainer "
        "compiles by default on a GPU only; the GPU rows are what `compile` is for.)\n"
        if args.device == "cpu"
        else ""
    )
    where = " on a GPU" if args.device == "cuda" else ""
    return f"""## Training variants{where}: eager vs compiled, padded vs packed (`tools/bench_train.py --variants`)

{machine()}; {device}. Load average (1, 5, 15 min): {lb[0]:.2f}, {lb[1]:.2f}, {lb[2]:.2f} before,
{la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f} after. Command: `{ctx["command"]}`.

Config: preset {info["preset"]} ({info["params_m"]:.1f}M parameters) at {info["size"]}x{info["size"]},
ZeRO {info["zero"]}, bf16, 1 process, {info["micro_batch"]} clips per step
(`micro_batch`), `data.clip_frames={args.clip_frames}` (rows of {args.clip_frames} frames when
packed; padded rows are as long as the batch's longest clip), {args.workers} loader worker(s).
Data: {info["data_note"]}. Each row is one `evav train` run of {args.warmup} untimed +
{args.steps} timed steps, the four in one bench run ({ctx["wall"] / 60:.1f} min), so the ratios
are comparable.

{chr(10).join(lines)}

{useful_note} {compile_note}

Reading: every row trains on the same clips (the same {info["micro_batch"]} per step), so real
frames/s is the figure to compare; "vs eager + padded" is the row's step-time speed-up (the
reference's step time / the row's) and its real frames/s over the reference's (above 1: faster).
Padded (`longest`) rows compute on every padded frame; packed rows put several clips in a row of
`clip_frames` frames with a block-causal temporal mask, so a step computes fewer frames for the
same real ones. Compiled rows fuse each block's norms, rotary and MLP (`torch.compile`); a
padded batch's length (its longest clip) and a packed batch's number of rows vary from step to
step, so both can recompile (slow steps, left out of frames/s; the step time is the median).
{cpu_note}"""


# -- main -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--variants",
        action="store_true",
        help="eager/compiled x padded/packed rows for the first preset, size and ZeRO stage",
    )
    ap.add_argument(
        "--presets",
        help="comma-separated (default: debug,S on cpu, B,L on cuda; --variants: debug or B)",
    )
    ap.add_argument("--sizes", default="64", help="frame sizes (height = width), comma-separated")
    ap.add_argument("--zero", default="0,1,2,3", help="ZeRO stages, comma-separated")
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--threads", type=int, help="threads per process (default: cores / procs)")
    ap.add_argument(
        "--micro-batch", type=int, help="clips per process per step (default: per preset)"
    )
    ap.add_argument("--clip-frames", type=int, help="data.clip_frames (default 8; --variants 16)")
    ap.add_argument(
        "--pad-to",
        choices=["longest", "clip_frames", "pack"],
        default="clip_frames",
        help="data.pad_to of the grid's cells (--variants sets its own)",
    )
    ap.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="compile= of the grid's cells (auto: the trainer's default; --variants sets its own)",
    )
    ap.add_argument(
        "--workers", type=int, help="loader workers per process (default 0 cpu, 4 cuda)"
    )
    ap.add_argument("--steps", type=int, help="timed steps (default 3 on cpu, 30 on cuda)")
    ap.add_argument("--warmup", type=int, help="untimed first steps (default 2 on cpu, 10 on cuda)")
    ap.add_argument(
        "--peak-flops",
        type=float,
        default=0.0,
        help="nominal peak FLOP/s per device for MFU (default: the trainer's, known GPUs)",
    )
    ap.add_argument(
        "--mix",
        choices=["synthetic", "real"],
        help="shards to build (default: synthetic; --variants: real)",
    )
    ap.add_argument("--datasets", type=Path, default=DATASETS, help="raw datasets for --mix real")
    ap.add_argument(
        "--limit", type=int, default=300, help="--mix real: inputs per dataset and split"
    )
    ap.add_argument("--data", type=Path, nargs="+", help="shards to train on instead (one size)")
    ap.add_argument(
        "--work",
        type=Path,
        help="folder for shards, runs and compiled kernels (default: a temp one)",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per cell at most")
    ap.add_argument(
        "--budget", type=float, default=0.0, help="seconds for the whole bench (0: no cap)"
    )
    ap.add_argument(
        "--no-flash-check", action="store_true", help="cuda: skip the flash-kernel check"
    )
    ap.add_argument("--section", help="the docs/benchmarks.md section to write")
    ap.add_argument(
        "--write",
        action="store_true",
        help="write its section of docs/benchmarks.md (default: print only)",
    )
    args = ap.parse_args()
    command = "python tools/bench_train.py " + shlex.join(sys.argv[1:])
    budget = Budget(args.budget, args.timeout)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train: --device cuda but torch sees no GPU")
    cuda = args.device == "cuda"
    default_presets = (
        ("B" if cuda else "debug") if args.variants else ("B,L" if cuda else "debug,S")
    )
    args.presets = (args.presets or default_presets).split(",")
    args.sizes, args.zero, args.procs = _ints(args.sizes), _ints(args.zero), _ints(args.procs)
    args.steps = args.steps or (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.workers = args.workers if args.workers is not None else (4 if cuda else 0)
    args.clip_frames = args.clip_frames or (16 if args.variants else 8)
    args.mix = args.mix or ("real" if args.variants else "synthetic")
    if args.mix == "real" and not args.data and not args.datasets.is_dir():
        print(
            f"bench_train: {args.datasets} is absent: training on synthetic shards instead of "
            "the real mix (FSDD, SST-2, CIFAR-10)",
            file=sys.stderr,
        )
        args.mix = "synthetic"
    args.compile = {"auto": None, "on": True, "off": False}[args.compile]
    cores = len(os.sched_getaffinity(0))
    start = time.time()
    procs = [1] if args.variants else args.procs
    if cuda and max(procs) > torch.cuda.device_count():
        sys.exit(f"bench_train: {max(procs)} processes but {torch.cuda.device_count()} GPU(s)")

    peak_threads = cores if not cuda else torch.get_num_threads()
    if not cuda and args.threads:
        peak_threads = args.threads * max(procs)
    peak = {
        name: matmul_peak(dt, args.device, peak_threads, 1.0 if cuda else 2.0)
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"matmul peak on {peak_threads} threads: fp32 {peak['fp32'] / 1e9:,.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:,.0f} GFLOP/s",
        flush=True,
    )

    flash = ""
    if cuda and not args.variants and not args.no_flash_check:
        # at the bench's frame size, and at 256x256 (1,024 tokens a frame)
        mb = args.micro_batch or MICRO_BATCH.get(args.presets[0], 4)
        flash = " ".join(
            [
                flash_check(args.presets[0], mb, args.clip_frames, args.sizes[0]),
                flash_check(args.presets[0], max(1, mb // 16), args.clip_frames, 256),
            ]
        )
        print(flash, flush=True)
    ctx = dict(
        cores=cores,
        peak=peak,
        peak_threads=peak_threads,
        cell_peak_s=0.5 if cuda else 1.5,
        budget=budget,
        flash=flash,
        command=command,
        compile_word={None: "default", True: "true", False: "false"}[args.compile],
        device_name=torch.cuda.get_device_name(0) if cuda else f"CPU, {cores} cores usable",
        extra=(f"peak_flops={args.peak_flops}",) if args.peak_flops else (),
    )
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = args.work or Path(tmp)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work.resolve() / "inductor"))
        if args.variants:
            rows, info = run_variants(args, ctx, work)
        else:
            rows, data_note = run_grid(args, ctx, work)
    ctx["wall"] = time.time() - start
    if args.variants:
        md = variants_section(rows, args, ctx, info)
    else:
        md = grid_section(rows, args, ctx, data_note)
    print(md)
    if args.write:
        default = ("train-variants" if args.variants else "train") + ("-cuda" if cuda else "")
        write_section(args.section or default, md)


if __name__ == "__main__":
    main()
