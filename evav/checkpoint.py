"""Checkpoints that verify themselves: ``RUN_DIR/checkpoints/step_NNNNNNNN/``.

A checkpoint directory holds

    engine/            DeepSpeed's shards (model, optimizer, scheduler), written by every rank
    train_state.pt     evav.resume.TrainState as plain data (tensors, lists, dicts, numbers and
                       strings only): step, samples and frames seen, skipped steps, every rank's
                       loader state and RNG states, the MLflow run id, the RenderSpec hash, the
                       data identity and the resolved config (redacted) for the resume contract
    config.yaml        the resolved config (for people; resume compares the train state's)
    zero_to_*.py       DeepSpeed's recovery scripts (ZeRO stages 1-3; never run by evav)
    COMPLETE           the commit marker (JSON): step, time, world size and every other file of
                       the directory with its size and sha256; written atomically, last
    universal/         only after a resume on another number of ranks (ZeRO 1-3): DeepSpeed's
                       universal conversion of engine/ (``universal``), made once by rank 0 in
                       universal.tmp-PID/ and renamed; not in the step's COMPLETE (verification
                       refuses unlisted files under engine/ only) but under its own
                       universal/COMPLETE, checked before each use (``verify_universal``)

Saving (``save``, every rank): the fp32 master weights and the optimizer state must be finite
(one all-reduce; else NonFiniteStateError names the last good checkpoint and nothing is
written) -> every rank writes its shards -> rank 0 writes the train state and the config ->
every rank hashes the files it wrote (DeepSpeed's per-rank shards are named
``zero_pp_rank_R_*``; rank 0 has the others) and the lists are gathered -> rank 0 writes
``COMPLETE`` (temp file + rename) and applies retention. A kill before the rename leaves a
directory without a marker: never resumed from, removed by the next save. DeepSpeed's own
``latest`` file is neither written nor trusted. The step has no width limit (8 digits are only
the zero padding of the name; steps are compared as numbers).

Resuming (``find_resume`` then ``load_engine``, every rank): newest committed checkpoint first,
each rank checks its share of the files against the marker (sizes first, then sha256; a file under ``engine/`` that the
marker does not list fails too, since DeepSpeed globs that folder) and every rank gets the same
verdict. A checkpoint that fails is reported (the file and the reason), set aside (renamed
``step_N.bad-REASON-TIME`` by rank 0, never deleted) and the previous one is tried. When none is
left but some were set aside, resume refuses (CheckpointError) instead of quietly starting the
run again from step 0 (days of training lost unnoticed); moving the ``.bad-`` directories out of
``checkpoints/`` starts it afresh. ``find_resume`` does all of that without an engine (the
train state is checked as a ``TrainState`` too: a malformed one fails like an unreadable file),
so the resume contract (evav/resume.py) is checked before the engine is built; ``load_engine``
then loads the engine files. A marker without a file list (written by evav before
checkpoints verified themselves) is loaded with a warning that it is unverified: refusing would
strand every run in flight at the upgrade, and loading it runs no code either.

Nothing read runs code. Every pickle is loaded with ``weights_only=True``: the train state with
no extra types (a legacy one: numpy's array reconstruction only); DeepSpeed's files are first
unpickled here, memory-mapped (no tensor data read), with only the types DeepSpeed writes
allowed (``distributed.engine_safe_globals``), so a refusal names the file before DeepSpeed
touches anything; DeepSpeed's own loads then run under a forced ``weights_only``
(``distributed.weights_only_loads``), which also covers a file swapped in between. A refused
file raises UnsafeCheckpointError: a planted payload is not a corruption to step over quietly.

Retention: walking from the newest, the last ``keep_last`` *verified* checkpoints are kept
(verified in this process: written, loaded or hashed here), so is everything newer than the
oldest of them (an unverified legacy one is kept but not counted) and every one whose step is a
multiple of ``keep_every``; older ones are deleted, and nothing while fewer than ``keep_last``
verify. A committed checkpoint that fails verification there is set aside as on resume.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from evav import distributed as dist
from evav import faults
from evav.errors import BadInputError, describe_error
from evav.resume import TrainState

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MARKER_FORMAT = 2  # 1 (no "format" key): step, time, world_size; 2: and "files"
TRAIN_STATE = "train_state.pt"
ENGINE = "engine"  # DeepSpeed's tag: the shards' folder
UNIVERSAL = "universal"  # the universal conversion, for another number of ranks (own marker)
STEP_RE = re.compile(r"^step_(\d+)$")
SET_ASIDE_RE = re.compile(r"^step_\d+\.bad-")
_RANK_SHARD = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's name for a rank's own shard
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(BadInputError):
    """A checkpoint, or a file of one, that cannot be used: names the path and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that unpickles only by building a type or calling a function outside
    the allow-list (a planted payload, or a type a newer DeepSpeed writes): refused unrun."""


class NonFiniteStateError(RuntimeError):
    """The weights or the optimizer state hold NaN or inf: no checkpoint is written."""


@dataclass(frozen=True)
class Verdict:
    """What checking a checkpoint directory against its marker found."""

    ok: bool
    reason: str = ""  # the first failure ("engine/x.pt: size 1234, marker says 5678")
    slug: str = ""  # the failure in a word, for the set-aside name: size, sha256, missing, ...
    legacy: bool = False  # a marker without a file list: loadable, but nothing was verified
    files: tuple[str, ...] = ()  # the checkpoint's files (relative paths), marker order
    marker: str = ""  # the marker's text: a changed marker is checked again


class _Failure(Exception):
    def __init__(self, slug: str, reason: str):
        super().__init__(reason)
        self.slug, self.reason = slug, reason


# -- names -----------------------------------------------------------------------------------


def step_dir(run_dir: str | Path, step: int) -> Path:
    """``RUN/checkpoints/step_NNNNNNNN`` (8 digits of zero padding, more when the step has)."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint directory's name (``step_00001000``: 1000, ``step_123456789``:
    123456789); None for any other name (``step_1`` is not one: one name per step)."""
    name = Path(path).name
    m = STEP_RE.match(name)
    if m is None or name != f"step_{int(m.group(1)):08d}":
        return None
    return int(m.group(1))


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint (marker present, not yet verified), oldest
    first by step number."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for p in root.iterdir():
            step = step_of(p)
            if step is not None and (p / MARKER).is_file():
                out.append((step, p))
    return sorted(out)


def latest(run_dir: str | Path) -> Path | None:
    """The newest committed checkpoint, or None (unverified: see ``last_good``)."""
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def set_aside_dirs(run_dir: str | Path) -> list[Path]:
    """The checkpoints set aside after failing verification, by name."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if SET_ASIDE_RE.match(p.name) and p.is_dir())


