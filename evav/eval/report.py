"""Eval outputs: the results JSON, a markdown report with example clips, and the MLflow record.

    results.json                        task -> metrics, sample counts, checkpoint step, render hash
    results_report/report.md            a table per task and example clips
    results_report/examples/TASK_i.png  input | predicted | true, one row each

MLflow: the metrics go to the checkpoint's training run when it has one (keys
``eval/TASK/METRIC`` at the checkpoint's step, tag ``eval.step``), else to a new run in the
experiment ``evav-eval``; the JSON and the report are attached as artifacts under
``eval/step_NNNNNNNN``. A tracking server that cannot be reached is reported once and never
fails the evaluation: the JSON file is the record.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from evav.frames import contact_sheet
from evav.manifest import write_json_atomic

log = logging.getLogger("evav.eval")

HEADLINE = {
    "classification": "accuracy",
    "open": "accuracy",
    "multilabel": "f1_macro",
    "tracking": "mean_iou",
    "colorization": "colorfulness",
    "video_prediction": "psnr",
}


def write_results(results: dict, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {k: v for k, v in results.items() if not k.startswith("_")})
    return out


def summary_table(results: dict) -> str:
    """A markdown table: task, kind, samples, headline metric, chance level."""
    rows = ["| task | kind | samples | metric | value | chance |", "|---|---|---:|---|---:|---:|"]
    for task, r in results["tasks"].items():
        metric = HEADLINE[r["kind"]]
        value = r.get(metric, float("nan"))
        chance = r.get("chance")
        rows.append(
            f"| {task} | {r['kind']} | {r['samples']} | {metric} | {value:.3f} | "
            f"{'' if chance is None else f'{chance:.3f}'} |"
        )
    return "\n".join(rows)


def write_report(results: dict, directory: Path) -> Path:
    """report.md with the summary table and example images (input | predicted | true)."""
    ex_dir = directory / "examples"
    ex_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Evaluation of {results.get('checkpoint', '?')} (step {results.get('step', '?')})",
        "",
        f"Split `{results['split']}` of {', '.join(results['datasets'])}; render hash "
        f"`{results['render_hash']}`.",
        "",
        summary_table(results),
        "",
        "## Examples (rows: input | predicted | true)",
        "",
    ]
    for task, clips in results.get("_examples", {}).items():
        for i, (prompt, pred, true) in enumerate(clips):
            name = f"{task}_{i}.png"
            Image.fromarray(example_sheet(prompt, pred, true)).save(ex_dir / name)
            lines.append(f"**{task}** {i}: ![{task} {i}](examples/{name})")
            lines.append("")
    path = directory / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def example_sheet(prompt, pred, true) -> np.ndarray:
    """Three rows of frames: the prompt, the generated frames, the true frames."""
    cols = max(len(prompt), len(pred), len(true), 1)
    rows = [contact_sheet(np.asarray(x), columns=cols) for x in (prompt, pred, true)]
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(padded)


def scalar_metrics(results: dict) -> dict[str, float]:
    out = {}
    for task, r in results["tasks"].items():
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"eval/{task}/{k}"] = float(v)
    return out


def log_mlflow(
    results: dict, files: list[Path], tracking_uri: str | None, run_id: str | None, step: int
) -> str | None:
    """Log to the training run (or a new ``evav-eval`` run); returns the run id, None on failure."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        from evav.metrics import sqlite_artifact_location

        client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            client.get_run(run_id)  # raises when the store does not have it
        else:
            exp = client.get_experiment_by_name("evav-eval")
            exp_id = (
                exp.experiment_id
                if exp
                else client.create_experiment(
                    "evav-eval", sqlite_artifact_location(tracking_uri or "", "evav-eval")
                )
            )
            run_id = client.create_run(exp_id, run_name=f"eval-step{step}").info.run_id
        import time

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalar_metrics(results).items()]
        client.log_batch(
            run_id,
            metrics=metrics,
            tags=[
                RunTag("eval.step", str(step)),
                RunTag("eval.render_hash", results["render_hash"]),
            ],
        )
        for f in files:
            if f.is_dir():
                client.log_artifacts(run_id, str(f), f"eval/step_{step:08d}/{f.name}")
            else:
                client.log_artifact(run_id, str(f), f"eval/step_{step:08d}")
        return run_id
    except Exception as e:  # noqa: BLE001 - the JSON file is the record; MLflow is best effort
        log.warning(
            "MLflow logging failed (%s: %s); results are in the JSON file",
            type(e).__name__,
            str(e)[:200],
        )
        return None


def dumps(results: dict) -> str:
    return json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=1)
