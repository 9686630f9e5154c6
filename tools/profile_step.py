"""Profile one training step of a model preset on the CPU: where its time goes, by phase and by kind
of operator (matmul, attention, norms, reshapes and copies, elementwise, loss, optimizer, data).

    .venv/bin/python tools/profile_step.py                          # preset B, eager, fp32: prints
    .venv/bin/python tools/profile_step.py --write --label before   # and writes its section
    .venv/bin/python tools/profile_step.py --compile                # each Block torch.compile'd
    .venv/bin/python tools/profile_step.py --precision bf16 --micro-batch 4

The step is the trainer's (evav/train.py) without DeepSpeed: on the CPU at ZeRO 0 in fp32,
DeepSpeed runs the plain torch module and torch's AdamW (``engine.torch_adam``), so the step
here is the same work without the engine's bookkeeping:

- data: the next batch from the real loader (``evav.data.Loader``, 0 workers, PyAV, padded to
  ``clip_frames``) on synthetic shards built into a temporary folder (``evav preprocess
  synthetic``, as tools/bench_train.py), then ``.float().div_(255)``;
- forward: ``build_model(ModelConfig(preset=...))`` on the batch (with --precision bf16 under
  ``torch.autocast("cpu", torch.bfloat16)``, as the trainer);
- loss: ``next_frame_loss_sums`` (L1 + 1 - MS-SSIM) with the batch's loss_mask, pad_mask and
  task_id, divided by the scored frames;
- backward: ``total.backward()``;
- optimizer: the global gradient norm and clipping at ``optim.grad_clip`` (1.0), torch's AdamW
  with evav's defaults (lr 3e-4, betas (0.9, 0.95), weight decay 0.05 on matrices only, as
  ``evav.distributed.decay_split``), the warmup-cosine schedule, ``zero_grad``.

--warmup steps (default 1; with --compile, the compilation) are taken untimed, then --steps
(default 2) are timed without the profiler (their median is "step s"), then --profile-steps
(default 2; the table is their mean) under ``torch.profiler`` (CPU activity, ``record_shapes``
off), each phase in a ``record_function`` region of its name.
The operators' self CPU time is bucketed by region first: everything in the data, loss and
optimizer regions counts for that phase, and the backward operators of the loss's autograd
nodes (found through the profiler's sequence numbers) count for the loss too, MS-SSIM's conv2d
blurs included. The forward and backward operators of the model are bucketed by kind: an
operator inside an attention or RMSNorm call (or a backward operator of an autograd node whose
forward was one) is attention or norm; otherwise mm/addmm/bmm/matmul are matmul, convolutions
conv, views/permutes/copies/cat/stack and allocations reshapes and copies, other aten operators
elementwise and reductions, and the rest (autograd's own nodes) autograd. What a region's wall
time has beyond its operators' self times is Python and framework overhead (with --compile,
Inductor's fused C++ kernels too, unless the profiler names them: they are then "compiled
kernels"). Frames are 64x64, clips of 8 frames; the micro batch is --micro-batch clips (default
2: preset B's 32 clips of tools/bench_train.py take minutes per step on two cores).

The machine may be shared: the load average before and after is in the output, with a timed
2048x2048 matmul on the same threads before and after the run (the higher of the two is the peak
the matmuls compare with). Prints
the table and the 15 operators with the most self CPU time; --write also writes the section
``profile-<label>`` of docs/benchmarks.md (tools.benchlib.write_section). Exit 2 when
torch.compile fails (--compile), with the error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import evav.model  # noqa: E402
from evav.data import DataConfig, Loader  # noqa: E402
from evav.distributed import OptimConfig, decay_split, lr_lambda  # noqa: E402
from evav.model import (  # noqa: E402
    ModelConfig,
    build_model,
    next_frame_loss_sums,
    num_params,
    train_flops_per_frame,
)
from evav.model.blocks import Block  # noqa: E402
from tools.bench_train import MICRO_BATCH, build_data, matmul_peak  # noqa: E402
from tools.benchlib import machine, write_section  # noqa: E402

REGIONS = ("data", "forward", "loss", "backward", "optimizer")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
RESHAPE = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::_unsafe_view",
    "aten::permute",
    "aten::transpose",
    "aten::t",
    "aten::contiguous",
    "aten::clone",
    "aten::copy_",
    "aten::_to_copy",
    "aten::to",
    "aten::cat",
    "aten::stack",
    "aten::flatten",
    "aten::unflatten",
    "aten::expand",
    "aten::expand_as",
    "aten::as_strided",
    "aten::select",
    "aten::slice",
    "aten::narrow",
    "aten::split",
    "aten::split_with_sizes",
    "aten::chunk",
    "aten::unbind",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::alias",
    "aten::detach",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::zeros",
    "aten::zeros_like",
    "aten::new_zeros",
    "aten::fill_",
    "aten::zero_",
    "aten::resize_",
    "aten::index_select",
    "aten::select_backward",
    "aten::slice_backward",
}
# bucket -> row label of the table, in order
BUCKETS = {
    "matmul": "matmul (mm, addmm, bmm: the linear layers)",
    "attention": "attention (scaled_dot_product_attention, fwd + bwd kernels)",
    "norm": "norms (RMSNorm)",
    "reshape": "reshapes, copies, allocations",
    "elementwise": "elementwise and reductions (GELU, rotary, residual adds, ...)",
    "conv": "conv (outside the loss)",
    "compiled": "compiled code (Inductor's fused kernels and graph wrappers)",
    "autograd": "autograd nodes and gradient accumulation",
    "overhead": "not in an operator (Python, framework)",
    "loss": "loss (L1 + MS-SSIM, its conv2d blurs; fwd + bwd)",
    "optimizer": "optimizer (grad norm, clip, AdamW, schedule, zero_grad)",
    "data": "data (loader batch, uint8 -> float)",
}
EVAL_PREFIX = "autograd::engine::evaluate_function: "
COMPILED = ("Torch-Compiled Region", "CompiledFunction")  # torch.compile's own events


def op_kind(chain: list[str]) -> str:
    """Kind of an operator from its name and its ancestors' (innermost first)."""
    for n in chain:
        low = n.lower()
        if "scaled_dot_product" in low or "scaleddotproduct" in low or "attention" in low:
            return "attention"
        if "rms_norm" in low or "rmsnorm" in low:
            return "norm"
    name = chain[0]
    low = name.lower()
    if "cpp_fused" in low or "compiledfxgraph" in low or name.startswith(COMPILED):
        return "compiled"
    if name in MATMUL:
        return "matmul"
    if "conv" in low and name.startswith("aten::"):
        return "conv"
    if name in RESHAPE:
        return "reshape"
    if name.startswith("aten::"):
        return "elementwise"
    return "autograd"


