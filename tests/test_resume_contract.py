"""The resume contract and visible divergence (issue 15): real DeepSpeed engines through
`evav train` (1 and 2 CPU processes) on synthetic shards built here.

Resumes with other data under the same folder name (refused naming the data identity, then
accepted with resume_allow=[data]), another architecture, seed, batch and ZeRO stage (refused),
changed optimizer settings (applied: the next update uses them, in the param groups and the
schedule, at ZeRO 0 and, on 2 processes, ZeRO 1); the classification of every config key; the
train state through a real checkpoint with weights_only loading, and malformed ones; infinite
gradients with a finite loss (skipped, counted, logged, recorded and stopping the run at
max_skipped_steps, at ZeRO 0 in fp32, where evav detects them, and ZeRO 2 in bf16, where
DeepSpeed does); gradient accumulation that updates once per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evav import checkpoint, resume
from evav.data import DataConfig, Loader
from evav.distributed import DistEnv, consolidated_state_dict, weights_only_loads
from evav.errors import BadInputError
from evav.metrics import MetricsConfig, MetricsLogger, read_metrics
from evav.resume import TrainState
from evav.train import TrainConfig
from tests.test_train import REPO, losses, run_train

MODEL_STATES = "engine/mp_rank_00_model_states.pt"


def build_synthetic(out: Path, train_per_task: int) -> Path:
    cmd = [sys.executable, "-m", "evav.cli", "preprocess", "synthetic", "--out", str(out)]
    args = [f"train_per_task={train_per_task}", "val_per_task=8"]
    subprocess.run([*cmd, *args], check=True, cwd=REPO, capture_output=True)
    return out


@pytest.fixture(scope="module")
def data_a(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("a") / "synthetic", 40)


@pytest.fixture(scope="module")
def data_b(tmp_path_factory) -> Path:
    """Other data under the same folder name: the suite rebuilt with fewer samples per task."""
    return build_synthetic(tmp_path_factory.mktemp("b") / "synthetic", 30)


def ok(done) -> None:
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def base(data_a, tmp_path_factory) -> Path:
    """1 process, ZeRO 0, bf16: a checkpoint at step 2."""
    run = tmp_path_factory.mktemp("base") / "run"
    ok(run_train(run, data_a, "steps=2", "ckpt_every=2"))
    return run


@pytest.fixture(scope="module")
def base_fp32(data_a, tmp_path_factory) -> Path:
    """1 process, ZeRO 0, fp32 (exact weights to measure an update by): a checkpoint at step 2."""
    run = tmp_path_factory.mktemp("base32") / "run"
    ok(run_train(run, data_a, "steps=2", "ckpt_every=2", "engine.precision=fp32"))
    return run


def copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run that a refused resume must leave alone (the lock file aside)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# -- the classification -----------------------------------------------------------------------


def test_every_leaf_key_of_train_config_has_a_resume_class_and_no_rule_is_stale():
    leaves = resume.config_leaves(TrainConfig)
    assert "optim.betas" in leaves and "engine.extra" in leaves and "model.depth" in leaves
    missing = [k for k in leaves if resume.rule_for(k) is None]
    assert missing == [], f"add these to evav/resume.py RULES: {missing}"
    groups = {".".join(k.split(".")[:n]) for k in leaves for n in range(1, k.count(".") + 2)}
    stale = sorted(set(resume.RULES) - groups - set(resume.PSEUDO_KEYS))
    assert stale == [], f"RULES name keys that do not exist: {stale}"
    # the decisions the issue asks for
    refused = {k for k in resume.RULES if resume.RULES[k][0] == resume.REFUSED}
    assert {"model", "seed", "micro_batch", "engine.grad_accum_steps", "engine.zero_stage"} <= (
        refused
    )
    assert {"data.identity", "data.datasets", "render_hash", "data.weights"} <= refused
    applied = {k for k in resume.RULES if resume.RULES[k][0] == resume.APPLIED}
    for key in ("steps", "optim.lr", "optim.betas", "optim.weight_decay", "optim.grad_clip"):
        assert key in applied
    assert resume.rule_for("model.depth")[0] == "model"
    assert resume.rule_for("engine.extra.bf16.enabled")[0] == "engine.extra"
    assert resume.rule_for("data.identity.fsdd.splits.train")[0] == "data.identity"


@pytest.mark.parametrize(
    "entry, hint",
    [("modle", "did you mean 'model'?"), ("optim.lrr", "did you mean 'optim.lr'?"), ("", "")],
)
def test_a_resume_allow_entry_that_names_nothing_is_an_error(entry, hint):
    with pytest.raises(BadInputError) as e:
        resume.check_allow(TrainConfig(resume_allow=[entry]))
    assert e.value.path == "resume_allow" and f"{entry!r} is not a config key" in e.value.reason
    assert hint in e.value.reason
    for fine in (["data"], ["model", "seed"], ["data.identity.fsdd"], ["engine.extra.bf16"]):
        resume.check_allow(TrainConfig(resume_allow=fine))


# -- the train state ----------------------------------------------------------------------------


def test_train_state_round_trips_through_a_real_checkpoint_with_weights_only_loading(base, data_a):
    ck = checkpoint.step_dir(base, 2)
    plain = torch.load(ck / "train_state.pt", weights_only=True)  # no allow-list at all
    state = TrainState.from_dict(plain, ck / "train_state.pt")
    assert _tensor_equal(state.to_dict(), plain)
    assert (state.step, state.samples, state.world_size, state.skipped_steps) == (2, 8, 1, 0)
    loader = Loader(DataConfig(train=[str(data_a)], clip_frames=8), batch_size=4)
    assert state.data_identity == loader.identity()
    (ident,) = state.data_identity
    assert ident["builder"] == "synthetic" and ident["render_hash"] == loader.render_hash
    assert sorted(ident["splits"]) == ["train", "val"] and len(ident["digest"]) == 16
    assert state.config["optim"]["lr"] == 1e-3 and state.config["data"]["train"] == [str(data_a)]
    assert state.config["metrics"]["enabled"] is False and state.config["resume_allow"] == []
    assert state.loader[0]["slot"] == 8 and len(state.rng) == 1
    again = torch.load(_save_plain(state.to_dict(), ck.parent / "rt.pt"), weights_only=True)
    assert _tensor_equal(TrainState.from_dict(again, "rt.pt").to_dict(), state.to_dict())


def _save_plain(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _tensor_equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_tensor_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_tensor_equal(x, y) for x, y in zip(a, b))
    return a == b


MALFORMED = {
    "step-text": (lambda s: s.update(step="2"), "'step': \"2\" is not an integer >= 0"),
    "step-bool": (lambda s: s.update(step=True), "'step': true is not an integer >= 0"),
    "world-0": (lambda s: s.update(world_size=0), "'world_size': 0 is not an integer >= 1"),
    "loader-short": (lambda s: s.update(loader=[]), "'loader': not a list of 1 dicts"),
    "loader-fields": (lambda s: s["loader"][0].pop("counts"), "'loader[0]': not {slot, counts"),
    "rng-torch": (lambda s: s["rng"][0].update(torch=[1, 2]), "'rng[0]': 'torch' is not a uint8"),
    "rng-numpy": (
        lambda s: s["rng"][0].update(numpy=["MT19937", [1, 2], 0, 0, 0.0]),
        "'rng[0]': 'numpy' has no 624-word key",
    ),
    "identity": (
        lambda s: s["data_identity"][0].update(splits={"train": [3]}),
        "'data_identity[0]': 'splits' is not {split: [shard sha256, ...]}",
    ),
    "config": (lambda s: s.update(config=["lr", 1]), "'config': not a mapping"),
    "run-id": (lambda s: s.update(mlflow_run_id=7), "'mlflow_run_id': 7 is not a string"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_train_state_is_named_and_its_checkpoint_set_aside(base, tmp_path, name):
    change, message = MALFORMED[name]
    run = copy(base, tmp_path / "run")
    ck = checkpoint.step_dir(run, 2)
    state = torch.load(ck / "train_state.pt", weights_only=True)
    change(state)
    with pytest.raises(BadInputError) as e:
        TrainState.from_dict(state, ck / "train_state.pt")
    assert e.value.path == str(ck / "train_state.pt") and message in e.value.reason
    torch.save(state, ck / "train_state.pt")  # a tamperer rehashes the marker too
    marker = json.loads((ck / checkpoint.MARKER).read_text())
    data = (ck / "train_state.pt").read_bytes()
    for f in marker["files"]:
        if f["path"] == "train_state.pt":
            f.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ck / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint here verifies"):
        checkpoint.find_resume(run, DistEnv())  # no engine needed to find out
    (aside,) = checkpoint.set_aside_dirs(run)
    if name.startswith("step"):  # checkpoint.read_state's own check comes first
        message = "train_state.pt: not a train state (no integer 'step')"
    assert message in (aside / "SET_ASIDE").read_text()


# -- refused -------------------------------------------------------------------------------------


def test_other_data_under_the_same_folder_name_is_refused_then_accepted_with_resume_allow(
    base, data_a, data_b, tmp_path
):
    run = copy(base, tmp_path / "run")
    before = snapshot(run)
    done = run_train(run, data_b, "steps=3", "ckpt_every=1")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    err = done.stderr
    assert f"evav train: error: {checkpoint.step_dir(run, 2)}: resume refused, 1 change(s)" in err
    assert (
        "data.identity.synthetic.splits.train: 1 shard (" in err
        and "1 changed (refused: data identity: the shards hold other samples)" in err
    )
    assert "resume_allow=[data.identity]" in err and "resumed from" not in done.stdout
    assert f'data.train: ["{data_a}"] -> ["{data_b}"] (applied: paths only' in done.stdout
    assert snapshot(run) == before  # config.yaml byte for byte, no checkpoint, no metrics

    done = run_train(run, data_b, "steps=3", "ckpt_every=1", "resume_allow=[data]")
    ok(done)
    assert "resumed from" in done.stdout and "splits.train: 1 shard (" in done.stdout
    assert "(applied: data identity: the shards hold other samples; allowed by resume_allow)" in (
        done.stdout
    )
    assert 'resume_allow: [] -> ["data"] (applied' in done.stdout
    assert str(data_b) in (run / "config.yaml").read_text()
    state = checkpoint.read_state(checkpoint.step_dir(run, 3))  # the new data is recorded
    loader = Loader(DataConfig(train=[str(data_b)], clip_frames=8), batch_size=4)
    assert state["data_identity"] == loader.identity()
    assert sorted(losses(run)) == [1, 2, 3]


def test_another_architecture_seed_batch_or_zero_stage_is_refused(base, data_a, tmp_path):
    run = copy(base, tmp_path / "run")
    before = snapshot(run)
    extra = ["model.depth=2", "seed=1", "micro_batch=2", "engine.zero_stage=1", "optim.lr=2e-3"]
    done = run_train(run, data_a, "steps=3", *extra)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    err = done.stderr
    assert "resume refused, 4 change(s) would make this another run" in err
    for line in (
        "model.depth: null -> 2 (refused: the architecture",
        "seed: 0 -> 1 (refused: the model init and the data order",
        "micro_batch: 4 -> 2 (refused: the global batch size (changing it on resume: issue 16)",
        "engine.zero_stage: 0 -> 1 (refused: how the optimizer state is partitioned",
    ):
        assert line in err, line
    assert "optim.lr: 0.001 -> 0.002 (applied" in done.stdout and "optim.lr" not in err
    assert "resume_allow=[engine.zero_stage,micro_batch,model,seed]" in err
    assert snapshot(run) == before


# -- applied -------------------------------------------------------------------------------------


def update_norm(run: Path, a: int, b: int) -> float:
    wa, wb = (consolidated_state_dict(checkpoint.step_dir(run, s), "engine") for s in (a, b))
    return float(torch.stack([(wb[k] - wa[k]).double().norm() for k in wa]).norm())


def test_a_changed_lr_is_the_first_resumed_update_s_lr(base_fp32, data_a, tmp_path):
    """The same checkpoint resumed twice, with lr and with 10 lr: AdamW's update is linear in the
    lr (the moments and the data are the same), so update 3 is 10 times larger (before the fix
    DeepSpeed restored the saved lr and both updates were equal)."""
    same, tenfold = copy(base_fp32, tmp_path / "same"), copy(base_fp32, tmp_path / "ten")
    args = ["steps=3", "ckpt_every=1", "keep_last=4", "engine.precision=fp32"]
    ok(run_train(same, data_a, *args))
    done = run_train(tenfold, data_a, *args, "optim.lr=1e-2")
    ok(done)
    assert "optim.lr: 0.001 -> 0.01 (applied: written into the optimizer" in done.stdout
    ratio = update_norm(tenfold, 2, 3) / update_norm(same, 2, 3)
    assert ratio == pytest.approx(10.0, rel=1e-3)
    lr_same = {r["step"]: r["train/lr"] for r in read_metrics(same) if "train/lr" in r}
    lr_ten = {r["step"]: r["train/lr"] for r in read_metrics(tenfold) if "train/lr" in r}
    assert lr_ten[3] == pytest.approx(10 * lr_same[3], rel=1e-12)  # the schedule's base too


def optimizer_groups(ck: Path, rel: str) -> list[dict]:
    with weights_only_loads():
        sd = torch.load(ck / rel, map_location="cpu", weights_only=True)
    opt = sd["optimizer"] if "optimizer" in sd else sd
    while "param_groups" not in opt:  # DeepSpeed's wrappers nest the torch optimizer's state
        opt = opt.get("base_optimizer_state") or opt["optimizer_state_dict"]
    return [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]


NEW_OPTIM = [
    "optim.lr=5e-3",
    "optim.betas=[0.8,0.9]",
    "optim.weight_decay=0.2",
    "optim.grad_clip=0.5",
]


def check_new_optimizer(run: Path, rels: list[str]) -> None:
    ck = checkpoint.step_dir(run, 3)
    for rel in rels:
        decay, no_decay = optimizer_groups(ck, rel)
        for g in (decay, no_decay):
            assert tuple(g["betas"]) == (0.8, 0.9) and g["initial_lr"] == 5e-3, rel
            assert g["lr"] == pytest.approx(5e-3 * 4 / 5)  # warmup 5: the lr for update 4
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0), rel
    with weights_only_loads():
        states = torch.load(ck / MODEL_STATES, map_location="cpu", weights_only=True)
    assert states["lr_scheduler"]["base_lrs"] == [5e-3, 5e-3]
    assert states["ds_config"]["gradient_clipping"] == 0.5  # the engine's config: this run's


def test_changed_optimizer_settings_are_written_into_the_optimizer(base, data_a, tmp_path):
    run = copy(base, tmp_path / "run")
    done = run_train(run, data_a, "steps=3", "ckpt_every=1", *NEW_OPTIM)
    ok(done)
    out = done.stdout
    assert "resume from" in out and "7 change(s)" in out  # and run_dir (a copy), steps, ckpt_every
    assert "optim.betas: [0.9, 0.95] -> [0.8, 0.9] (applied" in out
    assert "optim.weight_decay: 0.05 -> 0.2 (applied" in out
    assert "optim.grad_clip: 1.0 -> 0.5 (applied: DeepSpeed's clipping" in out
    # read back from the engine after loading: what update 3 used
    assert "optimizer after resume: lr 0.003 betas (0.8, 0.9) weight_decay 0.2/0 grad_clip 0.5" in (
        out
    )
    check_new_optimizer(run, [MODEL_STATES])


def test_two_processes_refuse_other_data_and_apply_new_optimizer_settings_at_zero_1(
    data_a, data_b, tmp_path
):
    run = tmp_path / "run"
    args = ["ckpt_every=1", "engine.zero_stage=1"]
    ok(run_train(run, data_a, "steps=2", *args, nproc=2))
    before = snapshot(run)
    done = run_train(run, data_b, "steps=3", *args, nproc=2)
    assert done.returncode != 0, done.stdout[-3000:]
    assert done.stderr.count("resume refused, 1 change(s)") == 2  # both ranks, the same verdict
    assert snapshot(run) == before
    done = run_train(run, data_a, "steps=3", *args, *NEW_OPTIM, nproc=2)
    ok(done)
    assert "resumed from" in done.stdout and "optim.lr: 0.001 -> 0.005 (applied" in done.stdout
    shards = [f"engine/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    check_new_optimizer(run, shards)


# -- divergence made visible ------------------------------------------------------------------


def test_infinite_gradients_with_a_finite_loss_skip_the_update_visibly_fp32_zero_0(
    data_a, tmp_path
):
    """fp32 at ZeRO 0: DeepSpeed has no overflow check there (it would apply a NaN update);
    evav's catches it, skips the update, and the run goes on to a finite checkpoint."""
    run = tmp_path / "run"
    env = {"EVAV_FAULT": "inf_grad:3"}
    done = run_train(run, data_a, "steps=4", "ckpt_every=4", "engine.precision=fp32", env=env)
    ok(done)
    assert "step 3: non-finite gradients (norm inf) with a finite loss " in done.stdout
    assert "update skipped (skipped steps 1/10)" in done.stdout
    assert "step 4/4 | " in done.stdout and "skipped samples 0 steps 1 |" in done.stdout
    records = read_metrics(run)
    skip = [r for r in records if "nonfinite" in r]
    assert len(skip) == 1 and skip[0]["step"] == 3 and skip[0]["train/skipped_steps"] == 1
    assert skip[0]["train/grad_norm"] is None and skip[0]["nonfinite"] == {"train/grad_norm": "inf"}
    assert sorted(losses(run)) == [1, 2, 3, 4]  # the skipped attempt is no step
    assert records[-1]["train/skipped_steps"] == 1 and records[-1]["step"] == 4
    state = checkpoint.read_state(checkpoint.step_dir(run, 4))  # finite, so committed
    assert state["skipped_steps"] == 1 and state["samples"] == 16  # 4 applied updates


