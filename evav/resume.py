"""The resume contract: what a checkpoint must share with the run that continues it.

    saved = TrainState.from_dict(plain, where)            # checkpoint.find_resume does this
    changes = compare(saved, now, cfg, checkpoint_dir)    # every difference, each classified
    enforce(changes, checkpoint_dir)                      # logs them; refuses before training

A checkpoint's train state (``TrainState``) holds, beside the progress (step, samples, frames,
skipped steps, every rank's loader and RNG states), what the run *was*: its resolved config
(redacted of credentials, ``evav.metrics.redacted_config``), the identity of its data (per
dataset: builder, builder version, render hash and every split's shard sha256s, from the
manifests: ``Loader.identity``), the render hash and the world size. ``compare`` sets this run's
against it, leaf by leaf, and gives each difference a class from ``RULES`` (the longest matching
dotted prefix wins):

- **refused** when the continued run would be another run, or cannot continue this one: the
  architecture (``model``), the seed, the data (``data.datasets``, ``data.identity`` of the
  train split, the mix, the shuffle window, the crop), the rendering (``render_hash``), the
  global batch (``micro_batch``, ``engine.grad_accum_steps``) and how DeepSpeed lays out the
  optimizer state (``engine.zero_stage``, ``engine.precision``, ``engine.offload_optimizer``,
  ``engine.extra``). Changing the batch or the ZeRO stage on resume is issue 16 (elastic
  resume). The data's weights, mix and crop are refused too: they change what the run learns
  from here on (its data distribution), which the run's MLflow params would no longer describe;
  ``resume_allow=[data.weights]`` makes such a curriculum change explicit. ``resume_allow``
  lists dotted keys or groups (``data``, ``model``, ``data.identity``, ``engine.zero_stage``)
  whose changes are accepted anyway, at the user's word; one DeepSpeed cannot load still fails
  when the engine loads.
- **applied** when this run's value takes effect from the saved step on: the schedule and the
  optimizer's settings (``distributed.load_engine`` writes lr, betas and weight decay into the
  optimizer and the schedule after loading; gradient clipping is in DeepSpeed's config, built
  from this run's), cadences, retention, limits, metrics, loading, the paths of the data (the
  data is compared by its identity, not where it lies), a changed validation split, the world
  size (the data order stays exact, the RNG streams start afresh, and ``plan_batch`` keeps the
  global batch by adapting ``engine.grad_accum_steps`` before the engine is built; a world size
  that cannot keep it is refused, ``resume_allow=[world_size]`` accepts it; a ZeRO 1-3
  checkpoint is loaded from its universal conversion, checkpoint.py).

Every leaf key of ``TrainConfig`` has a rule (tests/test_resume_contract.py walks them), so a new
config key cannot be forgotten; a key without one is refused, never ignored. A key the saved
config lacks (an older evav) is compared as its default. Nothing is silent: each change is one
log line ``key: saved -> now (applied: why)`` or ``(refused: why)``; a refusal raises
``ResumeRefusedError`` (exit status 2) before the engine is built and before ``RUN/config.yaml``
is rewritten.

A checkpoint written before the contract has no config or data identity in its train state: its
``config.yaml`` (verified with the checkpoint) is compared instead, the data by its dataset
names and render hash only, with a warning; its next checkpoint records everything.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evav.errors import BadInputError

log = logging.getLogger(__name__)

REFUSED, APPLIED = "refused", "applied"

# dotted key or group -> (class, why). The longest matching prefix classifies a key. Groups
# stand for their whole section only where every key of it has one nature (an architecture
# field is always architecture); elsewhere each key is listed, so a new one needs a decision.
RULES: dict[str, tuple[str, str]] = {
    "run_dir": (APPLIED, "where the run lives"),
    "seed": (REFUSED, "the model init and the data order come from it"),
    "steps": (APPLIED, "the schedule ends at the new steps, from the saved step on"),
    "micro_batch": (REFUSED, "the global batch size (changing it on resume: issue 16)"),
    "log_every": (APPLIED, "cadence"),
    "val_every": (APPLIED, "cadence"),
    "val_batches": (APPLIED, "validation only"),
    "ckpt_every": (APPLIED, "cadence"),
    "keep_last": (APPLIED, "retention"),
    "keep_every": (APPLIED, "retention"),
    "max_skipped_steps": (APPLIED, "the limit (the saved count of skipped steps carries over)"),
    "peak_flops": (APPLIED, "MFU reporting only"),
    "compile": (APPLIED, "the same computation, compiled or eager"),
    "resume_allow": (APPLIED, "this contract's overrides"),
    "model": (REFUSED, "the architecture: the saved weights are another model's"),
    "data.train": (APPLIED, "paths only: the data is compared by data.datasets and data.identity"),
    "data.weights": (REFUSED, "the data mix: what the run learns from here on"),
    "data.mix_by": (REFUSED, "the data mix: what the run learns from here on"),
    "data.clip_frames": (REFUSED, "what each sample is: its crop and the loss's context"),
    "data.crop": (REFUSED, "what each long sample is: which of its frames are kept"),
    "data.augment": (REFUSED, "what each training sample is: its input frames flipped, shifted"),
    "data.pad_to": (
        APPLIED,
        "padding is masked out of the loss; packed clips attend only within themselves",
    ),
    "data.num_workers": (APPLIED, "loading only: the sample order is the same"),
    "data.window": (REFUSED, "the shuffle: the saved position would point at other samples"),
    "data.decoder": (APPLIED, "the decoding backend: the same frames"),
    "data.pin_workers": (APPLIED, "loading only: the sample order is the same"),
    "data.val_split": (APPLIED, "validation only"),
    "data.max_bad_in_a_row": (APPLIED, "the bad-sample limit"),
    "data.datasets": (REFUSED, "the datasets and their order: the saved position is theirs"),
    "data.identity": (REFUSED, "data identity: the shards hold other samples"),
    "render_hash": (REFUSED, "the frames are rendered another way (size, fonts, audio, ...)"),
    "world_size": (APPLIED, "the data order stays exact, the RNG streams start afresh"),
    "engine.zero_stage": (
        REFUSED,
        "how the optimizer state is partitioned (a ZeRO change on resume: issue 16)",
    ),
    "engine.offload_optimizer": (REFUSED, "where DeepSpeed keeps the optimizer state (issue 16)"),
    "engine.precision": (REFUSED, "the weights' dtype and the optimizer's master copies"),
    "engine.grad_accum_steps": (REFUSED, "the global batch size (changing it on resume: issue 16)"),
    "engine.backend": (APPLIED, "the transport between ranks"),
    "engine.torch_adam": (APPLIED, "the same AdamW state; updates differ in the last bits"),
    "engine.extra": (REFUSED, "anything in DeepSpeed's config, the checkpoint layout included"),
    "optim.lr": (APPLIED, "written into the optimizer and its schedule before the next update"),
    "optim.betas": (APPLIED, "written into the optimizer before the next update"),
    "optim.weight_decay": (APPLIED, "written into the optimizer before the next update"),
    "optim.warmup_steps": (APPLIED, "the schedule, from the saved step on"),
    "optim.min_lr_ratio": (APPLIED, "the schedule, from the saved step on"),
    "optim.grad_clip": (APPLIED, "DeepSpeed's clipping is built from this run's config"),
    "metrics": (APPLIED, "reporting only"),
}
TRAINED_SPLIT = "train"  # the split the trainer's Loader reads; the others only validate
PSEUDO_KEYS = ("data.datasets", "data.identity", "render_hash", "world_size")  # not config keys
_SHOWN = 200  # change lines logged at most (a hostile config could hold millions of keys)
_ABSENT = "(absent)"


class ResumeRefusedError(BadInputError):
    """A resume whose checkpoint differs from this run in what makes it the same run."""


@dataclass
class TrainState:
    """What a resume needs, saved in every checkpoint's ``train_state.pt`` as plain data (lists,
    dicts, numbers, strings and the RNG's uint8 tensors: it loads with ``weights_only=True``)."""

    step: int = 0  # optimizer updates applied
    samples: int = 0  # samples of the applied updates, all ranks
    frames: int = 0  # unpadded frames of the applied updates, all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss or non-finite gradients
    world_size: int = 1
    loader: list[dict] = field(default_factory=list)  # every rank's Loader.state_dict()
    rng: list[dict] = field(default_factory=list)  # every rank's RNG states (train._get_rng)
    render_hash: str = ""
    mlflow_run_id: str | None = None
    data_identity: list[dict] | None = None  # Loader.identity(); None: written before it
    config: dict | None = None  # the resolved config, redacted; None: written before it
    # the gradient accumulation steps trained with (adapted on resume to another world size,
    # see plan_batch; the config keeps what was asked); None: written before elastic resume
    grad_accum_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``torch.save`` (no dataclass is pickled: the loader allows none)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str | Path) -> TrainState:
        """Check a loaded train state field by field; ``BadInputError`` naming ``where`` and the
        field otherwise. Keys it does not know (a newer evav's) are left out."""

        def bad(key: str, problem: str):
            return BadInputError(where, f"train state field {key!r}: {problem}")

        if not isinstance(d, dict):
            raise BadInputError(where, f"not a train state (a {type(d).__name__})")
        out = {}
        for key in ("step", "samples", "frames", "skipped_steps", "world_size"):
            v = d.get(key, 0 if key not in ("step", "world_size") else None)
            if type(v) is not int or v < (1 if key == "world_size" else 0):
                raise bad(key, f"{_show(v)} is not an integer >= {int(key == 'world_size')}")
            out[key] = v
        world = out["world_size"]
        for key in ("loader", "rng"):
            v = d.get(key)
            if (
                not isinstance(v, list)
                or len(v) != world
                or not all(isinstance(x, dict) for x in v)
            ):
                raise bad(key, f"not a list of {world} dicts (one per rank)")
            out[key] = v
        for i, s in enumerate(out["loader"]):
            ok = (
                type(s.get("slot")) is int
                and _ints(s.get("counts"))
                and isinstance(s.get("datasets"), list)
                and all(isinstance(n, str) for n in s["datasets"])
                and type(s.get("seed")) is int
            )
            if not ok:
                raise bad(f"loader[{i}]", "not {slot, counts, datasets, seed}")
        out["rng"] = [
            _checked_rng(r, lambda p, i=i: bad(f"rng[{i}]", p)) for i, r in enumerate(out["rng"])
        ]
        if not isinstance(d.get("render_hash"), str):
            raise bad("render_hash", f"{_show(d.get('render_hash'))} is not a string")
        out["render_hash"] = d["render_hash"]
        run_id = d.get("mlflow_run_id")
        if run_id is not None and not isinstance(run_id, str):
            raise bad("mlflow_run_id", f"{_show(run_id)} is not a string")
        out["mlflow_run_id"] = run_id
        ident = d.get("data_identity")
        if ident is not None:
            if not isinstance(ident, list):
                raise bad("data_identity", "not a list")
            for i, e in enumerate(ident):
                problem = _identity_problem(e)
                if problem:
                    raise bad(f"data_identity[{i}]", problem)
        out["data_identity"] = ident
        conf = d.get("config")
        if conf is not None and not isinstance(conf, dict):
            raise bad("config", "not a mapping")
        out["config"] = conf
        gas = d.get("grad_accum_steps")
        if gas is not None and (type(gas) is not int or gas < 1):
            raise bad("grad_accum_steps", f"{_show(gas)} is not an integer >= 1")
        out["grad_accum_steps"] = gas
        return cls(**out)


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def _checked_rng(r: dict, bad) -> dict:
    """An RNG state as ``train._set_rng`` takes it (numpy's key as a plain list)."""
    t = r.get("torch")
    if not (torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1):
        raise bad("'torch' is not a uint8 tensor")
    np_state = r.get("numpy")
    if not isinstance(np_state, (list, tuple)) or len(np_state) != 5:
        raise bad("'numpy' is not numpy's 5-part state")
    key = np_state[1]
    key = key.tolist() if hasattr(key, "tolist") else key  # a legacy state's numpy array
    if not _ints(key if isinstance(key, list) else None) or len(key) != 624:
        raise bad("'numpy' has no 624-word key")
    py = r.get("python")
    if not (isinstance(py, (list, tuple)) and len(py) == 3 and isinstance(py[1], (list, tuple))):
        raise bad("'python' is not random.getstate()'s 3-part state")
    cuda = r.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, list) and all(torch.is_tensor(c) and c.dtype == torch.uint8 for c in cuda)
    ):
        raise bad("'cuda' is not a list of uint8 tensors")
    return {**r, "numpy": [np_state[0], key, *np_state[2:]]}