# -- verification ----------------------------------------------------------------------------

_verified: dict[str, Verdict] = {}  # resolved path -> its verdict here (usable ones only)


def _remember(path: Path, verdict: Verdict) -> None:
    _verified[str(Path(path).resolve())] = verdict


def _cached(path: Path) -> Verdict | None:
    """The verdict this process reached for ``path``, if its marker has not changed since."""
    v = _verified.get(str(Path(path).resolve()))
    if v is None:
        return None
    try:
        return v if (Path(path) / MARKER).read_text() == v.marker else None
    except (OSError, UnicodeDecodeError):
        return None


def verify(path: str | Path, rank: int = 0, world: int = 1) -> Verdict:
    """Check checkpoint ``path`` against its marker: sizes of every listed file, then their
    sha256, and no unlisted file under ``engine/``. Never raises for a bad checkpoint.

    ``world > 1`` makes it a collective (every rank calls it): rank 0 reads the marker, each
    rank hashes its share of the files (its own DeepSpeed shards), every rank gets the same
    verdict. Otherwise one process checks everything (files hashed in parallel threads).
    """
    path = Path(path)
    collective = world > 1
    head = _header(path) if rank == 0 or not collective else None
    if collective:
        head = dist.broadcast_object(head)
    if isinstance(head, Verdict):  # a bad or a legacy marker: nothing to hash
        return head
    text, entries = head
    mine = [
        (i, e) for i, e in enumerate(entries) if not collective or _owner(e["path"], world) == rank
    ]
    fails = _check_files(path, mine)
    if collective:
        fails = [f for part in dist.all_gather_objects(fails) for f in part]
    files = tuple(e["path"] for e in entries)
    if not fails:
        return Verdict(True, files=files, marker=text)
    fails.sort()
    _, slug, reason = fails[0]
    more = sum(1 for f in fails[1:] if f[1] == slug)
    if more:
        reason += f" (and {more} more file{'s' if more > 1 else ''}: {slug})"
    return Verdict(False, reason=reason, slug=slug, files=files, marker=text)


