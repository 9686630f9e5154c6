"""Count the host synchronisations of a training step (issue 16: at most one per step outside
logging steps), on a GPU, or by proxy on a CPU.

    python tools/check_host_sync.py [--preset S] [--steps 20] [extra key=value ...]
    python tools/check_host_sync.py --cpu [--preset debug] [--steps 3]   # the CPU proxy

Trains twice in fresh processes, ``--steps`` and ``2 x --steps`` steps, logging and
checkpointing only at the end, with ``torch.cuda.set_sync_debug_mode("warn")``: CUDA then warns
at every operation that makes the host wait for the device (``.item()``, ``.tolist()``, a
device-to-host copy, a boolean mask's ``nonzero``). The difference of the two counts divided by
``--steps`` is the synchronisations per training step, DeepSpeed's own included (its overflow
check in bf16 and ZeRO 1-3 reads a flag in ``engine.step()``); the start, the last step's
logging and the checkpoint cancel out. The sources (file:line of the warning's caller) are
printed with their counts per step. Without a GPU it says so and exits 2, unless ``--cpu``.

``--cpu`` (no GPU needed; tests/test_train_lockstep.py runs it): every read of a tensor's value
into Python (``item``, ``tolist``, ``bool``/``float``/``int``/``index``, ``numpy``, ``cpu``) is
counted by its caller instead, as ``file:function`` of the innermost frame in evav or DeepSpeed.
On a GPU each such read of a device tensor is a synchronisation; on a CPU every tensor is in host
memory, so the reads evav makes of host-only tensors by design are listed apart
(``HOST_ONLY``: the batches' masks before they are copied to the device, the preemption flag
all-reduced over gloo). The line ``RESULT {json}`` has the per-step counts: ``evav`` (the
synchronisations evav itself would make on a GPU), ``deepspeed`` (DeepSpeed's own, and torch's
under it, some of which read host tensors), ``host_only``.
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
# functions that read tensors the trainer keeps in host memory on purpose (no device sync)
HOST_ONLY = ("train.py:_host_counts", "distributed.py:host_any")
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


def _caller() -> str:
    """``file:function`` of the innermost function in evav or DeepSpeed that reads (a
    comprehension or generator counts as the function around it)."""
    for f in reversed(traceback.extract_stack()[:-2]):
        if ("/evav/" in f.filename or "/deepspeed/" in f.filename) and not f.name.startswith("<"):
            return f"{Path(f.filename).name}:{f.name}"
    return "other"


def _count_reads(where: collections.Counter) -> None:
    """Count every read of a tensor's value into Python by its caller (the CPU proxy)."""
    import torch

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            where[_caller()] += 1
            return original(self, *a, **k)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))


def _child(run_dir: str, overrides: list[str], cpu: bool) -> None:
    """Train in this process, counting CUDA's synchronisation warnings (or, ``cpu``, the reads
    of tensor values) by their caller."""
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

    if cpu:
        _count_reads(where)
        train(cfg)
        print("SYNCS " + json.dumps(dict(where)))
        return
    warnings.showwarning = count
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print("SYNCS " + json.dumps(dict(where)))


EVAV_FILES = {p.name for p in (REPO / "evav").rglob("*.py")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", help="model preset (default: S on a GPU, debug with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="the CPU proxy: count tensor reads")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="more key=value overrides")
    a = ap.parse_args()
    if a.child:
        _child(a.child[0], a.extra, a.cpu)
        return 0
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print(
            "check_host_sync: needs a GPU (CUDA); this machine has none (--cpu: the proxy)",
            file=sys.stderr,
        )
        return 2
    a.preset = a.preset or ("debug" if a.cpu else "S")
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
            cmd = [sys.executable, __file__, "--child", str(run), *(["--cpu"] if a.cpu else [])]
            cmd += over
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
                return 1
            line = next(x for x in done.stdout.splitlines() if x.startswith("SYNCS "))
            counts.append(collections.Counter(json.loads(line[6:])))
    extra = counts[1] - counts[0]
    per_step = sum(extra.values()) / a.steps
    what = "tensor reads (CPU proxy)" if a.cpu else "host synchronisations"
    print(f"{what} per training step: {per_step:.2f} ({a.preset}, {a.extra})")
    for where, n in extra.most_common():
        print(f"  {n / a.steps:6.2f}  {where}")
    result = {"evav": 0.0, "deepspeed": 0.0, "host_only": 0.0, "other": 0.0, "sites": {}}
    for where, n in extra.items():
        if where == "other" or where in HOST_ONLY:
            group = "other" if where == "other" else "host_only"
        else:
            group = "evav" if where.split(":")[0] in EVAV_FILES else "deepspeed"
        result[group] += n / a.steps
        result["sites"][where] = n / a.steps
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