def synthetic_loader(root: Path, micro_batch: int, clip_frames: int) -> Loader:
    """The real loader (0 workers, as tools/bench_loader.py builds it) on synthetic shards."""
    cfg = DataConfig(
        train=[str(build_data(root))],
        clip_frames=clip_frames,
        pad_to="clip_frames",
        num_workers=0,
    )
    return Loader(cfg, batch_size=micro_batch, seed=0)


class Step:
    """One training step as evav/train.py takes it at ZeRO 0, without DeepSpeed."""

    def __init__(self, model, batches, num_tasks: int, precision: str, steps: int):
        self.model, self.batches, self.num_tasks = model, batches, num_tasks
        self.amp = precision == "bf16"
        self.optim_cfg = OptimConfig()
        decay, no_decay = decay_split([(p, tuple(p.shape)) for p in model.parameters()])
        o = self.optim_cfg
        self.opt = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=o.betas,
            eps=1e-8,
            weight_decay=o.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(o, steps))

    def __call__(self) -> float:
        with record_function("data"):
            batch = next(self.batches)
            frames_BTHWC = batch["frames"].float().div_(255)
        with record_function("forward"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp):
                pred = self.model(frames_BTHWC)
        with record_function("loss"):
            out = next_frame_loss_sums(
                pred,
                frames_BTHWC,
                batch["loss_mask"],
                batch["pad_mask"],
                batch["task_id"],
                self.num_tasks,
            )
            total = out.total / out.count.clamp(min=1)
        with record_function("backward"):
            total.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        return float(total.detach())