def _identity_problem(e: Any) -> str:
    """Why a saved data identity entry is not one ``Loader.identity`` writes ("" if it is)."""
    if not isinstance(e, dict):
        return "not a mapping"
    for key, tp in (("name", str), ("builder", str), ("render_hash", str), ("digest", str)):
        if not isinstance(e.get(key), tp):
            return f"{key!r} is not a string"
    if type(e.get("builder_version")) is not int:
        return "'builder_version' is not an integer"
    splits = e.get("splits")
    if not isinstance(splits, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v)
        for k, v in splits.items()
    ):
        return "'splits' is not {split: [shard sha256, ...]}"
    return ""


def identity_digest(parts: dict[str, Any]) -> str:
    """The first 16 hex digits of the sha256 of a dataset's identity (its name left out: the
    contents decide, a moved folder is the same data)."""
    keep = {k: v for k, v in parts.items() if k not in ("name", "digest")}
    text = json.dumps(keep, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the comparison --------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between a checkpoint and this run, classified."""

    key: str
    saved: str  # shown values (short, escaped)
    now: str
    refused: bool
    why: str
    rule: str = ""  # the RULES key that classified it: what resume_allow would name

    def line(self) -> str:
        verdict = REFUSED if self.refused else APPLIED
        return f"{self.key}: {self.saved} -> {self.now} ({verdict}: {self.why})"


def rule_for(key: str) -> tuple[str, tuple[str, str]] | None:
    """(RULES key, (class, why)) of the longest rule that is ``key`` or a dotted prefix of it."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RULES:
            return prefix, RULES[prefix]
    return None


def config_leaves(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a config dataclass, dotted (a dict or list field is one leaf)."""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out += config_leaves(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def check_allow(cfg: Any) -> None:
    """``resume_allow`` names only keys or groups the contract knows (a typo would allow
    nothing and say nothing): ``BadInputError`` naming the entry and the closest valid one."""
    leaves = config_leaves(type(cfg))
    known = set(PSEUDO_KEYS) | set(leaves)
    known |= {".".join(k.split(".")[:n]) for k in leaves for n in range(1, k.count(".") + 1)}
    for entry in cfg.resume_allow:
        e = str(entry)
        if e in known or e.startswith("data.identity.") or _is_config_key(e, leaves):
            continue
        close = difflib.get_close_matches(e, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BadInputError(
            "resume_allow", f"{e!r} is not a config key, a group or {', '.join(PSEUDO_KEYS)}{hint}"
        )


def _is_config_key(key: str, leaves: list[str]) -> bool:
    """A leaf, or a key inside one (a dict field's, such as ``engine.extra.bf16.enabled``)."""
    return key in leaves or any(key.startswith(leaf + ".") for leaf in leaves)


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


@dataclass(frozen=True)
class BatchPlan:
    """This run's gradient accumulation against the checkpoint's global batch (``plan_batch``)."""

    grad_accum_steps: int  # what this run trains with
    global_batch: int  # the checkpoint's: micro_batch x grad_accum_steps x world size (0: unknown)
    note: str = ""  # what was adapted to keep the global batch, for the log ("": nothing)
    refused: str = ""  # why another world size cannot keep the global batch ("": it can)
    kept: bool = True  # this run's global batch is the checkpoint's


def plan_batch(saved: TrainState, cfg: Any, world_size: int, where: Path) -> BatchPlan:
    """Keep the global batch (``micro_batch x engine.grad_accum_steps x world size``) of
    checkpoint ``where`` on this run's ``world_size``.

    When this run asks for the checkpoint's ``micro_batch`` and ``engine.grad_accum_steps``
    (its config, not what an earlier resume adapted), the accumulation steps become the saved
    global batch over ``micro_batch x world_size`` if that divides exactly (2 ranks x 1 step ->
    1 rank x 2 steps, and back), else the plan is refused (``refused``: a world size change
    that cannot keep the global batch; ``resume_allow=[world_size]`` accepts this run's own
    steps and so another global batch). A batch the user changed is this run's as given (the
    contract refuses it unless it keeps the global batch or ``resume_allow`` names it)."""
    from evav.config import to_dict

    defaults = _flatten(to_dict(type(cfg)()))
    saved_cfg = saved.config if saved.config is not None else _legacy_config(where)
    old = _flatten(saved_cfg or {})
    mb0 = old.get("micro_batch", defaults["micro_batch"])
    asked0 = old.get("engine.grad_accum_steps", defaults["engine.grad_accum_steps"])
    gas0, world0 = saved.grad_accum_steps or asked0, saved.world_size
    mb, asked = cfg.micro_batch, cfg.engine.grad_accum_steps
    if not all(type(v) is int and v > 0 for v in (mb0, asked0, gas0)):
        return BatchPlan(asked, 0, kept=False)  # a malformed saved config: compare names it
    global0 = mb0 * gas0 * world0
    if mb != mb0 or asked != asked0:  # the user changed the batch: the contract judges it
        return BatchPlan(asked, global0, kept=mb * asked * world_size == global0)
    need, rest = divmod(global0, mb * world_size)
    if rest or need < 1:
        ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
        why = (
            f"the global batch of {global0} (micro_batch {mb0} x engine.grad_accum_steps {gas0} "
            f"x {world0} ranks) is not micro_batch {mb} x {ranks} x any engine.grad_accum_steps: "
            f"set micro_batch and engine.grad_accum_steps for {ranks}, or accept another global "
            f"batch"
        )
        return BatchPlan(asked, global0, refused=why, kept=False)
    if need == gas0 and world0 == world_size and need == asked:
        return BatchPlan(asked, global0)
    if world0 != world_size:
        note = (
            f"world size {world0} -> {world_size}: engine.grad_accum_steps {gas0} -> {need} "
            f"keeps the global batch of {global0}"
        )
    else:
        note = (
            f"engine.grad_accum_steps {need} (the config says {asked}) keeps the global batch of "
            f"{global0}, as adapted when this run resumed on another world size"
        )
    return BatchPlan(need, global0, note)


def apply_batch(plan: BatchPlan, cfg: Any, state: TrainState, show: bool = True) -> None:
    """Train with the plan's accumulation steps (``cfg.engine.grad_accum_steps``, before the
    engine is built) and record them in this run's train state; log what was adapted (when
    ``show``: rank 0), or that the global batch changes (a refusal ``resume_allow`` accepted)."""
    if show and plan.note:
        log.info("%s", plan.note)
    if show and plan.refused:
        now = cfg.micro_batch * plan.grad_accum_steps * getattr(state, "world_size", 1)
        log.warning(
            "%s: allowed by resume_allow, the global batch changes to %d", plan.refused, now
        )
    cfg.engine.grad_accum_steps = plan.grad_accum_steps
    state.grad_accum_steps = plan.grad_accum_steps


def compare(
    saved: TrainState, now: TrainState, cfg: Any, where: Path, plan: BatchPlan | None = None
) -> list[Change]:
    """Every difference between checkpoint ``where`` (train state ``saved``) and this run
    (``now``, with its config ``cfg``), in config order, then the data's. ``plan``: this run's
    global batch against the checkpoint's (``plan_batch``; computed here when not given)."""
    from evav.config import to_dict  # the config module imports nothing of evav: no cycle

    if plan is None:
        plan = plan_batch(saved, cfg, now.world_size, where)
    allow = [str(a) for a in cfg.resume_allow]
    found: list[tuple[str, Any, Any]] = []

    saved_cfg = saved.config if saved.config is not None else _legacy_config(where)
    if saved_cfg is not None:
        now_flat = _flatten(now.config or {})
        defaults = _flatten(to_dict(type(cfg)()))
        old_flat = _flatten(saved_cfg)
        leaves = config_leaves(type(cfg))
        for key in list(now_flat) + [k for k in old_flat if k not in now_flat]:
            old = old_flat.get(key, defaults.get(key, _ABSENT))
            new = now_flat.get(key, _ABSENT)
            if old == new:
                continue
            if new is _ABSENT and not _is_config_key(key, leaves):
                log.warning(
                    "resume: %s in the checkpoint's config is no longer a key (ignored)", key
                )
                continue
            found.append((key, old, new))

    found += _data_changes(saved, now, where)
    if saved.world_size != now.world_size:
        found.append(("world_size", saved.world_size, now.world_size))

    changes = []
    for key, old, new in found:
        rule = rule_for(key)
        split = key.split(".splits.")[-1] if key.startswith("data.identity.") else None
        if split is not None and ".splits." in key and split != TRAINED_SPLIT:
            rule = (key, (APPLIED, "a split not trained on: validation and evaluation only"))
        if rule is None:  # tests/test_resume_contract.py keeps this from happening
            name, (kind, why) = key, (REFUSED, "not classified by the resume contract (a bug)")
        else:
            name, (kind, why) = rule
        if key == "world_size" and plan.refused:
            kind, why = REFUSED, plan.refused
        elif key == "world_size" and plan.note:
            why = f"{plan.note.split(': ', 1)[1]}; {why}"
        elif key == "engine.grad_accum_steps" and plan.kept and plan.global_batch:
            kind = APPLIED
            why = f"the global batch of {plan.global_batch} is kept on {now.world_size} rank(s)"
        refused = kind == REFUSED and not _allowed(key, allow)
        if kind == REFUSED and not refused:
            why = f"{why}; allowed by resume_allow"
        changes.append(Change(key, _show(old), _show(new), refused, why, name))
    return changes


def _data_changes(saved: TrainState, now: TrainState, where: Path) -> list[tuple[str, Any, Any]]:
    out: list[tuple[str, Any, Any]] = []
    if saved.render_hash != now.render_hash:
        out.append(("render_hash", saved.render_hash, now.render_hash))
    old_names = list(saved.loader[0]["datasets"]) if saved.loader else []
    new_names = [e["name"] for e in now.data_identity or []]
    if old_names != new_names:
        out.append(("data.datasets", old_names, new_names))
    if saved.data_identity is None:
        log.warning(
            "resume: checkpoint %s has no data identity (written before the resume contract): "
            "the shards' contents are not compared, only the dataset names and the render hash; "
            "the next checkpoint records it",
            where,
        )
        return out
    old_by_name = {e["name"]: e for e in saved.data_identity}
    for new in now.data_identity or []:
        old = old_by_name.get(new["name"])
        if old is None or old["digest"] == new["digest"]:
            continue  # a dataset only one side has is the data.datasets change above
        at = f"data.identity.{new['name']}"
        before = len(out)
        for part in ("builder", "builder_version"):
            if old[part] != new[part]:
                out.append((f"{at}.{part}", old[part], new[part]))
        for split in sorted(old["splits"].keys() | new["splits"].keys()):
            a, b = old["splits"].get(split), new["splits"].get(split)
            if a != b:
                out.append((f"{at}.splits.{split}", _ShardList(a), _ShardList(b, a)))
        if len(out) == before and old["render_hash"] == new["render_hash"]:
            out.append((f"{at}.digest", old["digest"], new["digest"]))  # parts equal, digest not
    return out


class _ShardList:
    """A split's shard sha256 list as a diff shows it: count, short digest, how many differ."""

    def __init__(self, shas: list[str] | None, other: list[str] | None = None):
        self.shas, self.other = shas, other

    def __eq__(self, o: object) -> bool:
        return isinstance(o, _ShardList) and self.shas == o.shas

    def __str__(self) -> str:
        if self.shas is None:
            return "(no such split)"
        digest = hashlib.sha256("".join(self.shas).encode()).hexdigest()[:12]
        text = f"{len(self.shas)} shard{'s' if len(self.shas) != 1 else ''} ({digest})"
        if self.other is not None:
            differ = sum(a != b for a, b in zip(self.shas, self.other))
            differ += abs(len(self.shas) - len(self.other))
            text += f", {differ} changed"
        return text


def _legacy_config(where: Path) -> dict | None:
    """A pre-contract checkpoint's ``config.yaml`` (verified with it; read as plain YAML)."""
    import yaml

    try:
        data = yaml.safe_load((Path(where) / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        log.warning("resume: %s/config.yaml unreadable (%s): the config is not compared", where, e)
        return None
    if not isinstance(data, dict):
        log.warning("resume: %s/config.yaml is not a mapping: the config is not compared", where)
        return None
    return data


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # an empty one has no leaves: {} and absent are the same
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _show(v: Any, n: int = 80) -> str:
    """A value for a log line: JSON (strings quoted, control characters escaped), clipped."""
    if isinstance(v, _ShardList):
        text = str(v)
    elif v is _ABSENT:
        text = _ABSENT
    else:
        try:
            text = json.dumps(v, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = json.dumps(str(v))
    return text if len(text) <= n else text[: n - 3] + "..."


def enforce(changes: list[Change], where: Path, show: bool = True) -> None:
    """Log every change (one line each, when ``show``: rank 0); if any is refused,
    ``ResumeRefusedError`` naming them and how to proceed. Every rank calls it with the same
    changes, so every rank stops alike."""
    if show:
        _log_changes(changes, where)
    refused = [c for c in changes if c.refused]
    if not refused:
        return
    groups = sorted({c.rule for c in refused})
    shown = "; ".join(c.line() for c in refused[:20])
    more = f"; and {len(refused) - 20} more" if len(refused) > 20 else ""
    raise ResumeRefusedError(
        where,
        f"resume refused, {len(refused)} change(s) would make this another run: {shown}{more}. "
        f"Restore them, train into a new run_dir, or accept them with "
        f"resume_allow=[{','.join(groups)}]",
    )


def _log_changes(changes: list[Change], where: Path) -> None:
    if not changes:
        log.info("resume from %s: config and data unchanged", where)
        return
    log.info("resume from %s: %d change(s)", where, len(changes))
    for c in changes[:_SHOWN]:
        (log.error if c.refused else log.info)("  %s", c.line())
    if len(changes) > _SHOWN:
        log.info("  ... and %d more", len(changes) - _SHOWN)
