"""The one-command demo: synthetic tasks -> shards -> DeepSpeed training on CPU -> per-task eval.

    make demo                                           # ./setup.sh, then this script
    .venv/bin/python tools/demo.py [--out runs/demo] [--size full|tiny] [--fresh]

Four stages, each an ordinary evav command (printed before it runs, its output streamed):

1. ``evav preprocess synthetic``: the built-in task suite (count, pitch, add, next, direction:
   image, audio, text and video in, words or frames out) rendered into shards;
2. ``evav train configs/demo.yaml``: a small model trained with DeepSpeed on the CPU, logging
   to the embedded MLflow store (SQLite beside the run) unless ``MLFLOW_TRACKING_URI`` is set;
3. ``evav eval``: answers generated for every validation sample, read back and scored per task;
4. a summary: the per-task table against chance and a trivial baseline, the run directory, the
   command that opens the MLflow UI on it, and a contact sheet of the model's predictions.

Re-running with the same ``--out`` and ``--size`` reuses the shards and resumes the run
directory (a finished run is evaluated again without training; an interrupted one continues
from its last checkpoint); ``--fresh`` starts a new run directory (``SIZE-2``, ``SIZE-3``, ...).
``--size tiny`` runs the same pipeline in about a minute (tests/test_demo.py); it checks the
plumbing, not learning. Exit status: 0 when every stage ran, else the failing stage's status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from evav.eval.report import predictions_sheet  # noqa: E402 - after the sys.path line above

CONFIG = REPO / "configs" / "demo.yaml"


@dataclass
class Size:
    """How big a demo run is: the data built and any overrides of configs/demo.yaml."""

    train_per_task: int
    val_per_task: int
    overrides: list[str] = field(default_factory=list)
    eval_limit: int | None = None  # samples per task evaluated (None: the whole val split)
    # Every task of the suite, `direction` (which way a square moves) three times: it is by far
    # the slowest to learn; with a fifth of the samples it stays at chance for the whole demo.
    tasks: list[str] = field(
        default_factory=lambda: ["count", "pitch", "add", "next"] + ["direction"] * 3
    )


SIZES = {
    # configs/demo.yaml as it is: shows real learning in a few minutes on two cores
    "full": Size(train_per_task=1000, val_per_task=100),
    # the same pipeline in about a minute, for tests: plumbing, not learning
    "tiny": Size(
        train_per_task=8,
        val_per_task=4,
        eval_limit=4,
        overrides=[
            "steps=6",
            "micro_batch=4",
            "log_every=2",
            "val_every=3",
            "val_batches=1",
            "ckpt_every=3",
            "model.dim=32",
            "model.depth=1",
        ],
    ),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default="runs/demo", help="where shards and runs go (default runs/demo)"
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="full: real learning in minutes (default); tiny: a one-minute check",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run directory instead of resuming the last one",
    )
    p.add_argument(
        "--config", default=str(CONFIG), help="training config (default configs/demo.yaml)"
    )
    args = p.parse_args(argv)
    from evav.config import ConfigError, load_config
    from evav.train import TrainConfig

    size = SIZES[args.size]
    try:  # a bad config stops here, before anything is built
        cfg = load_config(TrainConfig, args.config, list(size.overrides))
        cfg.model.resolved()
    except (ConfigError, ValueError) as e:
        print(f"demo: error: {args.config}: {e}", file=sys.stderr)
        return 2
    return Demo(Path(args.out), args.size, size, Path(args.config), cfg, args.fresh).run()


class StageError(RuntimeError):
    def __init__(self, stage: str, status: int):
        super().__init__(f"{stage} failed with exit status {status}")
        self.status = status


class Demo:
    def __init__(self, out: Path, size_name: str, size: Size, config: Path, cfg, fresh: bool):
        self.out = out.resolve()
        self.size_name, self.size, self.config = size_name, size, config
        self.frame = (cfg.model.height, cfg.model.width)  # the shards are rendered at this size
        # named by its settings, so that changed settings build new shards instead of being
        # refused by the existing ones
        key = json.dumps([size.tasks, size.train_per_task, size.val_per_task, self.frame])
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        self.shards = self.out / "shards" / f"synthetic-{size_name}-{digest}"
        self.run_dir, self.resumed = pick_run_dir(self.out / "runs", size_name, fresh)
        if self.resumed and trained_on(self.run_dir) not in (None, [str(self.shards)]):
            say(
                f"{self.run_dir} was trained on other shards ({trained_on(self.run_dir)}); "
                "starting a new run directory"
            )
            self.run_dir, self.resumed = pick_run_dir(self.out / "runs", size_name, True)
        self.timings: dict[str, float] = {}
        # OpenMP threads that spin while waiting burn the CPU when the machine is shared (five
        # times slower measured on two busy cores); passive waiting costs little when it is not.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # DeepSpeed compiles a C++ op on first use into this folder; one per environment, so
        # two virtual environments on one machine do not rebuild each other's build.
        self.env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

    # -- stages ---------------------------------------------------------------------------
    def run(self) -> int:
        start, load0 = time.monotonic(), os.getloadavg()[0]
        cpu0 = _children_cpu()
        say(f"evav demo ({self.size_name}): output in {self.out}")
        try:
            self.stage(
                "1/4 shards",
                self.evav(
                    "preprocess",
                    "synthetic",
                    "--out",
                    str(self.shards),
                    "--workers",
                    "2",
                    f"tasks=[{','.join(self.size.tasks)}]",
                    f"train_per_task={self.size.train_per_task}",
                    f"val_per_task={self.size.val_per_task}",
                    f"render.height={self.frame[0]}",
                    f"render.width={self.frame[1]}",
                ),
            )
            say(("resuming " if self.resumed else "new run directory ") + str(self.run_dir))
            self.stage(
                "2/4 train",
                self.evav(
                    "train",
                    str(self.config),
                    f"data.train=[{self.shards}]",
                    f"run_dir={self.run_dir}",
                    *self.size.overrides,
                ),
            )
            results_path = self.run_dir / "eval" / "demo.json"
            limit = ["--limit", str(self.size.eval_limit)] if self.size.eval_limit else []
            self.stage(
                "3/4 eval",
                self.evav(
                    "eval",
                    str(self.run_dir),
                    "--data",
                    str(self.shards),
                    "--split",
                    "val",
                    "--out",
                    str(results_path),
                    "--quiet",
                    *limit,
                ),
            )
        except StageError as e:
            say(f"demo stopped: {e}")
            return e.status
        t0 = time.monotonic()
        say("== 4/4 summary")
        results = json.loads(results_path.read_text())
        rows = summary_rows(results, self.copy_last_frame_psnr(results))
        sheet = predictions_sheet(
            results_path.with_name("demo_report") / "examples", self.run_dir / "predictions.png"
        )
        self.timings["4/4 summary"] = time.monotonic() - t0
        total = time.monotonic() - start
        summary = {
            "size": self.size_name,
            "run_dir": str(self.run_dir),
            "resumed": self.resumed,
            "shards": str(self.shards),
            "results": str(results_path),
            "predictions": str(sheet),
            "mlflow_ui": self.mlflow_command(),
            "step": results.get("step"),
            "tasks": rows,
            "timings_s": {**self.timings, "total": total},
            "children_cpu_s": _children_cpu() - cpu0,
            "load_avg_start": load0,
            "load_avg_end": os.getloadavg()[0],
            "cpus": os.cpu_count(),
        }
        (self.run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print_summary(summary)
        return 0

    def stage(self, name: str, cmd: list[str]) -> None:
        say(f"== {name}: {shlex.join(_short(cmd))}")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        for line in proc.stdout:
            for part in line.rstrip("\n").split("\r"):  # progress bars redraw with \r
                if part.strip():
                    print(f"   | {part}", flush=True)
        status = proc.wait()
        self.timings[name] = time.monotonic() - t0
        if status != 0:
            raise StageError(name, status)
        say(f"   {name} done in {self.timings[name]:.0f} s")

    def evav(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "evav.cli", *args]

    def copy_last_frame_psnr(self, results: dict) -> dict[str, float]:
        """Per video-prediction task: PSNR of repeating the last input frame (the baseline a model
        must beat), over the same samples and averaged the same way as ``evav eval``."""
        from evav.eval.readers import prompt_length
        from evav.eval.samples import ClipReader, load_eval_data
        from evav.eval.scores import per_frame_quality

        tasks = [t for t, r in results["tasks"].items() if r["kind"] == "video_prediction"]
        if not tasks:
            return {}
        data = load_eval_data([str(self.shards)], results["split"], self.size.eval_limit)
        clips, out = ClipReader(), {}
        try:
            for task in tasks:
                pred, true = [], []
                for s in data.by_task()[task]:
                    clip = clips.clip(s)
                    p = prompt_length(s.meta)
                    last_input = clip[p - 1 - int(s.meta["segments"].get("separator", 0))]
                    true.append(clip[p:])
                    pred.append(np.repeat(last_input[None], len(clip) - p, axis=0))
                out[task] = per_frame_quality(np.stack(pred), np.stack(true))["psnr"]
        finally:
            clips.close()
        return out

    def mlflow_command(self) -> str:
        from evav.metrics import default_tracking_uri, redact_uri

        uri = default_tracking_uri(self.run_dir)
        if not uri.startswith("sqlite:"):
            return f"open {redact_uri(uri)} (MLFLOW_TRACKING_URI)"
        mlflow = Path(sys.executable).with_name("mlflow")
        exe = str(mlflow) if mlflow.exists() else "mlflow"
        return f"{exe} ui --backend-store-uri {uri}"


# -- helpers -----------------------------------------------------------------------------------


def pick_run_dir(runs: Path, name: str, fresh: bool) -> tuple[Path, bool]:
    """The run directory and whether it already exists: the newest ``NAME[-N]`` (resumed), or a
    new one with ``fresh`` (or when there is none)."""
    existing = [runs / name] if (runs / name).exists() else []
    n = 2
    while (runs / f"{name}-{n}").exists():
        existing.append(runs / f"{name}-{n}")
        n += 1
    if existing and not fresh:
        return existing[-1], True
    return (runs / name if not existing else runs / f"{name}-{n}"), False


def trained_on(run_dir: Path) -> list[str] | None:
    """``data.train`` of a run directory's config (None when it has none yet)."""
    import yaml

    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    return list((yaml.safe_load(config.read_text()) or {}).get("data", {}).get("train", []))


