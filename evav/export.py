"""`evav export RUN_OR_CHECKPOINT --out DIR`: a training checkpoint (any ZeRO stage, any number of
ranks) as one self-describing folder that loads without DeepSpeed or the run directory.

    evav export runs/fsdd --out exports/fsdd                       # the newest verified checkpoint
    evav export runs/fsdd/checkpoints/step_00001000 --out exports/fsdd-1000

The export folder holds

    model.safetensors   the fp32 master weights the optimizer updated, exactly, for every ZeRO
                        stage and precision (never a bf16 module's rounded copy; see
                        ``evav.distributed.consolidated_state_dict``)
    config.yaml         the resolved training config (credentials redacted); its model section
                        builds the model
    render_spec.yaml    the RenderSpec of the training data (when its manifest is readable), so
                        ``evav generate`` renders inputs the way the model was trained
    export.json         step, RenderSpec hash, MLflow run id and tracking URI, source checkpoint,
                        model preset and parameter count, training data and its sample counts,
                        the run's last evaluation results
    README.md           the model card: the same in words, and how to load it

``evav eval``, ``evav generate`` and ``evav.eval.load.load_checkpoint`` load it. Every file is
mode 0644 (the folder 0755). The folder is written under a temporary name beside ``--out``
(``.NAME.tmp-PID``) and renamed when complete, so a half export is never visible; ``--force``
replaces an existing one the same way (the old one is renamed away, then deleted).

The checkpoint is read through ``evav.eval.load``: verified against its ``COMPLETE`` marker
(sizes and sha256) and unpickled with ``weights_only=True``, so a damaged or planted file is
refused (exit status 2, the file named) and nothing in it runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
DIR_MODE = 0o755
CARD = "README.md"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a run dir (its newest checkpoint that verifies) or a RUN/checkpoints/step_NNNNNNNN dir",
    )
    p.add_argument("--out", required=True, help="the export directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def main(args: argparse.Namespace, prog: str = "evav export") -> int:
    try:
        out = export(args.checkpoint, args.out, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # BadInputError included
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "export.json").read_text())
    print(
        f"{out}: step {meta['step']}, {meta['parameters']:,} parameters "
        f"(preset {meta['preset']}), render hash {meta['render_hash']}; model card {out / CARD}"
    )
    return 0


def export(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the export of ``checkpoint`` (a run dir, a step dir or an export) to ``out``."""
    from safetensors.torch import save_file

    from evav.config import dump_yaml
    from evav.eval.load import EXPORT_META, EXPORT_WEIGHTS, load_checkpoint
    from evav.metrics import redact_uri, redacted_config

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    loaded = load_checkpoint(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover only
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, str(tmp / EXPORT_WEIGHTS))
        (tmp / "config.yaml").write_text(dump_yaml(redacted_config(loaded.config)))
        spec = _render_spec(loaded)
        if spec is not None:
            (tmp / "render_spec.yaml").write_text(dump_yaml(spec))
        run_dir = _run_dir_of(loaded.path)
        meta = {
            "step": loaded.step,
            "render_hash": loaded.render_hash,
            "mlflow_run_id": loaded.mlflow_run_id,
            "tracking_uri": redact_uri(loaded.tracking_uri) if loaded.tracking_uri else None,
            "source": str(loaded.path.resolve()),
            "parameters": sum(v.numel() for v in state.values()),
            "preset": loaded.config.model.preset,
            "steps_configured": loaded.config.steps,
            "exported_at": datetime.datetime.now().isoformat(timespec="seconds"),
            **_trained(loaded),
            "data": [_dataset(d) for d in loaded.config.data.train],
            "eval": _evals(run_dir, loaded),
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / CARD).write_text(model_card(meta, loaded.config, out.name, spec is not None))
        for p in tmp.iterdir():
            p.chmod(FILE_MODE)
        tmp.chmod(DIR_MODE)
        old = None
        if out.exists() or out.is_symlink():
            if not force:
                raise FileExistsError(f"{out} exists; pass --force to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return out


# -- what the export says about itself ---------------------------------------------------------


def _render_spec(loaded):
    """The training data's RenderSpec with the checkpoint's render hash (None: not readable)."""
    from evav.config import from_dict, load_config
    from evav.frames import RenderSpec
    from evav.manifest import load_manifest

    saved = loaded.path / "render_spec.yaml"  # re-exporting an export
    if saved.is_file():
        spec = load_config(RenderSpec, saved, [])
        if spec.hash == loaded.render_hash:
            return spec
    for d in loaded.config.data.train:
        try:
            spec = from_dict(RenderSpec, load_manifest(d).render_spec, "render_spec")
        except (OSError, ValueError):
            continue
        if spec.hash == loaded.render_hash:
            return spec
    return None


def _run_dir_of(path: Path) -> Path | None:
    """The run directory of a training checkpoint (RUN/checkpoints/step_N); None for an export."""
    path = path.resolve()
    if path.parent.name == "checkpoints" and (path / "train_state.pt").is_file():
        return path.parent.parent
    return None


def _trained(loaded) -> dict[str, Any]:
    """Samples and frames trained on, from the checkpoint's train state (an export's own)."""
    from evav import checkpoint
    from evav.eval.load import EXPORT_META

    if (loaded.path / EXPORT_META).is_file():
        old = json.loads((loaded.path / EXPORT_META).read_text())
        return {
            "samples_trained": old.get("samples_trained"),
            "frames_trained": old.get("frames_trained"),
        }
    try:
        state = checkpoint.read_state(loaded.path, checkpoint.checked(loaded.path).legacy)
    except (OSError, ValueError):
        return {"samples_trained": None, "frames_trained": None}
    return {"samples_trained": state.get("samples"), "frames_trained": state.get("frames")}


def _dataset(d: str) -> dict[str, Any]:
    """A training data dir with its manifest's builder and sample counts per split."""
    from evav.manifest import load_manifest

    try:
        m = load_manifest(d, check_files=False)
    except (OSError, ValueError) as e:
        return {"dir": str(d), "error": " ".join(str(e).split())[:200]}
    return {
        "dir": str(d),
        "builder": m.builder,
        "render_hash": m.render_hash,
        "samples": {split: s.samples for split, s in sorted(m.splits.items())},
    }


def _evals(run_dir: Path | None, loaded) -> list[dict[str, Any]]:
    """The run's newest evaluation results (RUN/eval), one per dataset and split; an export
    being re-exported keeps its own."""
    from evav import status
    from evav.eval.load import EXPORT_META

    if run_dir is None:
        if (loaded.path / EXPORT_META).is_file():
            return json.loads((loaded.path / EXPORT_META).read_text()).get("eval") or []
        return []
    return status.eval_results(run_dir)


def model_card(meta: dict[str, Any], cfg, name: str, has_render_spec: bool = True) -> str:
    """README.md of an export: what the model is, what it was trained on, how it scored, how to
    load it."""
    m = cfg.model.resolved()
    step_note = (
        f"{meta['step']:,} of {meta['steps_configured']:,} configured steps"
        if meta["steps_configured"]
        else f"{meta['step']:,} steps"
    )
    if meta.get("samples_trained") is not None:
        step_note += f" ({meta['samples_trained']:,} samples, {meta['frames_trained']:,} frames)"
    lines = [
        f"# {name}: evav next-frame model, preset `{meta['preset']}`",
        "",
        "A transformer trained by next-frame prediction on clips of rendered frames (evav:",
        "everything is a video). Exported by `evav export`.",
        "",
        "| | |",
        "|---|---|",
        f"| model preset | `{meta['preset']}` ({m.height}x{m.width} frames, patch {m.patch_size}) |",
        f"| parameters | {meta['parameters']:,} |",
        f"| trained | {step_note} |",
        f"| clip frames | {cfg.data.clip_frames} |",
        f"| render hash | `{meta['render_hash']}` |",
        f"| exported from | `{meta['source']}` |",
        f"| exported at | {meta['exported_at']} |",
    ]
    if meta.get("mlflow_run_id"):
        lines.append(f"| MLflow run | `{meta['mlflow_run_id']}` at `{meta['tracking_uri']}` |")
    lines += ["", "## Training data", ""]
    if meta["data"]:
        lines += ["| dataset dir | builder | samples per split |", "|---|---|---|"]
        for d in meta["data"]:
            if "error" in d:
                lines.append(f"| `{d['dir']}` | ? | manifest not readable: {d['error']} |")
                continue
            counts = ", ".join(f"{s} {n:,}" for s, n in d["samples"].items())
            lines.append(f"| `{d['dir']}` | {d['builder']} | {counts} |")
    else:
        lines.append("none recorded")
    lines += ["", "## Evaluation", ""]
    if not meta["eval"]:
        lines.append("No `evav eval` results in the run directory when this was exported.")
    for e in meta["eval"]:
        which = "this checkpoint" if e["step"] == meta["step"] else "not this checkpoint's step"
        where = f"{e['dataset']}, split {e['split']}" if e["split"] else e["dataset"]
        lines += [
            f"{where}, step {e['step']} ({which}; `{e['path']}`):",
            "",
            "| task | kind | samples | metric | value |",
            "|---|---|---:|---|---:|",
        ]
        for task, t in e["tasks"].items():
            value = f"{t['value']:.4f}" if t["value"] is not None else "n/a"
            lines.append(
                f"| {task} | {t['kind']} | {t['samples']} | {t['metric'] or '?'} | {value} |"
            )
        lines.append("")
    lines += [
        "",
        "## Files",
        "",
        "- `model.safetensors`: the fp32 master weights (every ZeRO stage and precision)",
        "- `config.yaml`: the resolved training config; its `model` section builds the model",
        *(
            ["- `render_spec.yaml`: how inputs are rendered into frames (the training data's)"]
            if has_render_spec
            else []
        ),
        "- `export.json`: this card's facts as JSON",
        "",
        "## How to load it",
        "",
        "```bash",
        f"evav eval {name} --data DATASET_DIR --out results.json",
        f'evav generate {name} --task TASK --input "some text or a file" --out answer.png',
        "```",
        "",
        "```python",
        "from evav.eval.load import load_checkpoint",
        "",
        f'loaded = load_checkpoint("{name}")  # model (eval mode, CPU), config, step, render hash',
        "pred = loaded.model(clips)  # clips (B, T, H, W, 3) in [0, 1]: each frame's next frame",
        "```",
        "",
        "Without evav's loader: build `evav.model.build_model(config.model)` from `config.yaml`",
        'and load `safetensors.torch.load_file("model.safetensors")` into it (strict).',
        "",
    ]
    return "\n".join(lines)