def last_good(run_dir: str | Path, warn: bool = False) -> Path | None:
    """The newest committed checkpoint that verifies (or a legacy one), checked in this process
    without setting anything aside; None when there is none. ``warn``: log each skipped one."""
    for _, p in reversed(complete_checkpoints(run_dir)):
        v = _cached(p) or verify(p)
        if v.ok:
            _remember(p, v)
            return p
        if warn:
            log.warning(
                "checkpoint %s fails verification (%s); trying the previous one", p, v.reason
            )
    return None


def checked(path: str | Path) -> Verdict:
    """Verify checkpoint ``path`` (CheckpointError naming the failing file and the reason) and
    unpickle its engine files without running code (UnsafeCheckpointError naming a refused
    file); one process, read-only (evaluation, export). Returns the verdict."""
    path = Path(path)
    v = _cached(path) or verify(path)
    if not v.ok:
        raise CheckpointError(path, f"fails verification: {v.reason}")
    if v.legacy:
        log.warning("checkpoint %s: %s", path, v.reason)
    _remember(path, v)
    for rel in _engine_pickles(v.files):
        safe_load(path / rel, dist.engine_safe_globals(), mmap=True)
    return v


def _header(path: Path) -> Verdict | tuple[str, list[dict]]:
    """The marker's text and file entries, or the Verdict of a bad or a legacy marker."""
    try:
        text = (path / MARKER).read_text()
        marker = json.loads(text)
        if not isinstance(marker, dict):
            raise _Failure("marker", f"{MARKER}: not a JSON object")
        step = step_of(path)
        if step is None:  # a set-aside one (step_N.bad-...) or a copy under another name
            raise _Failure("marker", f"{path.name}: not a checkpoint's name (step_NNNNNNNN)")
        if type(marker.get("step")) is not int or marker["step"] != step:
            raise _Failure(
                "marker", f"{MARKER}: step {marker.get('step')!r}, the directory says {step}"
            )
        if "files" not in marker:
            return _legacy(path, text)
        entries = _entries(marker["files"])
        listed = {e["path"] for e in entries}
        for rel in _list_files(path / ENGINE, prefix=ENGINE + "/"):  # DeepSpeed globs engine/
            if rel not in listed:
                raise _Failure("unlisted", f"{rel}: not listed in {MARKER}")
        return text, entries
    except _Failure as f:
        return Verdict(False, reason=f.reason, slug=f.slug)
    except (OSError, UnicodeDecodeError) as e:
        return Verdict(False, reason=f"{MARKER}: unreadable ({describe_error(e)})", slug="marker")
    except json.JSONDecodeError as e:
        return Verdict(False, reason=f"{MARKER}: not valid JSON ({e})", slug="marker")


