"""Model init and export on real DeepSpeed engines (1 and 2 gloo processes, ZeRO 0-3, fp32 and
bf16): ``evav.distributed.build_model`` gives every rank the same initial weights before any
DeepSpeed broadcast, builds ZeRO-3 parameters partitioned (``zero.Init``), and
``tools/export.py`` writes exactly the fp32 master weights the optimizer held at save time.

One worker run per world size (``python -m torch.distributed.run ... -m tests.test_export``)
goes through every stage and precision: build, two training steps through the real loss
(MS-SSIM included), an evav checkpoint, the fp32 masters read from the live engine, then a
resume into a fresh engine and one more step on both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [(stage, prec) for stage in (0, 1, 2, 3) for prec in ("fp32", "bf16")]
STEPS = 2
# a tiny model: 16x16 frames, 4 patches of 8x8; every ZeRO-3 parameter partitioned (threshold 0)
TINY = dict(preset="debug", dim=32, depth=1, head_dim=16, height=16, width=16)
CLIP = (2, 3)  # micro batch, frames


def _name(stage: int, precision: str) -> str:
    return f"z{stage}-{precision}"


def _state_hash(named: dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(named):
        h.update(k.encode())
        h.update(named[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _whole(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (a ZeRO-3 one gathered), as fp32 copies."""
    import deepspeed

    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().float().clone() for n, p in params}


