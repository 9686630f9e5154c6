"""Elastic resume (issue 16): a run checkpointed on N ranks resumes on M ranks, real DeepSpeed
engines over gloo through `evav train` (1 and 2 CPU processes) on synthetic shards.

2 -> 1 -> 2 ranks at ZeRO 1, 2 and 3 (fp32): each world size change converts the checkpoint to
a universal one (step_N/universal/, its own marker), engine.grad_accum_steps adapts so the global
batch stays 8, the losses follow an uninterrupted 2-rank run within LOSS_RTOL, and the samples
consumed over the three runs are exactly the uninterrupted run's, none repeated. A world size
that cannot keep the global batch is refused with the reason (exit status 2) unless
resume_allow names world_size. The conversion is made once: reused when its marker verifies,
made again when it does not. Sample keys are recorded by running `evav train` through this
module (``python -m tests.test_elastic``), which wraps the loader's ``Batches.__next__``: no
hook in evav itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evav import checkpoint
from evav.train import TrainConfig
from tests.test_resume_contract import data_a, ok, snapshot  # noqa: F401  (data_a: a fixture)
from tests.test_train import ARGS, REPO, losses
from tools.mlflow_server import free_port

# fp32, the same global batch: only the order of the gradient sums differs (2 ranks' all-reduce
# against 1 rank's accumulation of 2 micro-batches): uninterrupted runs of each ZeRO stage on 1
# and 2 ranks differ by at most 2e-7 here, and so do these resumed ones
LOSS_RTOL = 1e-5
KEYS_ENV = "EVAV_TEST_KEYS"  # set: each rank appends the keys it consumes to $EVAV_TEST_KEYS.RANK


def train(run_dir: Path, data: Path, nproc: int, *extra: str, keys: Path | None = None):
    """`evav train` (through this module when ``keys``: the consumed sample keys are recorded)."""
    mod = "tests.test_elastic" if keys else "evav.cli"
    cmd = [*ARGS, f"data.train=[{data}]", f"run_dir={run_dir}", "metrics.enabled=false", *extra]
    launch = [sys.executable, "-m"]
    if nproc > 1:
        launch += ["torch.distributed.run", "--nproc_per_node", str(nproc)]
        launch += ["--master_port", str(free_port()), "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if keys:
        env[KEYS_ENV] = str(keys)
    return subprocess.run(
        [*launch, mod, "train", *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def consumed(keys: Path) -> list[str]:
    """Every sample key consumed by every rank of every run that recorded into ``keys``."""
    out = []
    for f in sorted(keys.parent.glob(keys.name + ".*")):
        out += [k for k in f.read_text().split() if k]
    return out


@pytest.fixture(scope="module")
def reference(data_a, tmp_path_factory):  # noqa: F811
    """An uninterrupted 2-rank run of 6 steps (ZeRO 0, fp32): its losses and consumed keys."""
    run = tmp_path_factory.mktemp("ref") / "run"
    keys = run.parent / "keys"
    ok(train(run, data_a, 2, "steps=6", "ckpt_every=0", "engine.precision=fp32", keys=keys))
    return losses(run), consumed(keys)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_on_2_then_1_then_2_ranks_keeps_the_batch_losses_and_data_order(
    data_a,  # noqa: F811
    reference,
    tmp_path,
    stage,
):
    run, keys = tmp_path / "run", tmp_path / "keys"
    args = [f"engine.zero_stage={stage}", "engine.precision=fp32", "ckpt_every=2"]
    ok(train(run, data_a, 2, "steps=2", *args, keys=keys))
    one = train(run, data_a, 1, "steps=4", *args, keys=keys)
    ok(one)
    assert "world size 2 -> 1: engine.grad_accum_steps 1 -> 2 keeps the global batch of 8" in (
        one.stdout
    )
    step2 = checkpoint.step_dir(run, 2)
    assert (
        f"converted {step2} (ZeRO {stage}, 2 ranks) to a universal checkpoint for 1 rank in "
        in one.stdout
    )
    two = train(run, data_a, 2, "steps=6", *args, keys=keys)
    ok(two)
    assert "world size 1 -> 2: engine.grad_accum_steps 2 -> 1 keeps the global batch of 8" in (
        two.stdout
    )
    step4 = checkpoint.step_dir(run, 4)
    assert f"converted {step4} (ZeRO {stage}, 1 rank) to a universal checkpoint for 2 ranks" in (
        two.stdout
    )
    for line in (one.stdout + two.stdout).splitlines():
        if "to a universal checkpoint" in line:
            print(line)  # the conversion times, for the report (pytest -s)

    # the losses continue the uninterrupted run's
    ref_losses, ref_keys = reference
    got = losses(run)
    assert sorted(got) == sorted(ref_losses) == [1, 2, 3, 4, 5, 6]
    worst = max(abs(got[s] / ref_losses[s] - 1) for s in got)
    print(f"ZeRO {stage}: largest relative loss difference {worst:.2g}")
    for s in got:
        assert got[s] == pytest.approx(ref_losses[s], rel=LOSS_RTOL), (s, got, ref_losses)
    # the same samples, none lost or repeated: 6 steps x a global batch of 8
    keys_seen = consumed(keys)
    assert len(keys_seen) == len(set(keys_seen)) == 48
    assert sorted(keys_seen) == sorted(ref_keys)
    # the checkpoints still verify, the universal conversion verifies by its own marker
    assert checkpoint.verify(step4).ok
    assert checkpoint.verify_universal(step4 / checkpoint.UNIVERSAL).ok
    state = checkpoint.read_state(checkpoint.step_dir(run, 6))
    assert state["world_size"] == 2 and state["grad_accum_steps"] == 1


def test_a_world_size_that_cannot_keep_the_global_batch_is_refused_with_the_reason(
    data_a,  # noqa: F811
    tmp_path,
):
    run = tmp_path / "run"
    ok(train(run, data_a, 1, "steps=1", "ckpt_every=1"))  # global batch 4: 1 rank x 4 x 1
    before = snapshot(run)
    done = train(run, data_a, 2, "steps=2")
    # each rank exits with status 2 (torchrun itself says 1)
    assert done.returncode != 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr
    assert done.stderr.count("resume refused, 1 change(s)") == 2  # both ranks, the same verdict
    assert (
        "world_size: 1 -> 2 (refused: the global batch of 4 (micro_batch 4 x "
        "engine.grad_accum_steps 1 x 1 ranks) is not micro_batch 4 x 2 ranks x any "
        "engine.grad_accum_steps" in done.stderr
    )
    assert "resume_allow=[world_size]" in done.stderr
    assert snapshot(run) == before
    done = train(run, data_a, 2, "steps=2", "resume_allow=[world_size]")
    ok(done)
    assert "allowed by resume_allow, the global batch changes to 8" in done.stdout
    assert "resumed from" in done.stdout


def test_the_universal_conversion_is_made_once_and_made_again_when_it_fails_verification(
    data_a,  # noqa: F811
    tmp_path,
    caplog,
):
    run = tmp_path / "run"
    ok(train(run, data_a, 2, "steps=1", "ckpt_every=1", "engine.zero_stage=1"))
    step = checkpoint.step_dir(run, 1)
    (step / "universal.tmp-999").mkdir()  # a conversion killed before its rename
    caplog.set_level("INFO", "evav.checkpoint")
    out = checkpoint.universal(step, 1, 2, 1)
    assert out == step / "universal" / "engine" and (out / "zero" / "optimizer_state.pt").is_file()
    assert not (step / "universal.tmp-999").exists()
    assert f"converted {step} (ZeRO 1, 2 ranks) to a universal checkpoint for 1 rank" in caplog.text
    marker = json.loads((step / "universal" / "COMPLETE").read_text())
    assert marker["source_world_size"] == 2 and marker["zero_stage"] == 1
    assert checkpoint.verify(step).ok  # universal/ is outside the step's own marker
    caplog.clear()
    checkpoint._verified.clear()  # as a new process
    checkpoint.universal(step, 1, 2, 1)
    assert "reusing" in caplog.text and "converted" not in caplog.text
    victim = next((out / "zero").rglob("fp32.pt"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, another sha256
    checkpoint._verified.clear()
    caplog.clear()
    checkpoint.universal(step, 1, 2, 1)
    assert "fails verification" in caplog.text and "converted" in caplog.text
    assert checkpoint.verify_universal(step / "universal").ok
    shutil.rmtree(step)


def test_the_batch_plan_keeps_an_adapted_batch_when_the_world_size_stays():
    """After 2 -> 1 ranks (grad_accum_steps adapted 1 -> 2), a rerun on 1 rank keeps 2 steps,
    a rerun on 2 ranks goes back to 1; a batch the user changes is the user's."""
    from evav import resume
    from evav.config import to_dict

    cfg = TrainConfig(micro_batch=4)
    saved = resume.TrainState(world_size=1, config=to_dict(cfg), grad_accum_steps=2)
    plan = resume.plan_batch(saved, cfg, 1, Path("x"))
    assert (plan.grad_accum_steps, plan.global_batch, plan.refused) == (2, 8, "")
    assert "keeps the global batch of 8, as adapted" in plan.note
    plan = resume.plan_batch(saved, cfg, 2, Path("x"))
    assert plan.grad_accum_steps == 1 and plan.note.startswith("world size 1 -> 2")
    assert resume.plan_batch(saved, cfg, 8, Path("x")).refused  # 8 / (4 x 8): no
    cfg.engine.grad_accum_steps = 4
    plan = resume.plan_batch(saved, cfg, 1, Path("x"))
    assert plan.grad_accum_steps == 4 and not plan.kept and not plan.refused


if __name__ == "__main__":  # `evav train` recording the sample keys each rank consumes
    from evav import cli
    from evav.data import loader as _loader

    _next = _loader.Batches.__next__
    _out = Path(f"{os.environ[KEYS_ENV]}.{os.environ.get('RANK', '0')}.{os.getpid()}")

    def _recording_next(self):
        batch = _next(self)
        with open(_out, "a") as f:
            f.write("".join(f"{t}/{k}\n" for t, k in zip(batch["task"], batch["key"]) if k))
        return batch

    _loader.Batches.__next__ = _recording_next
    sys.exit(cli.main())
