"""The one module that talks to DeepSpeed and the process group.

Everything distributed goes through here: reading the launch environment (torchrun, the
deepspeed launcher, or Slurm ``srun``), initialising the process group (gloo on CPU, nccl on
GPU), building the DeepSpeed engine from evav's typed config (the DeepSpeed config dict is
generated, never kept by hand), collectives the trainer needs, and engine checkpoint I/O.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import pickle
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from evav import buildlock

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class EngineConfig:
    """How DeepSpeed runs the model (see ``deepspeed_config`` for the dict it generates)."""

    # DeepSpeed ZeRO: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters sharded over
    # ranks. 1 by default: under bf16, ZeRO >= 1 accumulates gradients in fp32 (DeepSpeed 0.19
    # has none at ZeRO 0); on one rank ZeRO 1 takes the same memory as ZeRO 0
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state in CPU memory
    precision: Literal["fp32", "bf16"] = "bf16"
    grad_accum_steps: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, else gloo
    # AdamW implementation. None: torch's on CPU, DeepSpeed's fused kernel on GPU or with
    # offload. DeepSpeed's CPU kernel keeps beta^t as a running product that a resumed process
    # restarts from pow(beta, t): the first update after a resume then differs in the last bits.
    # torch's AdamW recomputes beta^t every step, so a resumed CPU run is bitwise the same.
    torch_adam: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed dict


def launch_env() -> DistEnv:
    """Rank and world from torchrun/deepspeed (RANK, WORLD_SIZE) or Slurm srun (SLURM_PROCID)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or _slurm_first_host(env["SLURM_JOB_NODELIST"]),
            int(env.get("MASTER_PORT", 29500)),
            "slurm",
        )
    # Not launched: a group of one on a free loopback port (29500 may be taken by another job)
    return DistEnv(master_port=int(env.get("MASTER_PORT") or _free_port()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_first_host(nodelist: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def init(cfg: EngineConfig, timeout_min: float = 30) -> DistEnv:
    """Initialise the process group for this launch (a no-op group of one when not launched)."""
    import deepspeed

    denv = launch_env()
    os.environ.update(
        RANK=str(denv.rank),
        WORLD_SIZE=str(denv.world_size),
        LOCAL_RANK=str(denv.local_rank),
        MASTER_ADDR=denv.master_addr,
        MASTER_PORT=str(denv.master_port),
    )
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(denv.local_rank)
    buildlock.clear_stale()  # a killed op build's lock would hang DeepSpeed here, silently
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_min),
    )
    return denv


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def deepspeed_config(
    engine: EngineConfig, optim: OptimConfig, micro_batch: int, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config dict, generated from evav's config (nothing else is hand-kept)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": engine.grad_accum_steps,
        "train_batch_size": micro_batch * engine.grad_accum_steps * world_size,
        "gradient_clipping": optim.grad_clip,
        "steps_per_print": 10**9,  # evav logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": engine.zero_stage},
        "bf16": {"enabled": engine.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": 1e-8,
                "weight_decay": optim.weight_decay,
            },
        },
    }
    if engine.precision == "bf16" and engine.zero_stage >= 1:
        # gradients accumulate in fp32 across micro-batches (ZeRO 1: DeepSpeed's BF16_Optimizer,
        # 2-3: the partitions' fp32 buffers); DeepSpeed 0.19 refuses fp32 accumulation for bf16
        # at ZeRO 0 (NotImplementedError), where it stays bf16 (train.py warns when it matters)
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    torch_adam = engine.torch_adam
    if torch_adam is None:
        torch_adam = not torch.cuda.is_available() and not engine.offload_optimizer
    if torch_adam:
        ds["optimizer"]["params"]["torch_adam"] = True
    if engine.offload_optimizer:
        if engine.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage >= 1")
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    _merge(ds, engine.extra)
    return ds


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier on ``optim.lr`` at each optimizer step: linear warmup, cosine to min_lr_ratio."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / max(1, optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    return f