def _entries(files: Any, whole_checkpoint: bool = True) -> list[dict]:
    """A marker's ``files``, each checked (path inside the directory, size, sha256, listed once);
    ``whole_checkpoint``: it must list the train state and an engine file (not so for a
    universal conversion's own marker)."""
    if not isinstance(files, list):
        raise _Failure("marker", f"{MARKER}: 'files' is not a list")
    seen = set()
    for i, e in enumerate(files):
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("path"), str)
            and type(e.get("size")) is int
            and e["size"] >= 0
            and isinstance(e.get("sha256"), str)
            and _SHA256.match(e["sha256"])
        )
        if not ok:
            raise _Failure("marker", f"{MARKER}: files[{i}] is not {{path, size, sha256}}")
        rel = PurePosixPath(e["path"])
        if (
            rel.is_absolute()
            or ".." in rel.parts
            or str(rel) != e["path"]
            or e["path"]
            in (
                ".",
                MARKER,
            )
        ):
            raise _Failure("marker", f"{MARKER}: files[{i}] {e['path']!r} is not inside it")
        if e["path"] in seen:
            raise _Failure("marker", f"{MARKER}: {e['path']} is listed twice")
        seen.add(e["path"])
    if whole_checkpoint and (
        TRAIN_STATE not in seen or not any(p.startswith(ENGINE + "/") for p in seen)
    ):
        raise _Failure("marker", f"{MARKER}: lists no {TRAIN_STATE} or no {ENGINE}/ file")
    return files


def _legacy(path: Path, text: str) -> Verdict:
    files = tuple(_list_files(path))
    for need in (TRAIN_STATE, ENGINE + "/"):
        if not any(f == need or f.startswith(need) for f in files):
            return Verdict(False, reason=f"{need.rstrip('/')}: missing", slug="missing")
    for rel in files:
        if not (path / rel).is_file():  # follows links: a FIFO or a dangling link
            return Verdict(False, reason=f"{rel}: not a regular file", slug="unreadable")
    return Verdict(
        True,
        reason=f"{MARKER} lists no files (written by an evav before checkpoints were hashed): "
        "loaded unverified",
        legacy=True,
        files=files,
        marker=text,
    )


def _check_files(root: Path, entries: list[tuple[int, dict]]) -> list[tuple[int, str, str]]:
    """(index, slug, reason) of each entry that does not match; sizes before any hashing."""
    fails, to_hash = [], []
    for i, e in entries:
        rel = e["path"]
        try:
            st = (root / rel).stat()
        except FileNotFoundError:
            fails.append((i, "missing", f"{rel}: missing"))
            continue
        except OSError as err:
            fails.append((i, "unreadable", f"{rel}: cannot read ({err.strerror or err})"))
            continue
        if not stat.S_ISREG(st.st_mode):
            fails.append((i, "unreadable", f"{rel}: not a regular file"))
        elif st.st_size != e["size"]:
            fails.append((i, "size", f"{rel}: size {st.st_size}, marker says {e['size']}"))
        else:
            to_hash.append((i, e))
    if fails:  # no hashing: a size is already wrong (or a file gone)
        return fails
    for (i, e), got in zip(to_hash, _hash_files(root, [e["path"] for _, e in to_hash])):
        if isinstance(got, str):
            fails.append((i, "unreadable", f"{e['path']}: cannot read ({got})"))
        elif got[1] != e["sha256"]:
            fails.append(
                (
                    i,
                    "sha256",
                    f"{e['path']}: sha256 {got[1][:16]}..., marker says {e['sha256'][:16]}...",
                )
            )
    return fails


def _owner(rel: str, world: int) -> int:
    """The rank that hashes ``rel``: the rank in a DeepSpeed per-rank shard's name (the one that
    wrote it, so it reads its own page cache), rank 0 for everything else."""
    m = _RANK_SHARD.search(PurePosixPath(rel).name)
    return int(m.group(1)) % world if m else 0


def _list_files(root: Path, prefix: str = "") -> list[str]:
    """Everything but folders under ``root`` (relative POSIX paths, sorted), the marker excepted:
    a FIFO or a dangling link is listed too, so it fails verification instead of hanging a
    reader or vanishing from the check."""
    if not root.is_dir():
        return []
    out = []
    for p in root.rglob("*"):
        rel = prefix + p.relative_to(root).as_posix()
        if rel != MARKER and not p.is_dir():
            out.append(rel)
    return sorted(out)


