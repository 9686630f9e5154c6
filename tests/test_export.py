"""Model init and export on real DeepSpeed engines (1 and 2 gloo processes, ZeRO 0-3, fp32 and
bf16): ``evav.distributed.build_model`` gives every rank the same initial weights before any
DeepSpeed broadcast, builds ZeRO-3 parameters partitioned (``zero.Init``), and ``evav export``
(evav/export.py) writes exactly the fp32 master weights the optimizer held at save time.

One worker run per world size (``python -m torch.distributed.run ... -m tests.test_export``)
goes through every stage and precision: build, two training steps through the real loss
(MS-SSIM included), an evav checkpoint, the fp32 masters read from the live engine, then a
resume into a fresh engine and one more step on both.

The export folder itself (``finished_run``: a debug model trained 4 steps at ZeRO 2 on
synthetic shards, then evaluated): self-describing (weights, config, render spec, model card),
mode 0644, never visible half written, and loaded by ``evav eval``, ``evav generate`` and
``load_checkpoint`` after the run directory is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
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

    from evav.export import export

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


# -- the export folder -------------------------------------------------------------------------

PER_TASK = 6  # evaluated samples per task
EXPORT_FILES = {"model.safetensors", "config.yaml", "render_spec.yaml", "export.json", "README.md"}


def evav(*args, check=True, **kw):
    done = subprocess.run(
        [sys.executable, "-m", "evav.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kw,
    )
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A debug model trained 4 steps (ZeRO 2, MLflow in the embedded SQLite store), then
    evaluated: (root, shards, run, results path). Shared with tests/test_status.py."""
    root = tmp_path_factory.mktemp("finished")
    shards = root / "synthetic"
    evav("preprocess", "synthetic", "--out", shards, "train_per_task=24", "val_per_task=8")
    run = root / "run"
    evav(
        "train",
        "configs/debug.yaml",
        f"data.train=[{shards}]",
        f"run_dir={run}",
        "steps=4",
        "micro_batch=4",
        "log_every=1",
        "val_every=0",
        "ckpt_every=2",
        "engine.zero_stage=2",
    )
    evav("eval", run, "--data", shards, "--limit", PER_TASK, "--no-report", "--quiet")
    (results,) = [p for p in (run / "eval").rglob("step_00000004.json")]
    return root, shards, run, results


def test_export_is_self_describing_and_loads_without_the_run(finished_run, tmp_path):
    from safetensors.torch import load_file

    from evav.eval.load import load_checkpoint
    from evav.manifest import load_manifest

    root, shards, run, results_path = finished_run
    copy = tmp_path / "copy" / "run"  # exported from a copy, which is then deleted
    shutil.copytree(run, copy)
    exp = tmp_path / "exports" / "tiny"
    done = evav("export", copy, "--out", exp)
    assert f"{exp}: step 4, " in done.stdout and "preset debug" in done.stdout
    assert {p.name for p in exp.iterdir()} == EXPORT_FILES
    assert [p.name for p in exp.parent.iterdir()] == ["tiny"]  # no temporary folder left
    assert stat.S_IMODE(exp.stat().st_mode) == 0o755
    for p in exp.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name

    meta = json.loads((exp / "export.json").read_text())
    weights = load_file(str(exp / "model.safetensors"))
    params = sum(v.numel() for v in weights.values())
    manifest = load_manifest(shards)
    counts = {split: s.samples for split, s in manifest.splits.items()}
    results = json.loads(results_path.read_text())
    assert meta["step"] == 4 and meta["steps_configured"] == 4 and meta["preset"] == "debug"
    assert meta["parameters"] == params and meta["samples_trained"] == 4 * 4
    assert meta["source"] == str(copy / "checkpoints" / "step_00000004")
    assert meta["mlflow_run_id"] == (run / "mlflow_run_id").read_text().strip()
    assert meta["data"] == [
        {"dir": str(shards), "builder": "synthetic", "render_hash": meta["render_hash"]}
        | {"samples": counts}
    ]
    (ev,) = meta["eval"]
    assert ev["step"] == 4 and ev["split"] == results["split"]
    assert ev["tasks"]["count"]["value"] == results["tasks"]["count"]["accuracy"]
    assert ev["tasks"]["next"]["value"] == results["tasks"]["next"]["psnr"]

    card = (exp / "README.md").read_text()
    for text in [
        "preset `debug`",
        f"| parameters | {params:,} |",
        "| trained | 4 of 4 configured steps (16 samples,",
        f"| `{shards}` | synthetic | train {counts['train']}, val {counts['val']} |",
        f"`{copy / 'checkpoints' / 'step_00000004'}`",
        f"| count | classification | {PER_TASK} | accuracy | "
        f"{results['tasks']['count']['accuracy']:.4f} |",
        "from evav.eval.load import load_checkpoint",
        "evav eval tiny --data",
    ]:
        assert text in card, text

    shutil.rmtree(copy.parent)  # the run is gone: the export stands alone
    loaded = load_checkpoint(exp)
    assert loaded.step == 4 and loaded.path == exp
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    common = ["--data", shards, "--limit", PER_TASK, "--no-mlflow", "--no-report", "--quiet"]
    evav("eval", exp, "--out", tmp_path / "e.json", *common)
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["tasks"] == results["tasks"] and e["predictions"] == results["predictions"]
    # generate from the export: 5 prompt frames ("add" task, 3 words, separator) + 1 answer,
    # rendered with the export's render_spec.yaml
    gen = evav(
        "generate", exp, "--task", "add", "--input", "two plus two", "--out", tmp_path / "g.png"
    )
    assert "5 prompt frames + 1 generated" in gen.stdout and (tmp_path / "g.png").is_file()


def test_export_over_an_export_needs_force_and_is_never_half_visible(finished_run, tmp_path):
    _, _, run, _ = finished_run
    exp = tmp_path / "export"
    evav("export", run / "checkpoints" / "step_00000002", "--out", exp)
    assert json.loads((exp / "export.json").read_text())["step"] == 2
    before = (exp / "model.safetensors").read_bytes()
    again = evav("export", run, "--out", exp, check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    assert again.stderr.count("\n") == 1, again.stderr  # one line, no traceback
    assert (exp / "model.safetensors").read_bytes() == before

    # replaced with --force while another thread keeps looking: every listing it sees is a
    # whole export (the old one or the new one), never a part of one
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append(frozenset(p.name for p in exp.iterdir()))
            except FileNotFoundError:
                seen.append(None)  # between the two renames

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        evav("export", run, "--out", exp, "--force")
    finally:
        stop.set()
        watcher.join()
    assert len(seen) > 10 and {s for s in seen if s is not None} == {frozenset(EXPORT_FILES)}
    assert json.loads((exp / "export.json").read_text())["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_errors_are_one_line(finished_run, tmp_path):
    _, _, run, _ = finished_run
    missing = evav("export", tmp_path / "nope", "--out", tmp_path / "x", check=False)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    assert missing.stderr.startswith("evav export: error: ") and "Traceback" not in missing.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    bad = evav("export", plain, "--out", tmp_path / "x", check=False)
    assert bad.returncode == 2 and "not a run directory, a checkpoint" in bad.stderr
    assert not (tmp_path / "x").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
    # the old entry point still works, and says the same
    old = subprocess.run(
        [sys.executable, "tools/export.py", str(run), "--out", str(tmp_path / "old")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert old.returncode == 0, old.stderr[-2000:]
    assert {p.name for p in (tmp_path / "old").iterdir()} == EXPORT_FILES


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
