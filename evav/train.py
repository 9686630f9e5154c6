"""Training: one function, top to bottom. `evav train CONFIG.yaml [key=value ...]`.

    evav train configs/debug.yaml data.train=[shards/synthetic] steps=200 run_dir=runs/debug
    torchrun --nproc_per_node 2 -m evav.cli train configs/debug.yaml engine.zero_stage=2
    srun python -m evav.cli train ...          (slurm/train.sbatch does this)

config -> logging -> signals -> distributed -> data -> resume contract -> model -> DeepSpeed
engine -> resume -> loop (step, log, validate, checkpoint, preemption) -> teardown. Re-running the
same command with the same run directory resumes from the newest checkpoint that verifies, in
the same MLflow run, once its config and data agree with this run's (evav/resume.py: every
change is logged; one that would make it another run is refused before anything is written).

A step's loss is the sum over its scored frames, every rank and micro-batch, divided by their
count (known from the masks before the first forward). A step is skipped, and counted
(``train/skipped_steps``, ``max_skipped_steps``), when a micro-batch's loss is non-finite on any
rank, when its gradients are (``distributed.optimizer_step``), or when no rank had a frame to
score; the skipped attempt does not count as a step: the schedule and ``step`` stay, the next
batches are tried. One host synchronisation per step (the all-reduce in ``optimizer_step``);
losses stay on the device until a logging step.

The MLflow run ends FINISHED when training reaches ``steps``, FAILED when an exception escapes,
and KILLED on preemption (the resumed job sets it RUNNING again). On preemption the order is:
every rank saves and the checkpoint is committed -> rank 0 flushes and closes the metrics ->
only then ``scontrol requeue`` (Slurm may end the job as soon as it is requeued).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evav import checkpoint, plan, resume, runlock, threads
from evav import distributed as dist
from evav.config import ConfigError, dump_yaml, load_config
from evav.data import DataConfig, Loader
from evav.data.catalog import read_catalog
from evav.data.clips import check_decoder
from evav.data.remote import is_url
from evav.distributed import EngineConfig, OptimConfig
from evav.frames.write import labelled_sheet
from evav.hooks import loop_hooks
from evav.metrics import MetricsConfig, MetricsLogger, redacted_config
from evav.model import (
    ModelConfig,
    build_model,
    compile_blocks,
    next_frame_loss_sums,
    peak_bf16_flops,
    target_select,
    train_flops_per_frame,
)
from evav.preemption import Preemption, requeue_slurm_job
from evav.resume import TrainState

log = logging.getLogger("evav.train")


@dataclass
class TrainConfig:
    run_dir: str = "runs/debug"
    seed: int = 0
    steps: int = 200
    micro_batch: int = 8  # clips per rank per micro-step
    log_every: int = 10
    val_every: int = 100  # 0: no validation
    val_batches: int = 4
    ckpt_every: int = 100  # 0: only at the end and on preemption
    keep_last: int = 2
    keep_every: int = 0  # also keep checkpoints whose step is a multiple of this (0: none)
    # skipped steps (a non-finite loss, or non-finite gradients) at which the run stops
    max_skipped_steps: int = 10
    # per device, for MFU (989e12: H100/H200 bf16 dense); 0: the known GPU's (flops.PEAK_BF16),
    # none on CPU
    peak_flops: float = 0.0
    # torch.compile each block (evav.model.compile_blocks); None: on with a GPU below ZeRO-3,
    # off on CPU (compiling costs more than it saves at test sizes)
    compile: bool | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # on resume, accept changes the resume contract refuses (evav/resume.py) in these dotted keys
    # or groups: e.g. [data] (other data), [data.weights], [model], [engine.zero_stage]
    resume_allow: list[str] = field(default_factory=list)


PREEMPTED_EXIT = (
    75  # EX_TEMPFAIL: stopped on a preemption signal after a checkpoint; rerun to resume
)


class NonFiniteLossError(RuntimeError):
    pass


def train(cfg: TrainConfig) -> dict:
    """Train to ``cfg.steps``; returns the final summary (step, last losses).

    The process group is destroyed after ``_train`` has returned and its engine (whose ZeRO
    partitions and hooks hold references to the groups, and gloo's worker threads their last
    async work) has been collected: freed later, during interpreter shutdown, gloo's threads
    abort the process ("terminate called without an active exception", SIGABRT) after a run
    that had finished and checkpointed."""
    try:
        return _train(cfg)
    finally:
        gc.collect()
        dist.destroy()


def _train(cfg: TrainConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    with contextlib.ExitStack() as stack:
        # -- distributed and logging ------------------------------------------------------
        threads_set = threads.configure(cfg.data.num_workers)  # before any thread pool starts
        t0 = time.monotonic()
        _say_starting()
        denv = dist.init(cfg.engine)
        _setup_logging(denv.rank)
        log.info("process group: %d rank(s), up in %.1f s", denv.world_size, time.monotonic() - t0)
        log.info("CPU threads per rank: %s", threads_set)
        # one trainer per run dir: rank 0 locks RUN/.lock before anything is written there
        stack.enter_context(runlock.hold(run_dir, denv.is_main))
        preempt = Preemption()
        stack.callback(preempt.restore)
        torch.manual_seed(cfg.seed + denv.rank)
        random.seed(cfg.seed + denv.rank)
        np.random.seed((cfg.seed + denv.rank) % 2**32)
        device = dist.device()
        config_yaml = dump_yaml(redacted_config(cfg))  # no credentials on disk
        resume.check_allow(cfg)

        # -- data ------------------------------------------------------------------------
        # manifests and shard indexes read once, by rank 0, for every rank and loader worker
        splits = ["train"] + ([cfg.data.val_split] if cfg.val_every else [])
        catalog = dist.from_main(lambda: _user_error(read_catalog, cfg.data.train, splits))
        log.info("catalog: %s on rank 0", catalog.summary())
        loader = Loader(
            cfg.data,
            split="train",
            rank=denv.rank,
            world_size=denv.world_size,
            batch_size=cfg.micro_batch,
            seed=cfg.seed,
            catalog=catalog,
        )
        val_loader = None
        lacking = plan.without_val(cfg, loader.manifests)
        if cfg.val_every and lacking:
            log.warning(
                "validation is off: val_every=%d but %s ha%s no clips in a %r split",
                cfg.val_every,
                ", ".join(lacking),
                "s" if len(lacking) == 1 else "ve",
                cfg.data.val_split,
            )
        elif cfg.val_every:
            val_loader = Loader(
                cfg.data,
                split="val",
                rank=denv.rank,
                world_size=denv.world_size,
                batch_size=cfg.micro_batch,
                seed=cfg.seed,
                infinite=False,
                catalog=catalog,
            )
        tasks = loader.task_names

        # -- resume contract: before the engine is built, before RUN is written ---------------
        state = TrainState(
            world_size=denv.world_size,
            render_hash=loader.render_hash,
            data_identity=loader.identity(),
            config=redacted_config(cfg),
            grad_accum_steps=cfg.engine.grad_accum_steps,
        )
        # the newest checkpoint that verifies; failing ones are set aside (checkpoint.py)
        last, saved = checkpoint.find_resume(run_dir, denv)
        if last is not None:  # every change logged; a refused one stops here (exit status 2)
            # another world size keeps the global batch: engine.grad_accum_steps adapts to it
            batch_plan = resume.plan_batch(saved, cfg, denv.world_size, last)
            changes = resume.compare(saved, state, cfg, last, batch_plan) if denv.is_main else None
            resume.enforce(dist.broadcast_object(changes), last, show=denv.is_main)
            # before the engine is built
            resume.apply_batch(batch_plan, cfg, state, show=denv.is_main)
        # the dry run's checks and report, with the batch as resumed (read on rank 0; a mistake
        # stops every rank, one line each)
        report = dist.from_main(lambda: _user_error(plan.describe, cfg, denv.world_size, catalog))
        log.info("start-up summary:\n%s", report)
        if denv.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_yaml)

        # -- model and engine (the frame size was checked against the data by plan.describe) --
        model = dist.build_model(  # the same weights on every rank; ZeRO-3: partitioned
            lambda: build_model(cfg.model),
            cfg.engine,
            cfg.optim,
            cfg.micro_batch,
            cfg.steps,
            denv.world_size,
            cfg.seed,
        )
        if _compiles(cfg, device):
            log.info(
                "torch.compile: %d blocks (compiled on their first step)", compile_blocks(model)
            )
        mcfg = cfg.model.resolved()
        flops_frame = train_flops_per_frame(mcfg, cfg.data.clip_frames)
        peak_flops = cfg.peak_flops or (
            peak_bf16_flops(torch.cuda.get_device_name()) if device.type == "cuda" else 0.0
        )
        tokens_per_frame = (mcfg.height // mcfg.patch_size) * (mcfg.width // mcfg.patch_size)
        engine, sched = dist.build_engine(
            model, cfg.engine, cfg.optim, cfg.micro_batch, cfg.steps, denv.world_size
        )
        amp = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
        gas = cfg.engine.grad_accum_steps  # as the resume plan left it
        if amp == torch.bfloat16 and cfg.engine.zero_stage == 0 and gas > 1 and denv.is_main:
            log.warning(
                "bf16 at ZeRO 0 accumulates the gradients of the %d micro-batches in bf16 "
                "(DeepSpeed has no fp32 accumulation there); engine.zero_stage=1 accumulates "
                "in fp32 (one rank: the same memory)",
                gas,
            )

        # -- resume ----------------------------------------------------------------------
        if last is not None:
            checkpoint.load_engine(engine, last)  # with this run's optimizer settings
            state.step, state.samples, state.frames = saved.step, saved.samples, saved.frames
            state.skipped_steps, state.mlflow_run_id = saved.skipped_steps, saved.mlflow_run_id
            loader.load_state_dict(saved.loader, saved.world_size)
            _set_rng(saved.rng[denv.rank] if saved.world_size == denv.world_size else None)
            log.info("resumed from %s at step %d", last, state.step)
            log.info("optimizer after resume: %s", dist.describe_optimizer(engine))
            if state.step >= cfg.steps:
                log.warning(
                    "this run is finished already: its checkpoint %s is at step %d of steps=%d; "
                    "nothing to train (give a larger steps= to train on)",
                    last,
                    state.step,
                    cfg.steps,
                )
        metrics = None
        if denv.is_main:
            metrics = MetricsLogger(
                run_dir, cfg.metrics, params=state.config, run_id=state.mlflow_run_id
            )
            stack.push(_end_mlflow_run(metrics))  # FINISHED, or FAILED on an exception
            metrics.set_tags(
                {"render_hash": loader.render_hash}
                | plan.summary_tags(cfg, plan.model_params(cfg), denv.world_size)
            )
            if cfg.metrics.enabled:
                log.info(
                    "MLflow: %s, experiment %s, run %s",
                    metrics.shown_uri,
                    cfg.metrics.experiment,
                    metrics.run_id or "(a new one: its id is in RUN/mlflow_run_id once created)",
                )
            metrics.log_artifact(run_dir / "config.yaml", "config")

        # -- loop ------------------------------------------------------------------------
        # A step's data is waited for at the boundary before it (here, then after each step,
        # before the stop check), where a preemption signal ends the wait: the run stops at a
        # step boundary even while the data is late, and each step finds its batches ready.
        batches = loader.iterate(should_stop=lambda: preempt.requested)
        window = _Window()
        hooks = loop_hooks()  # no-ops unless a test injects faults (evav/faults.py)
        step, attempt = state.step, 0
        first_step, t_start = step, time.perf_counter()
        waited_s = _wait_for_data(batches, step, cfg)
        if step < cfg.steps and dist.host_any(preempt.requested):
            # preempted before this process trained a step: its resume point is unchanged
            return _stop_preempted(step, preempt, metrics, denv)
        while step < cfg.steps:
            attempt += 1  # counts skipped steps too (fault injection is keyed on it)
            t0, waited_s = time.perf_counter() - waited_s, 0.0  # the step's time has its data wait
            # every rank takes exactly one micro-batch per micro-step (an all-bad one is the
            # loader's placeholder, weight 0); the step's loss is the sum over its scored frames
            # on every rank divided by their count, so a frame weighs the same wherever it lands
            micro = [next(batches) for _ in range(gas)]
            scored, real, computed = _host_counts(micro)  # from host masks: no device sync
            n_scored = dist.all_reduce(torch.tensor(scored, device=device), "sum")
            scale = gas * denv.world_size / n_scored.clamp(min=1)  # DeepSpeed averages both
            sums = torch.zeros(2 + 2 * len(tasks), device=device)  # loss, frames, per task
            bad = torch.zeros((), device=device)  # micro-batches with a non-finite loss
            for i, batch in enumerate(micro):
                frames_BTHWC = batch["frames"].to(device, non_blocking=True).float().div_(255)
                with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                    with hooks.forward(engine.module, attempt, i):
                        pred = engine(frames_BTHWC.to(dist.input_dtype(engine)), **_packing(batch))
                out = next_frame_loss_sums(
                    pred,
                    frames_BTHWC,
                    batch["loss_mask"].to(device),
                    batch["pad_mask"].to(device),
                    batch["task_id"].to(device),
                    len(tasks),
                )
                total = hooks.loss(out.total, attempt)
                bad += ~torch.isfinite(total)
                sums += _loss_vector(total.detach(), out)
                with hooks.grads(engine.module, attempt):
                    engine.backward(total * scale)
                if i < gas - 1:
                    engine.step()  # DeepSpeed counts micro-batches in step(); no update yet
            # a non-finite micro-batch on any rank skips the step on every rank: its gradient is
            # in the accumulated buffers already (a NaN forward has NaN gradients however its loss
            # is masked); a step without a scored frame anywhere is skipped too (Adam would still
            # move the weights)
            verdict, (n_frames, n_computed), grad_norm = dist.optimizer_step(
                engine,
                bad + (n_scored == 0).float(),
                torch.tensor([real, computed], device=device),
            )
            if verdict != dist.APPLIED:
                why = _skip_reason(verdict, grad_norm, n_scored, sums)
                nonfinite_grad = verdict == dist.SKIP_NONFINITE_GRAD
                record = {"train/grad_norm": _as_float(grad_norm)} if nonfinite_grad else {}
                _skip(state, cfg, metrics, step, why, run_dir, record)
                continue
            step += 1
            state.step = step
            state.samples += cfg.micro_batch * gas * denv.world_size
            state.frames += int(n_frames)
            window.add(time.perf_counter() - t0, n_frames, n_computed, sums, grad_norm)

            # -- periodic actions: log, validate, checkpoint, preemption -------------------
            if every(step, cfg.log_every) or step == cfg.steps:
                record = window.flush(
                    tasks,
                    engine,
                    sched,
                    flops_frame,
                    peak_flops,
                    denv.world_size,
                    loader,
                    state,
                    tokens_per_frame,
                )
                if metrics:
                    metrics.log(record, step)
                    log.info(_line(step, cfg.steps, record))
            if metrics and every(step, cfg.metrics.image_every):
                metrics.log_image("pred_vs_true", prediction_sheet(pred, batch, step), step)
            if val_loader is not None and (every(step, cfg.val_every) or step == cfg.steps):
                record = validate(engine, val_loader, cfg, tasks, device, amp)
                if metrics:
                    metrics.log(record, step)
                    log.info("step %d validation: %s", step, _fmt(record))
            hooks.after_step(step, lambda: preempt.requested, resumed=last is not None)
            waited_s = _wait_for_data(batches, step, cfg)  # the next step's; a signal ends it
            stop = dist.host_any(preempt.requested)  # over gloo: no device synchronisation
            if every(step, cfg.ckpt_every) or step == cfg.steps or stop:
                _save(engine, run_dir, step, state, loader, denv, metrics, config_yaml, cfg)
            if stop:  # the checkpoint is committed
                return _stop_preempted(step, preempt, metrics, denv)
        dist.barrier()  # every rank done with its collectives before any leaves
        if denv.is_main:
            seconds = time.perf_counter() - t_start
            log.info(_end_summary(state, first_step, seconds, run_dir, window.last_loss))
        return {"step": step, "preempted": False, "last_loss": window.last_loss}


def _user_error(fn, *args):
    """``fn(*args)``, a data or config mistake (a missing dataset, a bad manifest, frames that do
    not fit the model) raised as ConfigError: one line and exit status 2 on every rank, never a
    traceback."""
    try:
        return fn(*args)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def _end_summary(state: TrainState, first_step: int, seconds: float, run_dir: Path, loss) -> str:
    done = state.step - first_step
    good = checkpoint.last_good(run_dir)
    return (
        f"finished: step {state.step} ({done} this run, in {_duration(seconds)}"
        + (f", {seconds / done:.2f} s/step" if done else "")
        + ")"
        + (f"; last train loss {loss:.4f}" if done else "")
        + f"; {state.samples:,} clips, {state.frames:,} frames "
        f"since step 0; skipped steps "
        f"{state.skipped_steps}; last checkpoint {good or 'none'}"
        + (f"; MLflow run {state.mlflow_run_id}" if state.mlflow_run_id else "")
    )


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _wait_for_data(batches, step: int, cfg: TrainConfig) -> float:
    """Wait until the next step's micro-batches are ready (none after the last step); a
    preemption signal ends the wait early. Returns the seconds waited (part of that step's time)."""
    if step >= cfg.steps:
        return 0.0
    t0 = time.perf_counter()
    batches.wait(cfg.engine.grad_accum_steps)
    return time.perf_counter() - t0


def _stop_preempted(step: int, preempt: Preemption, metrics, denv) -> dict:
    """Leave on a preemption, the checkpoint of ``step`` committed (or the one resumed from):
    flush the metrics before a requeue (Slurm may end the job as soon as it is requeued)."""
    if metrics:
        metrics.close("KILLED")
    if preempt.received == "SIGUSR2" and denv.is_main:
        requeue_slurm_job()
    dist.barrier()  # no rank exits (a failed task to srun) before the requeue
    log.warning("stopping at step %d after %s; rerun to resume", step, preempt.received)
    return {"step": step, "preempted": True}


def validate(engine, val_loader: Loader, cfg: TrainConfig, tasks: list[str], device, amp) -> dict:
    """Mean next-frame loss per task (over scored frames, all ranks) over ``cfg.val_batches``
    batches of the validation split, and the samples it skipped as bad (``val/skipped``,
    ``val/skipped/KIND``). Every rank runs the same number of forwards (a ZeRO-3 forward gathers
    parameters from all of them): a rank whose split ends first feeds the loader's placeholder
    (weight 0) until every rank's has ended or ``val_batches`` are done."""
    engine.eval()
    sums = torch.zeros(2 + 2 * len(tasks), device=device)
    val_loader.reset()
    batches = iter(val_loader)
    with torch.no_grad():
        for _ in range(cfg.val_batches):
            batch = next(batches, None)
            more = torch.tensor(float(batch is not None), device=device)
            if not dist.all_reduce(more, "max").item():  # every rank's split has ended
                break
            batch = batch if batch is not None else val_loader.placeholder()
            frames = batch["frames"].to(device).float().div_(255)
            with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                pred = engine(frames.to(dist.input_dtype(engine)), **_packing(batch))
            out = next_frame_loss_sums(
                pred,
                frames,
                batch["loss_mask"].to(device),
                batch["pad_mask"].to(device),
                batch["task_id"].to(device),
                len(tasks),
            )
            sums += _loss_vector(out.total, out)
    engine.train()
    out = _losses(dist.all_reduce(sums, "sum"), tasks, "val")
    data = val_loader.stats(reduce=lambda t, op: dist.all_reduce(t.to(device), op).cpu())
    out.update({f"val/{k[5:]}": v for k, v in data.items() if k.startswith("data/skipped")})
    return out


def _compiles(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to compile the blocks: ``cfg.compile``, or by default with a GPU below ZeRO-3.
    At ZeRO-3 DeepSpeed gathers each module's parameters in hooks that are closed to the
    compiler, so a compiled block breaks into a graph per submodule: allowed, with a warning."""
    on = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if on and cfg.engine.zero_stage == 3:
        if cfg.compile is None:
            return False
        log.warning(
            "compile=true at ZeRO-3: DeepSpeed's parameter hooks on every module are closed to "
            "torch.compile, so each block compiles as one graph per submodule (correct, little "
            "gain); ZeRO 0-2 compile a block as one graph"
        )
    return on


def _packing(batch: dict) -> dict:
    """The model's keyword for a packed batch (data.pad_to=pack): its clips' segments."""
    seg = batch.get("segment")
    return {} if seg is None else {"segments_BT": seg.to(dist.device())}


def _loss_vector(total: torch.Tensor, out) -> torch.Tensor:
    """One micro-batch's [loss sum, frames, per task (loss sums), per task (frames)], the vector
    the trainer and validation add up on the device and ``_losses`` reads."""
    return torch.cat([total.reshape(1), out.count.reshape(1), out.tasks_2K.flatten()])


def _losses(sums: torch.Tensor, tasks: list[str], prefix: str) -> dict[str, float]:
    """``PREFIX/loss`` and ``PREFIX/loss/TASK`` from summed [loss, frames, per task (loss sums),
    per task (frames)]: means over scored frames (none scored: left out)."""
    total, count, *rest = sums.tolist()
    out = {f"{prefix}/loss": total / count} if count > 0 else {}
    k = len(tasks)
    for t, loss, n in zip(tasks, rest[:k], rest[k:]):
        if n > 0:
            out[f"{prefix}/loss/{t}"] = loss / n
    return out


def _host_counts(micro: list[dict]) -> tuple[float, float, float]:
    """A step's micro-batches' frames: scored (targets selected, not padding), real (not
    padding) and computed (padding included), read from the batches' masks while they are still
    in host memory: no device synchronisation, known before the first forward (the only reads of
    a tensor in a step besides ``dist.optimizer_step``'s and ``dist.host_any``'s; see
    tools/check_host_sync.py)."""
    scored = sum(int(target_select(b["loss_mask"], b["pad_mask"]).sum()) for b in micro)
    real = sum(int((~b["pad_mask"]).sum()) for b in micro)
    computed = sum(b["pad_mask"].numel() for b in micro)
    return float(scored), float(real), float(computed)


def _skip_reason(verdict: str, grad_norm, n_scored: torch.Tensor, sums: torch.Tensor) -> str:
    """The warning for a skipped step (read from the device: skipped steps are rare)."""
    if verdict == dist.SKIP_NONFINITE_GRAD:
        loss = (sums[0] / sums[1].clamp(min=1)).item()  # this rank's
        return (
            f"non-finite gradients (norm {_as_float(grad_norm):g}) with a finite loss "
            f"{loss:.4g}, update skipped"
        )
    if n_scored.item() == 0:
        return "no frame to score in the step on any rank (every sample was bad), step skipped"
    return "non-finite loss in a micro-batch (on this or another rank), step skipped"


def _as_float(x) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if torch.is_tensor(x) else x)


def prediction_sheet(pred_BTHWC: torch.Tensor, batch: dict, step: int, row: int = 0) -> np.ndarray:
    """The first clip of batch row ``row``, labelled (``labelled_sheet``): its true frames
    2..T above the model's predictions of them (``pred[:, t]`` predicts frame ``t + 1`` from
    the frames up to ``t``: teacher forcing), with the step, task, sample key and answer; padding
    and, in a packed row, the row's other clips are left out."""
    pad = batch["pad_mask"][row].cpu()
    keep = ~pad[1:]
    segment, first = batch.get("segment"), row
    if segment is not None:  # packed: the row's first clip is its segment 0
        keep &= segment[row, 1:].cpu() == 0
        first = batch["row_first"][row]
    true = batch["frames"][row, 1:].float().div(255).cpu()[keep]
    pred = pred_BTHWC[row, :-1].detach().float().cpu()[keep]
    as_u8 = lambda x: x.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()  # noqa: E731
    task, key, answer = (batch[k][first] for k in ("task", "key", "answer"))
    title = f"step {step} | task {task} | {key}" + (f" | answer {answer!r}" if answer else "")
    return labelled_sheet(
        title,
        [
            (f"true: frames 2-{len(true) + 1} of the clip", as_u8(true)),
            ("predicted: each frame from the true frames before it", as_u8(pred)),
        ],
    )


def _say_starting() -> None:
    """One line on stderr from the first rank before the process group starts (logging is set
    up after it): DeepSpeed builds its ops there on a machine's first run, a minute or more of
    silence otherwise."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(
            f"{time.strftime('%H:%M:%S')} evav.train: starting the process group (on a "
            "machine's first run DeepSpeed builds its ops first: a minute or two, once)",
            file=sys.stderr,
            flush=True,
        )


def _end_mlflow_run(metrics: MetricsLogger):
    """An ExitStack hook: close the metrics, ending the MLflow run FINISHED, FAILED on an
    exception, KILLED on Ctrl-C (a preempted run has already been closed KILLED)."""

    def hook(exc_type, exc, tb) -> bool:
        if exc_type is None:
            metrics.close("FINISHED")
        else:
            metrics.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False  # never swallow the exception

    return hook


def every(step: int, n: int) -> bool:
    """True on every n-th step (never when n <= 0)."""
    return n > 0 and step % n == 0


class _Window:
    """Accumulates timing and losses between two log lines, on the device: nothing is read to
    the host before the log step."""

    def __init__(self):
        self.reset()
        self.last_loss = float("nan")

    def reset(self):
        self.time = self.frames = self.computed = 0.0
        self.steps = 0
        self.sums = None  # [loss, frames, per task (loss sums), per task (frames)], this rank
        self.grad_norm = float("nan")  # the last step's (dist.optimizer_step): a tensor or float

    def add(self, seconds, frames, computed, sums, grad_norm):
        """``frames``: the step's real frames (all ranks); ``computed``: with padding."""
        self.grad_norm = grad_norm
        self.time += seconds
        self.frames += frames
        self.computed += computed
        self.steps += 1
        self.sums = sums if self.sums is None else self.sums + sums

    def flush(
        self, tasks, engine, sched, flops_frame, peak_flops, world, loader, state, tokens_per_frame
    ) -> dict:
        losses = _losses(dist.all_reduce(self.sums.clone(), "sum"), tasks, "train")
        loss = losses.pop("train/loss", float("nan"))
        self.last_loss = loss
        fps = self.frames / max(self.time, 1e-9)
        data = loader.stats(reduce=lambda t, op: dist.all_reduce(t.to(dist.device()), op).cpu())
        rec = {
            "train/loss": loss,
            "train/lr": sched.get_last_lr()[0] if sched is not None else float("nan"),
            "train/grad_norm": _as_float(self.grad_norm),
            "train/skipped_steps": state.skipped_steps,
            "train/samples": state.samples,
            "train/frames": state.frames,
            "speed/frames_per_s": fps,
            "speed/tokens_per_s": fps * tokens_per_frame,
            "speed/step_s": self.time / max(1, self.steps),
            "data/wait_frac": data["data/wait_s"] / max(self.time, 1e-9),
            "data/useful_frac": self.frames / max(self.computed, 1.0),
            "mem/peak_gb": _peak_memory_gb(),
        }
        rec.update(losses)
        if peak_flops > 0:
            rec["speed/mfu"] = fps * flops_frame / (peak_flops * world)
        rec.update(data)
        self.reset()
        return rec


def _save(
    engine, run_dir, step, state: TrainState, loader, denv, metrics, config_yaml, cfg
) -> None:
    """Checkpoint ``step``: every rank's loader and RNG states join the train state."""
    state.loader = dist.all_gather_objects(loader.state_dict())
    state.rng = dist.all_gather_objects(_get_rng())
    state.mlflow_run_id = dist.broadcast_object(metrics.wait_run_id() if metrics else None)
    path = checkpoint.save(
        engine, run_dir, step, state, config_yaml, denv, cfg.keep_last, cfg.keep_every
    )
    log.info("checkpoint %s", path)


def _skip(
    state: TrainState, cfg: TrainConfig, metrics, step: int, why: str, run_dir, record=None
) -> None:
    """Count a skipped step (attempting step ``step + 1``): a warning, a metrics record at that
    step (``train/skipped_steps``, and ``record``: a non-finite grad norm is kept, see
    evav/metrics.py), and NonFiniteLossError at ``max_skipped_steps``."""
    state.skipped_steps += 1
    log.warning(
        "step %d: %s (skipped steps %d/%d)",
        step + 1,
        why,
        state.skipped_steps,
        cfg.max_skipped_steps,
    )
    if metrics:
        metrics.log({"train/skipped_steps": state.skipped_steps, **(record or {})}, step + 1)
    if state.skipped_steps >= cfg.max_skipped_steps:
        good = checkpoint.last_good(run_dir)
        raise NonFiniteLossError(
            f"{state.skipped_steps} skipped steps (a non-finite loss or non-finite gradients; "
            f"limit max_skipped_steps={cfg.max_skipped_steps}), the last at step {step + 1}: "
            f"{why}; "
            + (f"the last good checkpoint is {good}" if good else "there is no good checkpoint")
        )


def _get_rng() -> dict:
    return {
        "torch": torch.get_rng_state(),
        # plain lists and numbers: the checkpoint loads with weights_only=True, no numpy types
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng(rng: dict | None) -> None:
    if rng is None:  # world size changed: fresh per-rank streams (the data order stays exact)
        return
    torch.set_rng_state(rng["torch"])
    np.random.set_state(tuple(rng["numpy"]))  # numpy takes the key as a list too
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _fmt(rec: dict) -> str:
    return " ".join(f"{k.split('/', 1)[-1]}={v:.4g}" for k, v in rec.items())


def _line(step: int, total: int, r: dict) -> str:
    mfu = f" | mfu {r['speed/mfu']:.1%}" if "speed/mfu" in r else ""
    eta = _duration(r["speed/step_s"] * (total - step))
    crop = f" | cropped {r['data/cropped_frac']:.0%}" if r.get("data/cropped_frac") else ""
    return (
        f"step {step}/{total} | eta {eta} | loss {r['train/loss']:.4f} | lr {r['train/lr']:.2e} | "
        f"gnorm {r['train/grad_norm']:.3f} | {r['speed/frames_per_s']:,.0f} frames/s "
        f"{r['speed/tokens_per_s']:,.0f} tokens/s{mfu}{crop} | "
        f"wait {r['data/wait_frac']:.0%} | skipped samples {int(r.get('data/skipped', 0))} "
        f"steps {int(r['train/skipped_steps'])} | "
        f"mem {r['mem/peak_gb']:.2f} GB"
    )


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a training config YAML (e.g. configs/debug.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=200 model.depth=4")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and every dataset, print the model size, FLOPs per step, clip "
        "lengths against data.clip_frames and a memory estimate per ZeRO stage, and stop "
        "(seconds; no process group, no DeepSpeed)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        help="with --dry-run: the ranks to plan for (default: $WORLD_SIZE, $SLURM_NTASKS or 1)",
    )


def check(cfg: TrainConfig) -> None:
    """The checks that need no process group and no data read, run before either starts: a
    mistake is one line naming the key (ConfigError: exit 2), not a traceback from every rank
    after DeepSpeed and the process group have started."""
    at_least = {
        "steps": (cfg.steps, 1),
        "micro_batch": (cfg.micro_batch, 1),
        "log_every": (cfg.log_every, 1),
        "val_every": (cfg.val_every, 0),
        "val_batches": (cfg.val_batches, 1),
        "ckpt_every": (cfg.ckpt_every, 0),
        "keep_last": (cfg.keep_last, 1),
        "keep_every": (cfg.keep_every, 0),
        "max_skipped_steps": (cfg.max_skipped_steps, 1),
        # one frame has nothing to predict from: the loss would be 0 and nothing would train
        "data.clip_frames": (cfg.data.clip_frames, 2),
        "data.num_workers": (cfg.data.num_workers, 0),
        "data.window": (cfg.data.window, 1),
        "engine.grad_accum_steps": (cfg.engine.grad_accum_steps, 1),
    }
    for key, (v, lo) in at_least.items():
        if v < lo:
            raise ConfigError(f"{key}={v}: must be at least {lo}")
    try:
        cfg.model.resolved()
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    why = check_decoder(cfg.data.decoder)
    if why:
        raise ConfigError(why)
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give one or more dataset directories")
    for d in cfg.data.train:
        if not is_url(str(d)) and not (Path(d) / "manifest.json").is_file():
            why = "does not exist" if not Path(d).exists() else "has no manifest.json"
            raise ConfigError(f"data.train entry {d} {why}: give a folder built by evav preprocess")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, list(args.overrides))
    check(cfg)
    if getattr(args, "dry_run", False):
        world = args.world_size or int(
            os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1
        )
        if world < 1:
            raise ConfigError(f"--world-size {world}: must be at least 1")
        print(_user_error(plan.describe, cfg, world))
        print("dry run: nothing was trained")
        return 0
    result = train(cfg)
    return PREEMPTED_EXIT if result["preempted"] else 0