def summary_rows(results: dict, copy_psnr: dict[str, float]) -> list[dict]:
    """One row per task: the headline metric, chance, and the best trivial answer."""
    rows = []
    for task, r in results["tasks"].items():
        if r["kind"] == "video_prediction":
            base = copy_psnr.get(task, float("nan"))
            rows.append(
                {
                    "task": task,
                    "kind": r["kind"],
                    "samples": r["samples"],
                    "metric": "psnr (dB)",
                    "model": r["psnr"],
                    "chance": None,
                    "baseline": base,
                    "baseline_is": "copy the last input frame",
                    "above": r["psnr"] - base,
                }
            )
            continue
        if r["kind"] != "classification":
            continue
        truths = [
            p["true"]
            for p in results.get("predictions", [])
            if p.get("task") == task and "true" in p
        ]
        majority = max(truths.count(t) for t in set(truths)) / len(truths) if truths else None
        rows.append(
            {
                "task": task,
                "kind": r["kind"],
                "samples": r["samples"],
                "metric": "accuracy",
                "model": r["accuracy"],
                "chance": r.get("chance"),
                "baseline": majority,
                "baseline_is": "always the most frequent answer",
                "above": r["accuracy"] - max(majority or 0, r.get("chance") or 0),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| task | kind | samples | metric | model | chance | trivial baseline |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        chance = "" if r["chance"] is None else f"{r['chance']:.3f}"
        base = "" if r["baseline"] is None else f"{r['baseline']:.3f}"
        lines.append(
            f"| {r['task']} | {r['kind']} | {r['samples']} | {r['metric']} | "
            f"{r['model']:.3f} | {chance} | {base} ({r['baseline_is']}) |"
        )
    return "\n".join(lines)


def print_summary(s: dict) -> None:
    print()
    print(f"Per-task results on the validation split (step {s['step']}):")
    print(format_table(s["tasks"]))
    print()
    times = ", ".join(
        f"{k.split(' ', 1)[1]} {v:.0f} s" for k, v in s["timings_s"].items() if k != "total"
    )
    print(
        f"time:         {s['timings_s']['total']:.0f} s ({times}); CPU time "
        f"{s['children_cpu_s']:.0f} s; load average {s['load_avg_start']:.1f} -> "
        f"{s['load_avg_end']:.1f} on {s['cpus']} CPUs"
    )
    print(f"run dir:      {s['run_dir']} ({'resumed' if s['resumed'] else 'new'})")
    print(f"results:      {s['results']}")
    print(f"predictions:  {s['predictions']}")
    print(f"MLflow UI:    {s['mlflow_ui']}")
    print("run again to reuse this run (it resumes); --fresh starts a new run directory")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _short(cmd: list[str]) -> list[str]:
    """The command as a user would type it (``evav ...`` for ``python -m evav.cli ...``)."""
    if cmd[1:3] == ["-m", "evav.cli"]:
        return ["evav", *cmd[3:]]
    return cmd


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    sys.exit(main())