def _masters(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the live engine: DeepSpeed's ``safe_get_full_fp32_param``
    (ZeRO 1-3), the bf16 wrapper's flat fp32 copies (ZeRO 0 bf16: it sets no mapping) or the
    module's own parameters (ZeRO 0 fp32, where the optimizer updates them)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    flat = {}
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0 and hasattr(opt, "fp16_groups"):
        # bf16 without ZeRO: FP16_Optimizer (flat groups) or FP16_UnfusedOptimizer
        for params, master in zip(
            opt.fp16_groups, getattr(opt, "fp32_groups_flat", None) or opt.fp32_groups
        ):
            if torch.is_tensor(master):
                master = master.detach().split([p.numel() for p in params])
            for p, piece in zip(params, master):
                flat[id(p)] = piece.view(p.shape)
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # collective at ZeRO 3: every rank calls it
        if full is None:
            full = flat.get(id(p), p if p.dtype == torch.float32 else None)
        assert full is not None, n
        out[n] = full.detach().float().cpu().clone()
    return out


def _build(cfg, world: int, seed: int):
    from evav import distributed as dist
    from evav.model import build_model

    return dist.build_model(
        lambda: build_model(cfg.model),
        cfg.engine,
        cfg.optim,
        cfg.micro_batch,
        cfg.steps,
        world,
        seed,
    )


def _worker(out: Path) -> None:
    from evav import checkpoint
    from evav import distributed as dist
    from evav.config import dump_yaml
    from evav.distributed import EngineConfig, OptimConfig
    from evav.metrics import MetricsConfig, redacted_config
    from evav.model import ModelConfig, build_model, next_frame_loss
    from evav.resume import TrainState
    from evav.train import TrainConfig

    denv = dist.init(EngineConfig(backend="gloo"))
    B, T = CLIP
    report: dict = {}

    def batch(step: int):
        g = torch.Generator().manual_seed(1000 * step + denv.rank)
        return torch.rand(B, T, TINY["height"], TINY["width"], 3, generator=g)

    def train_step(engine, step: int) -> float:
        frames = batch(step)
        pred = engine(frames.to(dist.input_dtype(engine)))
        loss, _ = next_frame_loss(pred, frames, torch.ones(B, T, dtype=torch.bool))
        engine.backward(loss)
        engine.step()
        return float(loss)

    for stage, precision in CONFIGS:
        name = _name(stage, precision)
        extra = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        cfg = TrainConfig(
            run_dir=str(out / name),
            seed=0,
            steps=STEPS,
            micro_batch=B,
            model=ModelConfig(**TINY),
            engine=EngineConfig(
                zero_stage=stage,
                precision=precision,
                backend="gloo",
                extra=extra if stage == 3 else {},
            ),
            optim=OptimConfig(lr=1e-2, warmup_steps=1),
            metrics=MetricsConfig(enabled=False),
        )
        info: dict = {}

        # the rank-dependent seeds the trainer sets: build_model must not depend on them
        torch.manual_seed(17 + denv.rank)
        rng_before = torch.get_rng_state()
        model = _build(cfg, denv.world_size, cfg.seed)
        info["rng_restored"] = torch.equal(rng_before, torch.get_rng_state())
        plain = build_model(cfg.model)  # what each rank built before: its own seed's weights
        info["plain_hash"] = _state_hash(dict(plain.named_parameters()))
        init = _whole(model)
        info["init_hash"] = _state_hash(init)  # before DeepSpeed could broadcast
        info["init_hash_bf16"] = _state_hash({k: v.bfloat16() for k, v in init.items()})
        if stage == 3:
            params = list(model.parameters())
            info["ds_numel"] = sum(p.ds_numel for p in params)
            info["local_numel"] = sum(p.ds_tensor.numel() for p in params)
            info["module_numel"] = sum(p.numel() for p in params)  # the empty placeholders
            info["per_param"] = [[p.ds_numel, p.ds_tensor.numel()] for p in params]
        engine, _ = dist.build_engine(
            model, cfg.engine, cfg.optim, cfg.micro_batch, cfg.steps, denv.world_size
        )
        info["optimizer"] = type(engine.optimizer).__name__
        info["losses"] = [train_step(engine, s) for s in range(STEPS)]
        masters = _masters(engine)
        state = TrainState(
            step=STEPS, world_size=denv.world_size, render_hash="test", config=redacted_config(cfg)
        )
        path = checkpoint.save(
            engine, cfg.run_dir, STEPS, state, dump_yaml(redacted_config(cfg)), denv
        )
        module = _whole(engine.module)
        info["module_is_master"] = all(torch.equal(module[n], masters[n]) for n in masters)

        # resume: a fresh engine (other initial weights) loads the checkpoint, then both step
        engine2, _ = dist.build_engine(
            _build(cfg, denv.world_size, cfg.seed + 1),
            cfg.engine,
            cfg.optim,
            cfg.micro_batch,
            cfg.steps,
            denv.world_size,
        )
        checkpoint.load_engine(engine2, path)
        loaded = _masters(engine2)
        info["resumed_masters_equal"] = all(torch.equal(loaded[n], masters[n]) for n in masters)
        after = train_step(engine, STEPS), train_step(engine2, STEPS)
        a, b = _masters(engine), _masters(engine2)
        info["resumed_step_equal"] = after[0] == after[1] and all(
            torch.equal(a[n], b[n]) for n in a
        )
        gathered = dist.all_gather_objects(info)
        if denv.is_main:
            torch.save(masters, out / f"{name}.masters.pt")
            report[name] = {"path": str(path), "ranks": gathered}
        del engine, engine2
    if denv.is_main:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    dist.destroy()


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def trained(request, tmp_path_factory):
    from tools.mlflow_server import free_port

    world = request.param
    out = tmp_path_factory.mktemp(f"export-{world}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    cmd += ["--master_port", str(free_port()), "-m", "tests.test_export", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return world, out, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("stage, precision", CONFIGS, ids=[_name(*c) for c in CONFIGS])
def test_export_writes_the_fp32_master_weights_exactly(trained, stage, precision, tmp_path):
    from safetensors.torch import load_file

    from tools.export import export

    world, out, report = trained
    name = _name(stage, precision)
    exp = export(report[name]["path"], tmp_path / "export")
    got = load_file(str(exp / "model.safetensors"))
    want = torch.load(out / f"{name}.masters.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], want[k]), f"{name}: {k} differs from the fp32 master"
    rank0 = report[name]["ranks"][0]
    if precision == "bf16":  # the master is not the module's bf16 copy: the test can tell
        assert not rank0["module_is_master"]
        assert any(not torch.equal(v, v.bfloat16().float()) for v in want.values())
    else:
        assert rank0["module_is_master"]


@pytest.mark.parametrize("stage, precision", CONFIGS, ids=[_name(*c) for c in CONFIGS])
def test_ranks_build_the_same_initial_weights_and_keep_their_own_seeds(trained, stage, precision):
    world, _, report = trained
    ranks = report[_name(stage, precision)]["ranks"]
    assert len(ranks) == world
    assert len({r["init_hash"] for r in ranks}) == 1  # before any DeepSpeed broadcast
    assert all(r["rng_restored"] for r in ranks)  # the rank-dependent seeds, restored after
    if world > 1:  # without it each rank's own seed gave other weights
        assert len({r["plain_hash"] for r in ranks}) == world
    # the same weights at every stage, up to the engine's rounding: ZeRO 3 builds in the engine's
    # dtype (zero.Init), the others in fp32 (DeepSpeed rounds them when it wraps them)
    key = "init_hash_bf16" if precision == "bf16" else "init_hash"
    assert ranks[0][key] == report[_name(0, "fp32")]["ranks"][0][key]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_builds_parameters_partitioned(trained, precision):
    world, _, report = trained
    ranks = report[_name(3, precision)]["ranks"]
    total = ranks[0]["ds_numel"]
    for r in ranks:
        assert r["ds_numel"] == total and r["module_numel"] == 0
        for whole, local in r["per_param"]:  # each rank: its padded 1/world share of each
            assert local == -(-whole // world)
        assert total / world <= r["local_numel"] < total / world + len(r["per_param"])


@pytest.mark.parametrize("stage, precision", CONFIGS, ids=[_name(*c) for c in CONFIGS])
def test_training_and_resume_work_at_every_stage(trained, stage, precision):
    _, _, report = trained
    ranks = report[_name(stage, precision)]["ranks"]
    for r in ranks:
        assert all(0 < loss < 10 for loss in r["losses"])  # L1 + 1 - MS-SSIM, finite
        assert r["resumed_masters_equal"] and r["resumed_step_equal"]


def test_zero0_bf16_flat_fp32_groups_give_the_same_weights(trained, tmp_path):
    """On a GPU, DeepSpeed's fused Adam makes the bf16 ZeRO-0 wrapper ``FP16_Optimizer``, which
    saves one flat fp32 tensor per group (``fp32_groups_flat``); on CPU ``FP16_UnfusedOptimizer``
    saves one per parameter (``fp32_groups``). The CPU checkpoint rewritten the GPU's way gives
    the same weights."""
    import shutil

    from evav.distributed import consolidated_state_dict, weights_only_loads

    _, out, report = trained
    shutil.copytree(Path(report["z0-bf16"]["path"]) / "engine", tmp_path / "engine")
    f = tmp_path / "engine" / "mp_rank_00_model_states.pt"
    with weights_only_loads():
        sd = torch.load(f, weights_only=True)
    opt = sd["optimizer"]
    opt["fp32_groups_flat"] = [
        torch.cat([t.reshape(-1) for t in g]) for g in opt.pop("fp32_groups")
    ]
    torch.save(sd, f)
    got = consolidated_state_dict(tmp_path, "engine")
    want = torch.load(out / "z0-bf16.masters.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