def decay_split(items: list[tuple[Any, tuple[int, ...]]]) -> tuple[list, list]:
    """``(with weight decay, without)`` of ``(item, full shape)`` pairs, each in the given
    order: matrices (2 or more dimensions) decay, vectors (biases, norm scales) do not. The
    engine's two param groups (``build_engine``), and the order in which DeepSpeed's ZeRO-0 bf16
    wrapper flattens its fp32 master copies (``consolidated_state_dict``)."""
    decay = [x for x, shape in items if len(shape) >= 2]
    no_decay = [x for x, shape in items if len(shape) < 2]
    return decay, no_decay


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also when ZeRO-3 holds only this rank's partition of it."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def build_model(
    make: Callable[[], torch.nn.Module],
    engine: EngineConfig,
    optim: OptimConfig,
    micro_batch: int,
    total_steps: int,
    world_size: int,
    seed: int,
) -> torch.nn.Module:
    """``make()``'s model with the same initial weights on every rank, by construction; under
    ZeRO-3 built partitioned (``deepspeed.zero.Init``), never whole on one rank.

    ``make`` runs with torch's generators (CPU and this process's GPU) seeded with ``seed``, the
    same on every rank, and the caller's states (the rank-dependent seeds everything after uses)
    are restored afterwards. Nothing relies on DeepSpeed's broadcast of rank 0's weights.

    ZeRO-3: each parameter is cut into its rank's partition as soon as its module is built
    (``zero.Init`` with this run's DeepSpeed config, so in the engine's dtype), so a model larger
    than one rank's memory can be built. The model's own initialisation, which ran on empty
    partitions there, is then done again module by module: ``model.init_module(m)`` for every
    module in ``model.modules()`` order (evav.model.NextFrameModel: what its ``init_weights``
    does) with that module's own parameters gathered whole, in fp32 (the draws and values of an
    fp32 build, then rounded to the engine's dtype as DeepSpeed rounds a whole model), and
    re-partitioned. At most one module's parameters are whole at a time. The sequence of draws is
    the same as a build without ZeRO-3, but the values agree with it only when the construction
    draws the same (the default init ``make`` overwrites ran on ``zero.Init``'s tensors: in the
    engine's dtype, on the GPU when there is one).
    """
    import deepspeed

    gpu = torch.cuda.is_available()
    saved = torch.get_rng_state(), torch.cuda.get_rng_state() if gpu else None
    try:
        torch.random.default_generator.manual_seed(seed)
        if gpu:
            torch.cuda.manual_seed(seed)
        if engine.zero_stage != 3:
            return make()
        ds = deepspeed_config(engine, optim, micro_batch, world_size)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = make()
        init_module = getattr(model, "init_module", None)
        if init_module is None:
            raise TypeError(
                f"{type(model).__name__} has no init_module(m): its initialisation cannot be "
                "redone on ZeRO-3 partitions"
            )
        for m in model.modules():
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                whole = [p.data for p in own]
                for p in own:
                    p.data = p.data.float()
                init_module(m)
                for p, w in zip(own, whole):
                    w.copy_(p.data)
                    p.data = w
        return model
    finally:
        torch.set_rng_state(saved[0])
        if gpu:
            torch.cuda.set_rng_state(saved[1])


def build_engine(
    model: torch.nn.Module,
    engine: EngineConfig,
    optim: OptimConfig,
    micro_batch: int,
    total_steps: int,
    world_size: int,
):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warmup-cosine schedule."""
    import deepspeed

    ds = deepspeed_config(engine, optim, micro_batch, world_size)
    if not ds["optimizer"]["params"].get("torch_adam"):
        _arch_list_for_jit()
    decay, no_decay = decay_split([(p, _full_shape(p)) for p in model.parameters()])
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    eng, _, _, sched = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(optim, total_steps)
        ),
    )
    return eng, sched


def input_dtype(engine) -> torch.dtype:
    """The dtype to feed the engine: its parameters' (bf16 with ``precision: bf16``). DeepSpeed's
    bf16 mode turns an outer ``torch.autocast`` off inside the engine, and on a GPU a float32
    input to a bf16 layer is an error (CPU kernels accept the mix, so only a GPU showed it)."""
    return next(engine.module.parameters()).dtype


def _arch_list_for_jit() -> None:
    """Set ``TORCH_CUDA_ARCH_LIST`` to one DeepSpeed's JIT build of its fused Adam can read."""
    if torch.cuda.is_available():
        given = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        fixed = jit_arch_list(given, torch.cuda.get_device_capability())
        if given.strip() and fixed != given:
            log.warning(
                "TORCH_CUDA_ARCH_LIST=%r: DeepSpeed's JIT build cannot parse arch-specific "
                "suffixes; building its fused Adam for %r",
                given,
                fixed,
            )
        os.environ["TORCH_CUDA_ARCH_LIST"] = fixed


