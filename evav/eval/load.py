"""Load a model for evaluation or generation from a training checkpoint or an exported one.

    loaded = load_checkpoint("runs/x")                      # the run's newest verified checkpoint
    loaded = load_checkpoint("runs/x/checkpoints/step_00001000")
    loaded = load_checkpoint("exports/x")                   # written by evav export

A training checkpoint is verified against its ``COMPLETE`` marker first (sizes and sha256 of
every file; a run directory falls back to its previous checkpoint when the newest fails, a
checkpoint named explicitly is refused), its pickles are loaded with ``weights_only=True``
(nothing read runs code: evav.checkpoint), and its DeepSpeed shards (any ZeRO stage) are merged
into full fp32 weights in this process, without a process group or an engine. Nothing is set
aside or renamed here: evaluation may run beside the training that owns the run directory.
An export directory holds

    model.safetensors   the fp32 weights
    config.yaml         the resolved training config (the model section builds the model)
    export.json         step, RenderSpec hash, MLflow run id and tracking URI, source checkpoint

and needs neither DeepSpeed nor the run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from evav import checkpoint
from evav.config import load_config
from evav.model import NextFrameModel, build_model

EXPORT_META = "export.json"
EXPORT_WEIGHTS = "model.safetensors"


@dataclass
class Loaded:
    model: NextFrameModel
    config: object  # evav.train.TrainConfig
    step: int
    render_hash: str
    mlflow_run_id: str | None
    tracking_uri: str | None  # where the training run logged (None: unknown)
    path: Path  # the checkpoint or export directory actually loaded


def resolve(path: str | Path) -> Path:
    """A run directory -> its newest checkpoint that verifies; a checkpoint or export dir as is
    (a checkpoint is verified when loaded)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p}: no such file or directory")
    if (p / EXPORT_META).is_file() or (p / checkpoint.MARKER).is_file():
        return p
    if (p / "checkpoints").is_dir():
        last = checkpoint.last_good(p, warn=True)
        if last is None:
            raise FileNotFoundError(
                f"run directory {p}: no complete checkpoint that verifies in {p / 'checkpoints'}"
            )
        return last
    if (p / "train_state.pt").is_file():
        raise ValueError(f"checkpoint {p}: no {checkpoint.MARKER} marker; the save never completed")
    raise ValueError(
        f"{p}: not a run directory, a checkpoint (step_NNNNNNNN with {checkpoint.MARKER}) "
        f"or an export (with {EXPORT_META})"
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Build the model described by the checkpoint's config and load its weights."""
    from evav.train import TrainConfig  # the config schema lives with the training function

    p = resolve(path)
    cfg = load_config(TrainConfig, p / "config.yaml", [])
    if (p / EXPORT_META).is_file():
        from safetensors.torch import load_file

        meta = json.loads((p / EXPORT_META).read_text())
        state = load_file(str(p / EXPORT_WEIGHTS))
        step, render_hash = int(meta["step"]), str(meta["render_hash"])
        run_id, uri = meta.get("mlflow_run_id"), meta.get("tracking_uri")
    else:
        from evav import distributed
        from evav.metrics import read_run_id

        verdict = checkpoint.checked(p)  # sizes, sha256, pickles: CheckpointError naming the file
        train_state = checkpoint.read_state(p, verdict.legacy)
        state = distributed.consolidated_state_dict(p, "engine")
        step, render_hash = int(train_state["step"]), str(train_state["render_hash"])
        # a checkpoint saved before MLflow answered has no id; the run dir's file has it then
        run_id = train_state.get("mlflow_run_id") or read_run_id(p.parent.parent / "mlflow_run_id")
        uri = _run_tracking_uri(cfg, p.parent.parent)
    model = build_model(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {p}: weights do not fit model {cfg.model.preset!r} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval()
    return Loaded(model, cfg, step, render_hash, run_id, uri, p)


def _run_tracking_uri(cfg, run_dir: Path) -> str | None:
    """Where the training run logged: its configured URI, ``$MLFLOW_TRACKING_URI``, or the
    embedded SQLite store beside the run directory (the same rule as evav.metrics)."""
    from evav.metrics import default_tracking_uri

    if not cfg.metrics.enabled:
        return None
    return cfg.metrics.tracking_uri or default_tracking_uri(run_dir)