def test_infinite_gradients_stop_the_run_at_max_skipped_steps_zero_2_bf16(data_a, tmp_path):
    """bf16 at ZeRO 2: DeepSpeed skips the update itself; evav counts it like a NaN loss."""
    run = tmp_path / "run"
    extra = ["steps=6", "ckpt_every=2", "max_skipped_steps=1", "engine.zero_stage=2"]
    done = run_train(run, data_a, *extra, env={"EVAV_FAULT": "inf_grad:3"})
    assert done.returncode != 0
    good = checkpoint.step_dir(run, 2)
    assert "NonFiniteLossError: 1 skipped steps" in done.stderr
    assert "limit max_skipped_steps=1), the last at step 3: non-finite gradients (norm inf)" in (
        done.stderr
    )
    assert f"the last good checkpoint is {good}" in done.stderr
    (skip,) = [r for r in read_metrics(run) if "nonfinite" in r]
    assert skip["step"] == 3 and skip["train/skipped_steps"] == 1
    assert skip["nonfinite"] == {"train/grad_norm": "inf"}


def test_non_finite_metrics_are_kept_in_jsonl_and_sent_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    m = MetricsLogger(tmp_path / "run", MetricsConfig(tracking_uri=uri, close_timeout_s=60))
    m.log({"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5, "e": None}, 3)
    m.close()
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(line)  # strict JSON: no NaN or Infinity tokens
    assert "NaN" not in line and "Infinity" not in line
    assert {k: rec[k] for k in "abcd"} == {"a": None, "b": None, "c": None, "d": 1.5}
    assert rec["nonfinite"] == {"a": "nan", "b": "inf", "c": "-inf"} and "e" not in rec
    client = MlflowClient(uri)
    run_id = m.run_id
    got = {k: client.get_metric_history(run_id, k)[0].value for k in "abcd"}
    assert got["a"] != got["a"] and got["b"] > 1e308 and got["c"] < -1e308 and got["d"] == 1.5


def test_gradient_accumulation_updates_once_per_step(data_a, tmp_path):
    """engine.step() after every micro-batch (DeepSpeed counts them there): the schedule moves
    every step (warmup: the lr rises each step; before, every other step was no update)."""
    run = tmp_path / "run"
    ok(run_train(run, data_a, "steps=3", "ckpt_every=3", "engine.grad_accum_steps=2"))
    lr = [r["train/lr"] for r in read_metrics(run) if "train/lr" in r]
    assert lr == pytest.approx([4e-4, 6e-4, 8e-4])  # lr 1e-3, warmup 5: (s + 1) / 5 after update s
    with weights_only_loads():
        states = torch.load(
            checkpoint.step_dir(run, 3) / MODEL_STATES, map_location="cpu", weights_only=True
        )
    assert states["global_steps"] == 3 and states["skipped_steps"] == 0


# -- the comparison without training -----------------------------------------------------------


def test_a_checkpoint_from_before_the_contract_compares_its_config_yaml(base, caplog):
    """No config and no data identity in the train state (an older evav): config.yaml is
    compared, the data by names and render hash, with a warning; not refused."""
    ck = checkpoint.step_dir(base, 2)
    saved = TrainState.from_dict(checkpoint.read_state(ck), ck)
    now = dataclasses.replace(saved)
    legacy = dataclasses.replace(saved, config=None, data_identity=None)
    now.config = json.loads(json.dumps(saved.config))
    now.config["optim"]["lr"] = 0.01
    cfg = TrainConfig()
    with caplog.at_level(logging.WARNING, logger="evav.resume"):
        changes = resume.compare(legacy, now, cfg, ck)
    assert [c.line() for c in changes] == [
        "optim.lr: 0.001 -> 0.01 (applied: written into the optimizer and its schedule before "
        "the next update)"
    ]
    assert "has no data identity (written before the resume contract)" in caplog.text
    resume.enforce(changes, ck)  # accepted


def test_keys_an_older_config_lacks_compare_as_defaults_and_removed_keys_are_named(base, caplog):
    ck = checkpoint.step_dir(base, 2)
    saved = TrainState.from_dict(checkpoint.read_state(ck), ck)
    now = dataclasses.replace(saved, config=json.loads(json.dumps(saved.config)))
    old = json.loads(json.dumps(saved.config))
    del old["resume_allow"], old["data"]["max_bad_in_a_row"]  # keys added since (defaults)
    old["data"]["shuffle_buffer"] = 64  # a key removed since
    old["model"]["preset"] = "debug\n\x1b[31mred"  # shown escaped, one line
    saved.config = old
    with caplog.at_level(logging.WARNING, logger="evav.resume"):
        changes = resume.compare(saved, now, TrainConfig(), ck)
    assert [c.key for c in changes] == ["model.preset"] and changes[0].refused
    assert changes[0].saved == '"debug\\n\\u001b[31mred"' and "\n" not in changes[0].line()
    assert "data.shuffle_buffer in the checkpoint's config is no longer a key" in caplog.text
    with pytest.raises(resume.ResumeRefusedError, match="resume_allow=\\[model\\]"):
        resume.enforce(changes, ck)
    allowed = resume.compare(saved, now, TrainConfig(resume_allow=["model.preset"]), ck)
    assert not allowed[0].refused and "allowed by resume_allow" in allowed[0].why


def test_a_changed_render_hash_or_dataset_list_is_refused_and_val_only_changes_are_named(base):
    ck = checkpoint.step_dir(base, 2)
    saved = TrainState.from_dict(checkpoint.read_state(ck), ck)
    ident = json.loads(json.dumps(saved.data_identity))
    ident[0]["splits"]["val"] = ident[0]["splits"]["val"] + ["0" * 64]
    ident[0]["digest"] = resume.identity_digest(ident[0])
    now = dataclasses.replace(saved, render_hash="f" * 64, data_identity=ident)
    changes = {c.key: c for c in resume.compare(saved, now, TrainConfig(), ck)}
    assert set(changes) == {"render_hash", "data.identity.synthetic.splits.val"}
    assert (
        changes["render_hash"].refused and not changes["data.identity.synthetic.splits.val"].refused
    )
    assert changes["data.identity.synthetic.splits.val"].now.startswith("2 shards (")
    renamed = [{**ident[0], "name": "other"}]
    now = dataclasses.replace(saved, data_identity=renamed)
    (c,) = resume.compare(saved, now, TrainConfig(), ck)
    assert c.line().startswith('data.datasets: ["synthetic"] -> ["other"] (refused')