def jit_arch_list(given: str, capability: tuple[int, int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for DeepSpeed's JIT builds: ``given`` without arch-specific
    suffixes, or this GPU's ``capability`` when ``given`` is empty.

    DeepSpeed 0.19 parses each entry as numbers and crashes on targets such as ``9.0a``
    (``ValueError: invalid literal for int() with base 10: '0a'``), which CUDA images for Hopper
    set (seen on an H200). The suffix only enables Hopper-only instructions that an elementwise
    optimizer kernel does not use."""
    entries = [e for e in given.replace(" ", ";").split(";") if e.strip()]
    if not entries:
        return f"{capability[0]}.{capability[1]}"
    fixed = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", e.strip()) for e in entries]
    return given if fixed == entries else ";".join(dict.fromkeys(fixed))


def rank() -> int:
    """This process's rank in the process group (0 when there is none)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    """The process group's size (1 when there is none)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) over the data-parallel group; identity when alone."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(t, op=red)
    return t


_HOST_GROUP: list = []  # a gloo group for flags the host owns, made once (see host_any)


def _host_group():
    """The group for host values: the default one on gloo, else a gloo group made once (every
    rank reaches the first call at the same point)."""
    if torch.distributed.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(torch.distributed.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run once, on rank 0, its result given to every rank over the host group (what
    every rank would otherwise read from disk, read once); its exception is raised on every rank
    (rank 0's with its traceback), so a bad input stops every rank with the same message."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return fn()
    box: list[Any] = [None]
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:
            error = e
            try:  # what the other ranks will rebuild (an exception whose __init__ takes
                pickle.loads(pickle.dumps(e))  # other arguments than its args would not)
                box = [("error", e)]
            except Exception:  # an exception that does not pickle travels as its message
                box = [("error", RuntimeError(f"{type(e).__name__}: {e}"))]
    torch.distributed.broadcast_object_list(box, src=0, group=_host_group())
    kind, value = box[0]
    if error is not None:
        raise error
    if kind == "error":
        raise value
    return value


def host_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: a host value (the preemption flag)
    reduced over gloo, so it neither waits for the device's queue nor makes the device wait (on
    NCCL a host flag would be copied to the GPU and read back: a synchronisation every step)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_host_group())
    return bool(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm as a device tensor (no host synchronisation), read before
    ``engine.step()``, when DeepSpeed will not check or report it.

    DeepSpeed's ``get_global_grad_norm`` is None for ZeRO stage 0 in fp32 (its plain optimizer
    path); there the gradients are already all-reduced, so the local norm is the global one.
    Returns None when DeepSpeed checks and reports the norm itself (read it after the step).
    """
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [
        p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None
    ]
    return torch.stack(grads).norm() if grads else torch.zeros((), device=device())


APPLIED, SKIP_ASKED, SKIP_NONFINITE_GRAD = "applied", "asked", "nonfinite_grad"


def optimizer_step(engine, skip: torch.Tensor, counts: torch.Tensor) -> tuple[str, list, Any]:
    """End a step at the accumulation boundary, alike on every rank: ``(verdict, totals, norm)``.

    ``skip`` (a device scalar, per rank; > 0: this step must not be applied, e.g. a micro-batch
    with a non-finite loss, whose gradient is already in the accumulated buffers) and ``counts``
    (a device vector) are summed over the ranks in one all-reduce, together with the gradient
    check below: that reduction's ``.tolist()`` is the step's one host synchronisation, and
    ``totals`` are the summed ``counts``. The verdict is ``APPLIED``, ``SKIP_ASKED`` or
    ``SKIP_NONFINITE_GRAD``; ``norm`` is the global gradient norm (a tensor or float: read it
    when logging).

    ZeRO 1-3 and bf16 check the gradients themselves (DeepSpeed 0.19, every stage checked with
    inf gradients and a finite loss): the update is skipped, ``was_step_applied()`` is False, the
    norm is inf and the schedule does not advance. fp32 at ZeRO 0 has no such check: DeepSpeed
    would clip by an inf norm and apply a NaN update. There the norm is taken here first and a
    non-finite one skips the step as DeepSpeed's own check does. A skipped step drops the
    gradients and moves only DeepSpeed's step counters on (the micro-step one keeps
    accumulation boundaries aligned).
    """
    norm = grad_norm(engine)
    nonfinite = (~torch.isfinite(norm)).float() if norm is not None else torch.zeros(())
    packed = torch.cat([skip.reshape(1).float(), nonfinite.reshape(1).to(skip.device), counts])
    flags = all_reduce(packed.to(device()), "sum").tolist()
    totals = flags[2:]
    if flags[0] or flags[1]:
        _skip_step(engine)
        return (SKIP_ASKED if flags[0] else SKIP_NONFINITE_GRAD), totals, norm
    engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
        if not engine.was_step_applied():  # DeepSpeed's own overflow check skipped it
            return SKIP_NONFINITE_GRAD, totals, norm
    return APPLIED, totals, norm


def _skip_step(engine) -> None:
    """What DeepSpeed does for an overflowed step: the gradients dropped, the counters moved."""
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.skipped_steps += 1
    engine._step_applied = False  # what was_step_applied() reports


def describe_optimizer(engine) -> str:
    """What the next update uses, read from the engine: lr, betas and weight decay of each param
    group, and DeepSpeed's gradient clipping (a log line after a resume)."""
    groups = torch_optimizer(engine).param_groups
    wd = "/".join(f"{g['weight_decay']:g}" for g in groups)
    betas = {tuple(g["betas"]) for g in groups}
    lrs = {g["lr"] for g in groups}
    return (
        f"lr {'/'.join(f'{lr:.6g}' for lr in sorted(lrs))} betas "
        f"{'/'.join(str(tuple(b)) for b in sorted(betas))} weight_decay {wd} "
        f"grad_clip {engine.gradient_clipping():g}"
    )


