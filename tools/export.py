"""Export a training checkpoint (any ZeRO stage, any number of ranks) to one safetensors file.

    python tools/export.py runs/fsdd --out exports/fsdd            # the newest verified checkpoint
    python tools/export.py runs/fsdd/checkpoints/step_00001000 --out exports/fsdd-1000

The export directory holds ``model.safetensors`` (the fp32 master weights the optimizer updated,
exactly, for every ZeRO stage and precision: never a bf16 module's rounded copy; see
``evav.distributed.consolidated_state_dict``), ``config.yaml`` (the resolved training
config), ``render_spec.yaml`` (when the training data's manifest is readable) and
``export.json`` (step, RenderSpec hash, MLflow run id and tracking URI, source checkpoint).
``evav eval`` and ``evav generate`` load it without DeepSpeed or the run directory. The
directory is written under a temporary name and renamed when complete.

The checkpoint is read through ``evav.eval.load``: verified against its ``COMPLETE`` marker
(sizes and sha256) and unpickled with ``weights_only=True``, so a damaged or planted file is
refused (exit status 2, the file named) and nothing in it runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def export(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    from safetensors.torch import save_file

    from evav.config import dump_yaml, from_dict
    from evav.eval.load import EXPORT_META, EXPORT_WEIGHTS, load_checkpoint
    from evav.frames import RenderSpec
    from evav.manifest import load_manifest
    from evav.metrics import redact_uri, redacted_config

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    loaded = load_checkpoint(checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(tmp / EXPORT_WEIGHTS))
    (tmp / "config.yaml").write_text(dump_yaml(redacted_config(loaded.config)))
    for d in loaded.config.data.train:  # the RenderSpec, so generation renders inputs the same way
        try:
            spec = from_dict(RenderSpec, load_manifest(d).render_spec, "render_spec")
        except (OSError, ValueError):
            continue
        if spec.hash == loaded.render_hash:
            (tmp / "render_spec.yaml").write_text(dump_yaml(spec))
            break
    meta = {
        "step": loaded.step,
        "render_hash": loaded.render_hash,
        "mlflow_run_id": loaded.mlflow_run_id,
        "tracking_uri": redact_uri(loaded.tracking_uri) if loaded.tracking_uri else None,
        "source": str(loaded.path.resolve()),
        "parameters": sum(v.numel() for v in state.values()),
    }
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "checkpoint", help="a run dir (newest verified checkpoint) or a step_NNNNNNNN dir"
    )
    p.add_argument("--out", required=True, help="the export directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "export.json").read_text())
    print(
        f"{out}: step {meta['step']}, {meta['parameters']:,} parameters, render hash "
        f"{meta['render_hash']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