def buckets(events, steps: int) -> tuple[dict, dict]:
    """``({bucket: [forward ms, backward ms]}, {region: wall ms})`` per step, from the events."""
    regions = [e for e in events if e.name in REGIONS and e.is_user_annotation]
    wall = defaultdict(float)
    for r in regions:
        wall[r.name] += (r.time_range.end - r.time_range.start) / 1e3 / steps
    spans = sorted((r.time_range.start, r.time_range.end, r.name) for r in regions)

    def region_of(e) -> str | None:
        t = e.time_range.start
        for start, end, name in spans:
            if start <= t < end:
                return name
        return None

    def chain(e) -> list:
        out = []
        while e is not None and not (e.name in REGIONS and e.is_user_annotation):
            out.append(e)
            e = e.cpu_parent
        return out

    ops = [e for e in events if not (e.name in REGIONS and e.is_user_annotation)]
    where = {id(e): region_of(e) for e in ops}
    fwd = {}  # sequence number of an autograd node -> (region, kind) of the op that made it
    for e in ops:
        if where[id(e)] in ("forward", "loss") and e.sequence_nr >= 0:
            fwd.setdefault(e.sequence_nr, (where[id(e)], op_kind([c.name for c in chain(e)])))
    out = {b: [0.0, 0.0] for b in BUCKETS}
    in_ops = defaultdict(float)
    for e in ops:
        region, ms = where[id(e)], e.self_cpu_time_total / 1e3 / steps
        if region is None:
            continue
        in_ops[region] += ms
        if region in ("data", "loss", "optimizer"):
            out[region][0] += ms
            continue
        names = [c.name for c in chain(e)]
        if region == "forward":
            out[op_kind(names)][0] += ms
            continue
        node = next((c for c in chain(e) if c.name.startswith(EVAL_PREFIX)), None)
        made_by = fwd.get(node.sequence_nr) if node is not None else None
        if made_by and made_by[0] == "loss":
            out["loss"][1] += ms
        elif made_by and made_by[1] in ("attention", "norm"):
            out[made_by[1]][1] += ms
        else:
            out[op_kind(names)][1] += ms
    out["overhead"][0] = wall["forward"] - in_ops["forward"]
    out["overhead"][1] = wall["backward"] - in_ops["backward"]
    for r in ("data", "loss", "optimizer"):  # their Python time is part of the phase
        out[r][0] += wall[r] - in_ops[r]
    return out, dict(wall)


def short(name: str) -> str:
    """An operator's name for the table: Inductor's graph calls without their hashes."""
    if name.startswith("## Call CompiledFxGraph"):
        return "Call CompiledFxGraph (Inductor's wrapper)"
    return name