def save_engine(engine, directory: Path, tag: str) -> None:
    """Every rank writes its DeepSpeed shards of ``engine`` under ``directory/tag``."""
    engine.save_checkpoint(str(directory), tag=tag, save_latest=False)


def state_is_finite(engine) -> bool:
    """Whether the fp32 master weights and the optimizer state (Adam's moments) are finite on
    every rank: one all-reduce, one host sync.

    The masters are where DeepSpeed keeps them for each ZeRO stage: this rank's flat fp32
    partitions (stage 1/2 ``single_partition_of_fp32_groups``, stage 3
    ``fp32_partitioned_groups_flat``, which stage 3 puts into the base optimizer's param groups
    only during a step), the fp32 copies of a bf16/fp16 stage-0 wrapper (``fp32_groups``,
    ``fp32_groups_flat_partition``), or the module's own parameters (fp32 stage 0, where the
    base optimizer holds them). Each tensor's min and max are tested (``aminmax``: one pass, NaN
    propagates, inf is an extreme; 13x faster than a full ``isfinite`` on CPU; a norm would
    overflow to inf on large but finite weights).
    """
    opt = engine.optimizer
    base = torch_optimizer(engine)
    tensors = [p for g in base.param_groups for p in g["params"]]
    for name in (
        "single_partition_of_fp32_groups",
        "fp32_partitioned_groups_flat",
        "fp32_groups_flat_partition",
        "fp32_groups",
    ):
        for t in getattr(opt, name, None) or []:
            tensors.extend(t if isinstance(t, (list, tuple)) else [t])
    if not any(t.numel() for t in tensors):
        raise RuntimeError(f"cannot find the fp32 master weights of {type(opt).__name__}")
    tensors += [v for s in base.state.values() for v in s.values() if torch.is_tensor(v)]
    dev = device()
    extremes = [torch.zeros(1, device=dev)]
    seen: set[int] = set()
    for t in tensors:
        if id(t) not in seen and t.numel() and t.is_floating_point():
            seen.add(id(t))
            lo, hi = torch.aminmax(t.detach().reshape(-1))
            extremes.append(torch.stack([lo, hi]).float().to(dev))  # no sync: stays a tensor
    bad = (~torch.isfinite(torch.cat(extremes))).any().float()
    return all_reduce(bad, "max").item() == 0


