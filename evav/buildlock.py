"""Stale locks of torch's JIT extension builds, found and cleared before they hang a run.

DeepSpeed compiles some of its ops on first use (on CPU: ``deepspeed_shm_comm`` when the process
group starts; on GPU: fused Adam) through ``torch.utils.cpp_extension``, which guards each build
directory with a ``lock`` file (``FileBaton``). A build that is killed (``kill -9``, a node
lost, a job cancelled while compiling) leaves the lock behind, and every later process that
needs the op waits on it forever, silently, at process-group start. torch has no staleness check.

``clear_stale()`` runs in ``evav.distributed.init`` on every rank before DeepSpeed starts. A lock
is stale when it is older than ``stale_s`` seconds, nothing in its build directory changed for as
long, and no process on this host works in that directory: it is then removed and the log says
so. A younger lock is a build in progress: the log says the run waits for it, and where.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_S = 600.0  # a DeepSpeed op build takes 1-3 minutes on a loaded 2-core machine


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR`` or its default root."""
    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    if given:
        return Path(given)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _newest_mtime(directory: Path) -> float:
    newest = 0.0
    for p in directory.rglob("*"):
        try:
            newest = max(newest, p.lstat().st_mtime)
        except OSError:  # removed while we looked
            continue
    return newest


def _busy(directory: Path) -> int | None:
    """The pid of a process on this host whose working directory is in ``directory``, if any
    (ninja and the compiler run there during a build)."""
    target = str(directory.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to read
            continue
        if cwd == target or cwd.startswith(target + os.sep):
            return int(entry.name)
    return None


def clear_stale(root: Path | None = None, stale_s: float = STALE_S) -> list[Path]:
    """Remove the stale build locks under ``root`` (two levels: ``py311_cpu/OP/lock``); return
    the locks removed. Locks in use are left, with a log line naming them."""
    root = root or extensions_root()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build finished meanwhile
            continue
        build = lock.parent
        idle = now - _newest_mtime(build)
        pid = _busy(build)
        if age < stale_s or idle < stale_s or pid is not None:
            why = (
                f"process {pid} works there" if pid is not None else f"{idle:.0f} s since a change"
            )
            log.info(
                "%s: an extension build holds this lock (%.0f s old, %s); DeepSpeed waits for it",
                lock,
                age,
                why,
            )
            continue
        try:
            lock.unlink()
        except FileNotFoundError:  # another rank removed it first
            continue
        except OSError as exc:
            raise RuntimeError(
                f"{lock}: a stale extension build lock ({age / 60:.0f} min old, no build running) "
                f"would hang DeepSpeed's op build forever, and it cannot be removed ({exc}): "
                "remove it by hand"
            ) from exc
        log.warning(
            "%s: removed a stale extension build lock, %.0f min old; nothing in %s changed for "
            "%.0f min and no process works there (a build killed mid-way left it; it would have "
            "hung this run at process-group start)",
            lock,
            age / 60,
            build,
            idle / 60,
        )
        removed.append(lock)
    return removed