def top_ops(prof, steps: int, n: int = 15) -> list[tuple[str, int, float]]:
    """``(name, calls per step, self ms per step)`` of the ``n`` operators with most self time."""
    calls, ms = defaultdict(int), defaultdict(float)
    for a in prof.key_averages():
        if a.key not in REGIONS:
            calls[short(a.key)] += a.count
            ms[short(a.key)] += a.self_cpu_time_total / 1e3 / steps
    rows = [(k, calls[k] // steps, ms[k]) for k in ms]
    return sorted(rows, key=lambda r: -r[2])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="B")
    ap.add_argument("--micro-batch", type=int, default=2, help="clips per step (default 2)")
    ap.add_argument("--clip-frames", type=int, default=8)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile each Block")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps, no profiler (default 2)")
    ap.add_argument("--profile-steps", type=int, default=2, help="profiled steps (default 2)")
    ap.add_argument("--write", action="store_true", help="write the section to docs/benchmarks.md")
    ap.add_argument("--label", default="before", help="the section is profile-LABEL")
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.manual_seed(0)
    start = time.time()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype, "cpu", torch.get_num_threads())

    cfg = ModelConfig(preset=args.preset, height=64, width=64)
    model = build_model(cfg)
    model.train()
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # fused kernels named in the profile
        compile_blocks = getattr(evav.model, "compile_blocks", None)  # the trainer's, if there
        if compile_blocks is not None:
            compile_blocks(model)
        else:
            for b in model.modules():
                if isinstance(b, Block):
                    b.compile()
    total_steps = args.warmup + args.steps + args.profile_steps
    with tempfile.TemporaryDirectory(prefix="profile_step-") as tmp:
        loader = synthetic_loader(Path(tmp), args.micro_batch, args.clip_frames)
        batches = iter(loader)
        step = Step(model, batches, len(loader.task_names), args.precision, total_steps)
        t0 = time.perf_counter()
        try:
            for _ in range(args.warmup):
                step()
        except Exception as e:  # noqa: BLE001 - a compile failure surfaces at the first call
            if not args.compile:
                raise
            traceback.print_exc()
            print(
                f"profile_step: torch.compile of the blocks failed: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                file=sys.stderr,
            )
            sys.exit(2)
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                step()
            prof_s = (time.perf_counter() - t0) / args.profile_steps
        close = getattr(batches, "close", None)
        if close:
            close()
    load_after = os.getloadavg()
    peak = max(peak, matmul_peak(dtype, "cpu", torch.get_num_threads()))
    table, wall = buckets(prof.events(), args.profile_steps)
    top = top_ops(prof, args.profile_steps)
    step_s = statistics.median(times) if times else prof_s
    md = section(
        args, cfg, table, wall, top, step_s, times, prof_s, warmup_s, load_before, load_after, peak
    )
    print(md)
    print(f"({time.time() - start:.0f} s in all)")
    if args.write:
        write_section(f"profile-{args.label}", md)