def engine_safe_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoint files, allowed (and nothing
    else) when they are loaded with ``weights_only=True``.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real engine files of
    every ZeRO stage in fp32 and bf16 (DeepSpeed 0.19): the static loss scaler, the ZeRO stage
    enum and the fragment address dataclass. All three are plain data: building one runs no
    code beyond setting attributes (an int enum's lookup, a dataclass's fields).
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, every ``torch.load`` runs with ``weights_only=True`` whatever its caller
    asks, with only :func:`engine_safe_globals` allowed beyond torch's own types.

    DeepSpeed's loaders (its TorchCheckpointEngine, ``zero_to_fp32``) call
    ``torch.load(..., weights_only=False)``, which unpickles anything, and they offer no switch.
    torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that argument at each call (read per
    call, so setting it for the block is enough); ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is
    removed meanwhile (both set is an error in torch).
    """
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(engine_safe_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# What evav's config sets in each of the optimizer's param groups (a group's "step", which
# DeepSpeed's fused Adam keeps there, is progress, restored from the checkpoint).
_GROUP_SETTINGS = ("betas", "weight_decay", "eps", "initial_lr")


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO 1-3, bf16), whose ``param_groups``
    every stage's step reads (the wrappers' own ``param_groups`` are the same list)."""
    base = engine.optimizer
    while base is not None and not isinstance(base, torch.optim.Optimizer):
        base = getattr(base, "optimizer", None)
    if base is None:
        raise RuntimeError(f"cannot find the torch optimizer inside {type(engine.optimizer)}")
    return base


