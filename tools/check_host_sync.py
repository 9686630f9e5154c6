"""Count the host synchronisations of a training step on a GPU (issue 16: at most one per step
outside logging steps).

    python tools/check_host_sync.py [--preset S] [--steps 20] [extra key=value ...]

Trains twice in fresh processes, ``--steps`` and ``2 x --steps`` steps, logging and
checkpointing only at the end, with ``torch.cuda.set_sync_debug_mode("warn")``: CUDA then warns
at every operation that makes the host wait for the device (``.item()``, ``.tolist()``, a
device-to-host copy, a boolean mask's ``nonzero``). The difference of the two counts divided by
``--steps`` is the synchronisations per training step, DeepSpeed's own included (its overflow
check in bf16 and ZeRO 1-3 reads a flag in ``engine.step()``); the start, the last step's
logging and the checkpoint cancel out. The sources (file:line of the warning's caller) are
printed with their counts per step. Needs a GPU; on a CPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def _child(run_dir: str, overrides: list[str]) -> None:
    """Train in this process, counting CUDA's synchronisation warnings by their caller."""
    import torch

    from evav.config import load_config
    from evav.train import TrainConfig, train

    cfg = load_config(TrainConfig, "configs/debug.yaml", [f"run_dir={run_dir}", *overrides])
    where: collections.Counter[str] = collections.Counter()
    original = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [
                f
                for f in traceback.extract_stack()[:-2]
                if "/evav/" in f.filename or "deepspeed" in f.filename
            ]
            top = frames[-1] if frames else None
            where[f"{Path(top.filename).name}:{top.lineno}" if top else f"{filename}:{lineno}"] += 1
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = count
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print("SYNCS " + json.dumps(dict(where)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="S")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="more key=value overrides")
    a = ap.parse_args()
    if a.child:
        _child(a.child[0], a.extra)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("check_host_sync: needs a GPU (CUDA); this machine has none", file=sys.stderr)
        return 2
    from tools.bench_train import build_data

    counts = []
    with tempfile.TemporaryDirectory(prefix="check_host_sync-") as tmp:
        data = build_data(Path(tmp))
        for steps in (a.steps, 2 * a.steps):
            over = [
                f"data.train=[{data}]",
                f"model.preset={a.preset}",
                f"steps={steps}",
                f"log_every={steps}",
                "val_every=0",
                "ckpt_every=0",
                "metrics.enabled=false",
                "metrics.image_every=0",
                *a.extra,
            ]
            run = Path(tmp) / f"run{steps}"
            cmd = [sys.executable, __file__, "--child", str(run), *over]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
                return 1
            line = next(x for x in done.stdout.splitlines() if x.startswith("SYNCS "))
            counts.append(collections.Counter(json.loads(line[6:])))
    extra = counts[1] - counts[0]
    per_step = sum(extra.values()) / a.steps
    print(f"host synchronisations per training step: {per_step:.2f} ({a.preset}, {a.extra})")
    for where, n in extra.most_common():
        print(f"  {n / a.steps:6.2f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