def _hash_files(root: Path, rels: list[str]) -> list[tuple[int, str] | str]:
    """(size, sha256) of each file, or the read error's text; files in parallel threads
    (hashlib releases the GIL on large buffers)."""

    def one(rel: str) -> tuple[int, str] | str:
        try:
            with open(root / rel, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                return size, hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            return e.strerror or str(e)

    if len(rels) <= 1:
        return [one(r) for r in rels]
    with concurrent.futures.ThreadPoolExecutor(min(8, len(rels))) as pool:
        return list(pool.map(one, rels))


def _engine_pickles(files: tuple[str, ...]) -> list[str]:
    return [f for f in files if f.startswith(ENGINE + "/") and f.endswith(".pt")]


# -- loading without running code --------------------------------------------------------------


def safe_load(path: str | Path, allow: list | tuple = (), mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with only ``allow`` beyond torch's own types.

    A refused file raises UnsafeCheckpointError naming it (nothing from it has run), any other
    failure to read it CheckpointError. ``mmap``: map tensor data instead of reading it (an
    unpickling check that costs little for a large file).
    """
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            path, f"refused to unpickle: {_refusal(e)} (loading it would run code; not loaded)"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(path, f"unreadable ({describe_error(e)})") from None


def _refusal(e: pickle.UnpicklingError) -> str:
    """torch's reason alone (its message also suggests allow-listing the type: not here)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(" Please use")[0].strip()
    boilerplate = ("Weights only load failed", "Check the documentation", "(1)", "(2)")
    rest = [line for line in lines if not line.startswith(boilerplate)] or lines or ["?"]
    return rest[0].rstrip(".")


def _legacy_globals() -> list:
    """What a train state of evav before checkpoint hashing needs: numpy's RNG state array."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_state(path: str | Path, legacy: bool = False) -> dict[str, Any]:
    """The train state of checkpoint ``path`` (evaluation, tools, resume), without DeepSpeed and
    without running code. ``legacy``: allow the numpy array an older evav saved."""
    f = Path(path) / TRAIN_STATE
    state = safe_load(f, _legacy_globals() if legacy else [])
    if not isinstance(state, dict) or type(state.get("step")) is not int:
        raise CheckpointError(f, "not a train state (no integer 'step')")
    return state


# -- save ------------------------------------------------------------------------------------


def save(
    engine,
    run_dir: str | Path,
    step: int,
    state: TrainState,
    config_yaml: str,
    denv: dist.DistEnv,
    keep_last: int = 2,
    keep_every: int = 0,
) -> Path:
    """Write a checkpoint collectively (every rank calls this) and commit it."""
    if not dist.state_is_finite(engine):
        good = last_good(run_dir)
        raise NonFiniteStateError(
            f"step {step}: the weights or the optimizer state hold NaN or inf (lower optim.lr?), "
            "so no checkpoint was written; "
            + (f"the last good checkpoint is {good}" if good else "there is no good checkpoint")
        )
    path = step_dir(run_dir, step)
    if denv.is_main and path.exists():
        shutil.rmtree(path)  # an uncommitted leftover of a killed save
    dist.barrier()
    dist.save_engine(engine, path, ENGINE)
    dist.barrier()
    if denv.is_main:
        _atomic_torch_save(state.to_dict(), path / TRAIN_STATE)  # plain data: weights_only
        _atomic_write(path / "config.yaml", config_yaml)
    faults.kill_in_save(step)
    dist.barrier()
    rels = dist.broadcast_object(_list_files(path) if denv.is_main else None)
    mine = [r for r in rels if _owner(r, denv.world_size) == denv.rank]
    hashed = dict(zip(mine, _hash_files(path, mine)))
    for r, got in hashed.items():
        if isinstance(got, str):
            raise CheckpointError(path / r, f"cannot read back what was just written ({got})")
    hashed = {r: h for part in dist.all_gather_objects(hashed) for r, h in part.items()}
    text = None
    if denv.is_main:
        files = [{"path": r, "size": hashed[r][0], "sha256": hashed[r][1]} for r in rels]
        marker = {"format": MARKER_FORMAT, "step": step, "time": time.time()}
        marker.update(world_size=denv.world_size, files=files)
        text = json.dumps(marker, indent=1)
        _atomic_write(path / MARKER, text)
    text = dist.broadcast_object(text)
    _remember(path, Verdict(True, files=tuple(rels), marker=text))
    if denv.is_main:
        _prune(run_dir, keep_last, keep_every)
    dist.barrier()
    return path


def _prune(run_dir: str | Path, keep_last: int, keep_every: int) -> None:
    done = complete_checkpoints(run_dir)
    want, verified, oldest = max(1, keep_last), 0, None
    for s, p in reversed(done):  # newest first, until `want` verified ones are found
        if verified >= want:
            break
        v = _cached(p) or verify(p)
        if not v.ok:
            new = _set_aside(p, v)
            log.warning("checkpoint %s fails verification (%s); set aside as %s", p, v.reason, new)
            continue
        _remember(p, v)
        verified += 0 if v.legacy else 1  # a legacy one is kept, never counted
        oldest = s
    if verified >= want:  # never delete while fewer than keep_last checkpoints verify
        for s, p in done:
            if s < oldest and not (keep_every and s % keep_every == 0) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    newest = done[-1][0] if done else -1
    for p in (Path(run_dir) / "checkpoints").iterdir():  # torn saves older than the newest commit
        s = step_of(p)
        if s is not None and s < newest and not (p / MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def _set_aside(path: Path, v: Verdict) -> Path:
    """Rename a checkpoint that failed verification to ``step_N.bad-SLUG-TIME`` (never deleted:
    the files are evidence, and the hashes may be what is wrong) with the reason inside."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    new = path.with_name(f"{path.name}.bad-{v.slug or 'unknown'}-{stamp}")
    n = 1
    while new.exists():
        n += 1
        new = path.with_name(f"{path.name}.bad-{v.slug or 'unknown'}-{stamp}-{n}")
    path.rename(new)
    try:
        (new / "SET_ASIDE").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {v.reason}\n")
    except OSError:
        pass  # the rename is what matters; the reason is in the log too
    return new


# -- resume ----------------------------------------------------------------------------------


def find_resume(run_dir: str | Path, denv: dist.DistEnv) -> tuple[Path | None, TrainState | None]:
    """The checkpoint a resume continues and its train state, before any engine exists (the
    resume contract is checked against it first); (None, None) for a run without checkpoints.
    Every rank calls this; ``load_engine`` then loads that checkpoint's engine files.

    The newest checkpoint that verifies, whose train state is a valid ``TrainState`` and whose
    engine files unpickle without running code. Failing checkpoints are set aside, newest first
    (see the module docstring); when all fail, CheckpointError. A file that would run code when
    loaded: UnsafeCheckpointError.
    """
    root = Path(run_dir) / "checkpoints"
    names = dist.broadcast_object(
        [p.name for _, p in complete_checkpoints(run_dir)] if denv.is_main else None
    )
    for name in reversed(names):
        path = root / name
        v = verify(path, denv.rank, denv.world_size)
        state = None
        if v.ok:
            if v.legacy and denv.is_main:
                log.warning("checkpoint %s: %s", path, v.reason)
            state, v = _read_checked(path, v, denv)
        if state is not None:
            _remember(path, v)
            return path, state
        if denv.is_main:
            new = _set_aside(path, v)
            log.warning(
                "checkpoint %s fails verification: %s; set aside as %s, resuming from the "
                "previous checkpoint",
                path,
                v.reason,
                new.name,
            )
        dist.barrier()  # the rename is done before any rank looks again
    bad = dist.broadcast_object([p.name for p in set_aside_dirs(run_dir)] if denv.is_main else None)
    if bad:
        raise CheckpointError(
            root,
            f"no checkpoint here verifies (set aside: {', '.join(bad)}), so this run is not "
            f"started again from step 0; to do that, move the set-aside directories out of {root}",
        )
    return None, None


def _read_checked(path: Path, v: Verdict, denv: dist.DistEnv) -> tuple[TrainState | None, Verdict]:
    """A verified checkpoint's train state, after a code-free unpickling check of this rank's
    engine files. (None, failing verdict) for an unreadable one (or a malformed train state)."""
    collective = denv.world_size > 1
    state, problem = None, None
    try:
        state = TrainState.from_dict(read_state(path, v.legacy), path / TRAIN_STATE)
        if state.step != step_of(path):
            problem = (
                "bad",
                str(path / TRAIN_STATE),
                f"step {state.step}, the directory says {step_of(path)}",
            )
    except UnsafeCheckpointError as e:
        problem = ("unsafe", e.path, e.reason)
    except BadInputError as e:  # CheckpointError, or a TrainState field that does not fit
        problem = ("bad", e.path, e.reason)
    if problem is None:
        allow = dist.engine_safe_globals()
        for rel in _engine_pickles(v.files):
            if _owner(rel, denv.world_size) == denv.rank or not collective:
                try:
                    safe_load(path / rel, allow, mmap=True)
                except UnsafeCheckpointError as e:
                    problem = ("unsafe", e.path, e.reason)
                except CheckpointError as e:
                    problem = ("bad", e.path, e.reason)
                if problem:
                    break
    if collective:  # the first problem of any rank, the same on every rank
        problem = next((p for p in dist.all_gather_objects(problem) if p), None)
    if problem is not None:
        kind, where, reason = problem
        if kind == "unsafe":
            raise UnsafeCheckpointError(where, reason)
        rel = Path(where).relative_to(path).as_posix()
        return None, Verdict(False, reason=f"{rel}: {reason}", slug="unreadable", files=v.files)
    return state, v


def load_engine(engine, path: Path) -> None:
    """Load checkpoint ``path``'s DeepSpeed files into ``engine`` (every rank), found by
    ``find_resume``; this run's optimizer settings are kept (``distributed.load_engine``).

    A ZeRO 1-3 checkpoint written by another number of ranks is loaded from its universal
    conversion (``universal``: made once, reused)."""
    saved_world, stage = saved_layout(path)
    world = dist.world_size()
    source = path / ENGINE
    try:
        if stage > 0 and saved_world != world:
            source = universal(path, world, saved_world, stage)
            dist.load_engine(engine, source.parent, ENGINE, universal=True)
        else:
            dist.load_engine(engine, path, ENGINE)
    except pickle.UnpicklingError as e:  # a file changed after the check above
        raise UnsafeCheckpointError(source, f"refused to unpickle: {_refusal(e)}") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(source, f"DeepSpeed cannot load it: {describe_error(e)}") from e


# -- another number of ranks: the universal checkpoint ----------------------------------------


def saved_layout(path: Path) -> tuple[int, int]:
    """(world size, ZeRO stage) checkpoint ``path`` was written with: the marker's world size,
    the train state's config's stage (a checkpoint from before the contract: its config.yaml;
    neither: DeepSpeed's file names, ZeRO 3 or 1-2 shards, else 0)."""
    marker = json.loads((path / MARKER).read_text())
    world = int(marker.get("world_size", 1))
    conf = None
    try:
        conf = read_state(path, legacy=True).get("config")
        if not isinstance(conf, dict):
            import yaml

            conf = yaml.safe_load((path / "config.yaml").read_text())
        stage = conf["engine"]["zero_stage"]
        if type(stage) is int:
            return world, stage
    except (OSError, KeyError, TypeError, ValueError, BadInputError):
        pass
    names = [p.name for p in (path / ENGINE).glob("*.pt")]
    if any(_RANK_SHARD.match(n) and n.endswith("model_states.pt") for n in names):
        return world, 3
    return world, (1 if any("zero_pp_rank_" in n for n in names) else 0)


def universal(path: Path, world: int, saved_world: int, stage: int) -> Path:
    """Checkpoint ``path``'s universal conversion, ``path/universal/engine`` (every rank calls
    it): made by rank 0 the first time (in ``path/universal.tmp-PID``, renamed when complete,
    with its own ``COMPLETE`` listing every file with its sha256), reused afterwards once its
    marker verifies (one that does not is removed and made again: it is derived data; the
    checkpoint's own files were verified by ``find_resume``). Logs what was converted and how
    long it took; CheckpointError when DeepSpeed cannot convert it."""
    out = path / UNIVERSAL
    problem = None
    if dist.rank() == 0:
        try:
            problem = _make_universal(path, world, saved_world, stage)
        except Exception as e:  # every rank must hear of it, not wait at the barrier
            problem = f"cannot convert it to a universal checkpoint: {describe_error(e)}"
    problem = dist.broadcast_object(problem)
    if problem:
        raise CheckpointError(path / ENGINE, problem)
    return out / ENGINE


def _make_universal(path: Path, world: int, saved_world: int, stage: int) -> str:
    """Rank 0's part of ``universal``: "" when ``path/universal`` is ready, else the problem."""
    out = path / UNIVERSAL
    for stale in path.glob(UNIVERSAL + ".tmp-*"):  # a conversion killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    if out.exists():
        v = verify_universal(out)
        if v.ok:
            log.info(
                "reusing %s (the universal checkpoint of %s, ZeRO %d, %s) for %s",
                out, path, stage, _ranks(saved_world), _ranks(world),
            )  # fmt: skip
            return ""
        log.warning("%s fails verification (%s): converting again", out, v.reason)
        shutil.rmtree(out)
    tmp = path / f"{UNIVERSAL}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    dist.to_universal(path, ENGINE, tmp)
    (tmp / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's; the tag is always given
    rels = _list_files(tmp)
    files = [
        {"path": r, "size": h[0], "sha256": h[1]}
        for r, h in zip(rels, _hash_files(tmp, rels))
        if not isinstance(h, str)
    ]
    if len(files) != len(rels):
        return f"cannot read back its universal conversion in {tmp}"
    marker = {"format": MARKER_FORMAT, "step": step_of(path), "time": time.time()}
    marker.update(source_world_size=saved_world, zero_stage=stage, files=files)
    _atomic_write(tmp / MARKER, json.dumps(marker, indent=1))
    tmp.rename(out)
    _remember(out, Verdict(True, files=tuple(rels), marker=(out / MARKER).read_text()))
    log.info(
        "converted %s (ZeRO %d, %s) to a universal checkpoint for %s in %.1f s",
        path, stage, _ranks(saved_world), _ranks(world), time.perf_counter() - t0,
    )  # fmt: skip
    return ""


def _ranks(n: int) -> str:
    return f"{n} rank{'s' if n != 1 else ''}"


def verify_universal(out: Path) -> Verdict:
    """Check a universal conversion ``step_N/universal`` against its own ``COMPLETE``: every
    listed file's size and sha256, and nothing unlisted (DeepSpeed globs its folders)."""
    cached = _cached(out)
    if cached is not None:
        return cached
    try:
        text = (out / MARKER).read_text()
        files = _entries(json.loads(text)["files"], whole_checkpoint=False)
        entries = list(enumerate(files))
        listed = {e["path"] for e in files}
    except _Failure as f:
        return Verdict(False, reason=f.reason, slug=f.slug)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return Verdict(False, reason=f"{MARKER}: unreadable ({describe_error(e)})", slug="marker")
    for rel in _list_files(out):
        if rel not in listed:
            return Verdict(False, reason=f"{rel}: not listed in {MARKER}", slug="unlisted")
    fails = _check_files(out, entries)
    if fails:
        return Verdict(False, reason=sorted(fails)[0][2], slug=sorted(fails)[0][1])
    v = Verdict(True, files=tuple(listed), marker=text)
    _remember(out, v)
    return v


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