def load_engine(engine, directory: Path, tag: str, universal: bool = False) -> None:
    """Load ``directory/tag``; an error (never DeepSpeed's silent fresh start) when it fails.

    ``universal``: ``directory/tag`` is a universal checkpoint (:func:`to_universal`), loaded into
    any number of ranks: DeepSpeed's ``load_universal_checkpoint`` is switched on for this load
    only (it is read at load time alone, so the engine is built from the same config either way).

    Every file is unpickled with ``weights_only=True`` (:func:`weights_only_loads`): a planted
    pickle payload raises ``pickle.UnpicklingError`` instead of running.

    The optimizer keeps *this* run's settings: DeepSpeed restores the saved run's param groups
    (lr, betas, weight decay) and the schedule's base lrs with the moments, so the values
    ``build_engine`` put there from this run's config are taken first and written back after,
    the lr as this run's schedule at the saved step. The next update uses them (the resume
    contract, evav/resume.py, logs each change). Gradient clipping needs nothing: it is in
    DeepSpeed's config, built from this run's."""
    groups = torch_optimizer(engine).param_groups
    mine = [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in groups]
    sched = engine.lr_scheduler
    base_lrs = list(getattr(sched, "base_lrs", []))
    was = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        with weights_only_loads():
            path, _ = engine.load_checkpoint(
                str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    finally:
        engine._config.load_universal_checkpoint = was
    if universal:
        # ZeRO 3's universal load (DeepSpeed 0.19) puts one and the same `step` tensor into the
        # state of every sub group; torch's AdamW adds 1 to it in place, so each update would
        # count a step per sub group (the no-decay group's bias correction ran ahead: the first
        # resumed update differed). Each state gets its own copy.
        for s in torch_optimizer(engine).state.values():
            if torch.is_tensor(s.get("step")):
                s["step"] = s["step"].clone()
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")
    groups = torch_optimizer(engine).param_groups
    if len(groups) != len(mine):
        raise RuntimeError(
            f"checkpoint {directory / tag} has {len(groups)} param groups, this model {len(mine)}"
        )
    for group, settings in zip(groups, mine):
        group.update(settings)
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        sched.base_lrs = base_lrs  # the saved run's lr otherwise
        # The optimizer's lr is the saved run's: its schedule's value at the saved step. This run's
        # schedule may differ (a run extended with a larger `steps`), so the next update must use
        # this run's value at that step. Same schedule: the same float, so resume stays exact.
        for group, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def to_universal(directory: Path, tag: str, out: Path, workers: int = 1) -> None:
    """Convert the engine checkpoint ``directory/tag`` (ZeRO 1-3, any number of ranks) into a
    universal checkpoint ``out/tag`` that loads into any number of ranks (``load_engine(...,
    universal=True)``): DeepSpeed's ``ds_to_universal`` in this process (``workers`` > 1: that
    many processes extract the shards), its loads forced to ``weights_only``, its printing
    silenced. It also writes ``out/latest_universal`` (DeepSpeed's, never read: the tag is
    given). One process calls it; ``out`` should be a fresh folder (see checkpoint.py)."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(Path(directory) / tag),
        output_folder=str(Path(out) / tag),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        # evav's checkpoints carry no universal_checkpoint_info (DeepSpeed writes it for AutoTP
        # models only): pure data parallelism needs only its version key, which this adds
        inject_missing_state=True,
    )
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), weights_only_loads():
        ds_to_universal.main(args)


def destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def consolidated_state_dict(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of an engine checkpoint ``directory/tag`` (what the optimizer
    updates, not the module's bf16 copy), whole, for any ZeRO stage and precision.

    Works in a single process without a process group (evaluation, export). Where DeepSpeed 0.19
    keeps them:

    - ZeRO 1/2/3 (fp32 or bf16): each rank's flat fp32 partitions in its
      ``*_optim_states.pt``, merged by DeepSpeed's ``zero_to_fp32``;
    - ZeRO 1, bf16: DeepSpeed wraps it in its ``BF16_Optimizer`` (bf16 weights, fp32
      gradient accumulation), whose shards (``bf16_zero_pp_rank_*_optim_states.pt``, the name
      ZeRO 2/3 use with bf16 too, so the content tells them apart) ``zero_to_fp32`` refuses
      ("not a zero checkpoint"): merged here the same way (``_bf16_zero_masters``);
    - ZeRO 0, bf16: ``mp_rank_00_model_states.pt`` holds the module in bf16 and the state of
      DeepSpeed's wrapper for bf16 without ZeRO, with the fp32 copies per param group:
      ``FP16_Optimizer`` (with its fused Adam, on a GPU) one flat tensor per group,
      ``fp32_groups_flat``; ``FP16_UnfusedOptimizer`` (any other optimizer: torch's AdamW on
      CPU) one tensor per parameter, ``fp32_groups``. They are matched back to the module's
      parameter names in the order the engine's groups were built (``decay_split``), every
      shape checked;
    - ZeRO 0, fp32: the module itself in ``mp_rank_00_model_states.pt`` (its parameters are the
      ones the optimizer updates).
    """
    ckpt = Path(directory) / tag
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no engine checkpoint here")
    shards = sorted(ckpt.glob("*optim_states.pt"))
    if shards and _is_bf16_optimizer(shards[0]):
        sd = _bf16_zero_masters(ckpt)
    elif shards:
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # it prints a line per step; it calls torch.load(weights_only=False): forced to True
        with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    else:
        states = ckpt / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise FileNotFoundError(f"{ckpt}: neither ZeRO optimizer shards nor {states.name}")
        with weights_only_loads():
            saved = torch.load(states, map_location="cpu", weights_only=True)
        sd = saved["module"]
        opt = saved.get("optimizer") or {}
        masters = opt.get("fp32_groups_flat", opt.get("fp32_groups"))
        if masters is not None:
            buffers = set(saved.get("buffer_names") or ())
            sd = {**sd, **_unflatten_masters(sd, buffers, masters, ckpt)}
        elif any(v.is_floating_point() and v.dtype != torch.float32 for v in sd.values()):
            log.warning("%s: no fp32 master copy saved; its low-precision weights are used", states)
    return {k: v.float().contiguous() for k, v in sd.items()}


def _is_bf16_optimizer(shard: Path) -> bool:
    """Whether ``shard`` is a ``BF16_Optimizer`` one (ZeRO 1 with bf16): it records no ZeRO
    stage, as every ZeRO optimizer's does. Memory-mapped: only the keys are read."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    with weights_only_loads():
        sd = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
    return ZERO_STAGE not in sd[OPTIMIZER_STATE_DICT]


def _bf16_zero_masters(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 masters (and buffers) of a ``BF16_Optimizer`` checkpoint (ZeRO 1 with bf16):
    per param group, every rank's ``single_partition_of_fp32_groups`` concatenated in rank order
    is the group's parameters back to back (``param_shapes`` in the model states, in the
    group's order) and the alignment padding at the end (``group_paddings``, checked)."""
    from deepspeed.checkpoint.constants import (
        GROUP_PADDINGS,
        OPTIMIZER_STATE_DICT,
        PARTITION_COUNT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    states = ckpt / "mp_rank_00_model_states.pt"
    files = sorted(
        ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt"),
        key=lambda f: int(re.search(r"pp_rank_(\d+)_", f.name).group(1)),
    )
    with weights_only_loads():
        model = torch.load(states, map_location="cpu", weights_only=True)
        shards = [
            torch.load(f, map_location="cpu", weights_only=True)[OPTIMIZER_STATE_DICT]
            for f in files
        ]
    counts = [c for s in shards for c in torch.tensor(s[PARTITION_COUNT]).reshape(-1).tolist()]
    if any(c != len(files) for c in counts):  # one count per param group
        raise ValueError(f"{ckpt}: {len(files)} optimizer shards, saved by a different number")
    buffers = set(model.get("buffer_names") or ())
    out = {k: v for k, v in model["module"].items() if k in buffers}
    for i, shapes in enumerate(model["param_shapes"]):
        full = torch.cat([s[SINGLE_PARTITION_OF_FP32_GROUPS][i] for s in shards])
        sizes = [math.prod(shape) for shape in shapes.values()]
        padding = sum(s[GROUP_PADDINGS][i] for s in shards)
        if sum(sizes) + padding != full.numel():
            raise ValueError(
                f"{ckpt}: fp32 master group {i} holds {full.numel()} values, its parameters "
                f"{sum(sizes)} and padding {padding}"
            )
        for (name, shape), piece in zip(shapes.items(), full[: sum(sizes)].split(sizes)):
            out[name] = piece.view(tuple(shape)).clone()
    return out


def _unflatten_masters(
    module: dict[str, torch.Tensor], buffers: set[str], masters: list, where: Path
) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` (a saved state dict) from the ZeRO-0 wrapper's fp32 groups,
    in ``build_engine``'s group order (DeepSpeed drops a group without parameters): each group
    one flat tensor, its parameters concatenated, or a list of one tensor per parameter."""
    params = [(k, tuple(v.shape)) for k, v in module.items() if k not in buffers]
    groups = [g for g in decay_split([(item, item[1]) for item in params]) if g]
    if len(groups) != len(masters):
        raise ValueError(
            f"{where}: {len(masters)} fp32 master groups, the module makes {len(groups)}"
        )
    out = {}
    for group, master in zip(groups, masters):
        sizes = [math.prod(shape) for _, shape in group]
        if torch.is_tensor(master):
            if sum(sizes) != master.numel():
                raise ValueError(
                    f"{where}: an fp32 master group of {master.numel()} values, its "
                    f"parameters hold {sum(sizes)}"
                )
            master = master.detach().split(sizes)
        if [t.numel() for t in master] != sizes:
            raise ValueError(f"{where}: the fp32 master copies do not fit the module's shapes")
        for (name, shape), piece in zip(group, master):
            out[name] = piece.detach().reshape(shape).clone()
    return out