def section(
    args, cfg, table, wall, top, step_s, times, prof_s, warmup_s, load0, load1, peak
) -> str:
    rcfg = cfg.resolved()
    params = num_params(build_model(cfg)) / 1e6
    total = sum(f + b for f, b in table.values())
    lines = [
        "| bucket | forward ms | backward ms | total ms | % of step |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in BUCKETS.items():
        f, b = table[key]
        if key in ("compiled", "conv") and not (f or b):
            continue
        if key in ("data", "optimizer"):
            cells = ["", "", f"{f:,.0f}"]
        else:
            cells = [f"{f:,.0f}", f"{b:,.0f}", f"{f + b:,.0f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {(f + b) / total:.1%} |")
    lines.append(f"| **step** | | | **{total:,.0f}** | 100% |")
    phases = ", ".join(f"{r} {wall.get(r, 0.0):,.0f}" for r in REGIONS)
    tops = ["| operator | calls | self ms | % of step |", "|---|---:|---:|---:|"]
    tops += [f"| `{n}` | {c} | {ms:,.0f} | {ms / total:.1%} |" for n, c, ms in top]
    mode = "eager" if not args.compile else "each Block `torch.compile`d"
    timed = ", ".join(f"{t:.2f}" for t in times)
    frames = args.micro_batch * args.clip_frames
    tokens = frames * rcfg.grid[0] * rcfg.grid[1]
    flops = train_flops_per_frame(cfg, args.clip_frames) * frames
    mm_ms = sum(table["matmul"])
    at_ms = sum(table["attention"])
    ranked = sorted(((sum(table[k]), k) for k in BUCKETS if k != "overhead"), key=lambda r: -r[0])
    biggest = ", ".join(f"{k} {ms / total:.0%}" for ms, k in ranked[:4])
    cmd = (
        f".venv/bin/python tools/profile_step.py --preset {args.preset} "
        f"--micro-batch {args.micro_batch} --precision {args.precision}"
        + (" --compile" if args.compile else "")
        + (f" --write --label {args.label}" if args.write else "")
    )
    title = f"Where a training step's time goes: preset {args.preset} on the CPU, {args.label}"
    threads = torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    bench_mb = MICRO_BATCH.get(args.preset)
    why_mb = (
        f"; tools/bench_train.py's {bench_mb} clips would make the step about "
        f"{bench_mb / args.micro_batch:.0f}x as long"
        if bench_mb and bench_mb != args.micro_batch
        else ""
    )
    mm_at_s = (mm_ms + at_ms) / 1e3
    return f"""## {title} (`tools/profile_step.py`)

{machine()}; {threads} torch thread(s) (`OMP_NUM_THREADS={omp}`).
Load average (1, 5, 15 min): {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f} before the run,
{load1[0]:.2f}, {load1[1]:.2f}, {load1[2]:.2f} after.
Command: `OMP_NUM_THREADS={omp} {cmd}`.

Preset {args.preset} ({rcfg.dim} wide, {rcfg.depth} blocks, {params:.1f}M parameters), {mode},
{args.precision}. Micro batch {args.micro_batch} clips of {args.clip_frames} frames at 64x64
({tokens:,} tokens{why_mb}), from the real loader (0 workers, PyAV) on synthetic shards; loss
`next_frame_loss_sums`; torch's AdamW, which is what DeepSpeed runs on the CPU at ZeRO 0 in fp32
(no DeepSpeed here). Step time {step_s:.2f} s: median of {len(times)} unprofiled steps ({timed} s),
after {args.warmup} untimed step(s) ({warmup_s:.1f} s in all). Under the profiler a step took
{prof_s:.2f} s; the table is the mean of {args.profile_steps} profiled step(s). Phases (wall ms
a step): {phases}.

Buckets. The data, loss and optimizer rows are whole phases (`record_function` regions, their
Python time included); the loss row has the backward of the loss's autograd nodes too
(MS-SSIM's conv2d blurs and their gradients, found through the profiler's sequence numbers).
The other rows split the model's forward and backward by operator self CPU time: attention is
`scaled_dot_product_attention` and its backward (the CPU flash kernels), norms `rms_norm` and
its backward, matmul the linear layers' mm/addmm, reshapes the operators that only move or
allocate memory (view, permute, transpose, copy_, cat, stack, empty, ...), elementwise the other
aten operators (GELU, rotary sin/cos/mul, residual adds, sums), autograd the engine's own nodes
and gradient accumulation; "not in an operator" is a phase's wall time beyond its operators
(Python, dispatch, the profiler's own cost).

{chr(10).join(lines)}

Reading: the largest buckets are {biggest}. Matmul and attention
({(mm_ms + at_ms) / total:.0%} of the step) do the {flops / 1e9:,.0f} GFLOP of
`train_flops_per_frame` at {flops / mm_at_s / 1e9:,.1f} GFLOP/s while they run,
{flops / mm_at_s / peak:.0%} of a 2048x2048 {args.precision} matmul on the same thread(s)
({peak / 1e9:,.1f} GFLOP/s: the higher of two timings, before and after the run, with
tools/bench_train.py's `matmul_peak`); over the whole step, {flops / (total / 1e3) / 1e9:,.1f} GFLOP/s.

The {len(top)} operators with the most self CPU time (every phase):

{chr(10).join(tops)}
"""


if __name__ == "__main__":
    main()
