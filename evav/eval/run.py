"""Evaluate a loaded model on an evaluation split: batched KV-cached generation, read-out, scores.

    results = evaluate(loaded, data, EvalOptions(batch_size=32))

Batches are formed once, globally and deterministically: per task, samples with the same prompt
and generation lengths, in split order, cut into ``batch_size`` pieces. Rank ``r`` of ``W``
takes batches ``r, r + W, ...``; per-sample records are gathered and put back in split order
before scoring. Each batch is computed identically whatever the number of processes, so 1 and
N processes give the same results, bit for bit, and so do two runs on the same machine.

A bad sample never stops the evaluation: one whose clip fails its checks is dropped from its
batch before generation (the batch's other samples are generated as if it had never been
there), one whose reader fails is dropped after it, and the results count the skipped samples
per task and reason (``skipped``, ``skipped_total``) and list them (``skipped_samples``; the
reasons are in evav.eval.samples). A task with no good sample gets an entry all the same
(``samples: 0``); ``NoSamplesError`` when not one sample of the split could be evaluated.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from evav import distributed as dist
from evav.config import from_dict
from evav.data.clips import BadSample
from evav.eval.load import Loaded
from evav.eval.readers import (
    Reader,
    chance_level,
    majority_baseline,
    make_reader,
    prompt_length,
)
from evav.eval.samples import (
    ClipReader,
    EvalData,
    EvalSample,
    SkipLog,
    Skipped,
    no_samples_error,
    problem,
)
from evav.frames import RenderSpec, TextRenderer
from evav.model import generate

log = logging.getLogger("evav.eval")


@dataclass
class EvalOptions:
    batch_size: int = 32
    max_video_frames: int = 8  # frames predicted for pretraining clips (no answer segment)
    examples_per_task: int = 2  # clips kept for the report (input | predicted | true, record)
    allow_render_mismatch: bool = False
    progress: bool = True


class RenderMismatchError(ValueError):
    pass


def render_spec_of(data: EvalData) -> RenderSpec:
    """The dataset's RenderSpec, re-built and checked against the hash its manifest records."""
    spec = from_dict(RenderSpec, data.render_spec, "manifest render_spec")
    if spec.hash != data.render_hash:
        raise RenderMismatchError(
            f"the data's render spec re-renders with hash {spec.hash}, its manifest says "
            f"{data.render_hash} (a font or tokenizer file changed or moved?)"
        )
    return spec


def check_render_hash(loaded: Loaded, data: EvalData, allow: bool) -> None:
    if loaded.render_hash == data.render_hash:
        return
    msg = (
        f"checkpoint {loaded.path} was trained on frames rendered with hash {loaded.render_hash}, "
        f"the evaluation data has {data.render_hash}"
    )
    if not allow:
        raise RenderMismatchError(msg + "; pass --allow-render-mismatch to evaluate anyway")
    log.warning("%s (allowed by --allow-render-mismatch)", msg)


def plan_batches(
    data: EvalData, readers: dict[str, Reader], batch_size: int
) -> tuple[list[list[int]], list[tuple[int, Skipped]]]:
    """Indices into ``data.samples``, grouped by (task, prompt length, generated length), and
    the samples that cannot be planned (a task without a reader, segments that leave no prompt
    or no answer), with their index."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    skipped: list[tuple[int, Skipped]] = []
    for i, s in enumerate(data.samples):
        reader = readers.get(s.task)
        if reader is None:
            continue  # the task's reader failed: its samples are skipped by evaluate
        try:
            p, t, n = prompt_length(s.meta), reader.truth_length(s), reader.gen_length(s)
        except Exception as e:  # noqa: BLE001 - metadata one reader cannot use is that sample's
            skipped.append((i, s.skipped("segments", problem(e)[1])))
            continue
        if p < 1 or t < 1 or n < 1 or p + t > int(s.meta["num_frames"]):
            why = (
                f"segments {s.meta['segments']} give a prompt of {p} frames and {t} true "
                f"frames of {s.meta['num_frames']}, {n} to generate"
            )
            skipped.append((i, s.skipped("segments", why)))
            continue
        groups[(s.task, p, n)].append(i)
    batches = []
    for _, idx in sorted(groups.items()):
        batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return batches, skipped


def make_readers(
    data: EvalData, text: TextRenderer, max_video_frames: int
) -> tuple[dict[str, Reader], list[tuple[int, Skipped]]]:
    """A reader per evaluated task (from the whole split's samples); a task whose reader
    cannot be built (no answer to read, say) has its samples skipped, not the evaluation."""
    population, evaluated = data.by_task(population=True), data.by_task()
    readers: dict[str, Reader] = {}
    failed: dict[str, str] = {}
    for task in evaluated:
        try:
            readers[task] = make_reader(task, population[task], text, max_video_frames)
        except Exception as e:  # noqa: BLE001 - the task's metadata is data, not code
            failed[task] = f"task {task!r}: its answers cannot be read ({problem(e)[1]})"
    skipped = [
        (i, s.skipped("task_reader", failed[s.task]))
        for i, s in enumerate(data.samples)
        if s.task in failed
    ]
    return readers, skipped


def evaluate(
    loaded: Loaded,
    data: EvalData,
    opts: EvalOptions,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
) -> dict:
    """Generate, read and score every sample of ``data``; bad samples are skipped and counted.

    Raises ``NoSamplesError`` (on every rank) when not one sample could be evaluated.
    """
    check_render_hash(loaded, data, opts.allow_render_mismatch)
    text = TextRenderer(render_spec_of(data))
    readers, unread = make_readers(data, text, opts.max_video_frames)
    batches, unplanned = plan_batches(data, readers, opts.batch_size)
    skip_log = SkipLog()
    if rank == 0:  # every rank plans the same batches; one of them says so
        for sk in data.skipped + [sk for _, sk in unread + unplanned]:
            skip_log(sk)
    mine = batches[rank::world]
    clips = ClipReader(data.manifests)
    records: list[tuple[int, dict]] = []
    examples: list[tuple[int, str, tuple]] = []
    bar = tqdm(
        total=sum(len(b) for b in mine),
        unit="sample",
        desc="eval",
        disable=not opts.progress or rank != 0,
    )
    amp = torch.device(device).type == "cuda"
    try:
        for batch in mine:
            recs, ex = _run_batch(
                loaded.model, batch, [data.samples[i] for i in batch], readers, clips, device, amp
            )
            for r in recs:
                if "skipped" in r:
                    skip_log(Skipped(**r["skipped"]))
            records += list(zip(batch, recs))
            examples += [
                e for e in ex if sum(t == e[1] for _, t, _ in examples) < opts.examples_per_task
            ]
            bar.update(len(batch))
    finally:
        bar.close()
        clips.close()
    gathered = [r for part in dist.all_gather_objects(records) for r in part]
    gathered += [(i, {"skipped": sk.to_dict()}) for i, sk in unread + unplanned]
    gathered.sort(key=lambda r: r[0])
    results = _score(gathered, data, readers)
    results["_examples"] = _first_examples(
        dist.all_gather_objects(examples), opts.examples_per_task
    )
    return results


def _run_batch(
    model,
    index: list[int],
    samples: list[EvalSample],
    readers: dict[str, Reader],
    clips: ClipReader,
    device,
    amp: bool,
) -> tuple[list[dict], list]:
    """Generate and read one batch (same task, prompt length and generated length).

    A sample whose clip is bad is dropped from the batch before generation (its record says
    why), so it costs the batch's other samples nothing.
    """
    reader = readers[samples[0].task]
    p, n = prompt_length(samples[0].meta), reader.gen_length(samples[0])
    good, out = [], [None] * len(samples)
    prompts, truths = [], []
    for j, s in enumerate(samples):
        try:
            clip = clips.clip(s)
        except BadSample as e:
            out[j] = {"skipped": s.skipped(e.kind, str(e)).to_dict()}
            continue
        good.append(j)
        prompts.append(clip[:p])
        truths.append(clip[p : p + reader.truth_length(s)])
    examples = []
    if good:
        x = torch.from_numpy(np.stack(prompts)).to(device).float().div_(255)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            gen = generate(model, x, n)
        gen_u8 = gen.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).cpu().numpy()
        for k, j in enumerate(good):
            s = samples[j]
            try:
                rec = reader.read(gen_u8[k], truths[k], s)
            except Exception as e:  # noqa: BLE001 - metadata the reader cannot use (boxes, ...)
                out[j] = {"skipped": s.skipped("readout", problem(e)[1]).to_dict()}
                continue
            try:
                rec.update(reader.baseline(prompts[k], truths[k], s))
            except Exception as e:  # noqa: BLE001 - as for read: this sample's metadata
                out[j] = {"skipped": s.skipped("readout", problem(e)[1]).to_dict()}
                continue
            out[j] = {"key": s.key, "task": s.task, **rec}
            examples.append((index[j], s.task, (prompts[k], gen_u8[k], truths[k], out[j])))
    return out, examples


MAX_LISTED = 1000  # skipped samples listed one by one in the results (all are counted)


def _score(records: list[tuple[int, dict]], data: EvalData, readers: dict[str, Reader]) -> dict:
    done: dict[str, list[dict]] = defaultdict(list)
    skipped = list(data.skipped)
    for _, r in records:
        if "skipped" in r:
            skipped.append(Skipped(**r["skipped"]))
        else:
            done[r["task"]].append(r)
    if not done:
        raise no_samples_error(sorted(data.manifests), data.split, skipped)
    names = set(data.by_task()) | {s.task for s in skipped if s.task is not None}
    tasks = {}
    for task in sorted(names):
        ok, reader = done.get(task, []), readers.get(task)
        reasons = Counter(s.reason for s in skipped if s.task == task)
        metrics = reader.score(ok) if ok and reader is not None else {}
        metrics.pop("n", None)
        metrics, undefined = _finite(metrics)
        tasks[task] = {
            "kind": reader.kind if reader is not None else None,
            "samples": len(ok),
            "skipped": dict(sorted(reasons.items())),
            "skipped_total": sum(reasons.values()),
            "chance": chance_level(reader) if reader is not None else None,
            **metrics,
            **majority_baseline(ok),
        }
        if undefined:  # metrics with no finite value are null in the JSON, and listed here
            tasks[task]["undefined"] = undefined
    reasons = Counter(s.reason for s in skipped)
    return {
        "split": data.split,
        "render_hash": data.render_hash,
        "datasets": sorted(data.manifests),
        "tasks": tasks,
        "skipped": dict(sorted(reasons.items())),
        "skipped_total": len(skipped),
        "skipped_samples": [s.to_dict() for s in skipped[:MAX_LISTED]],
        "predictions": [r for _, r in records if "skipped" not in r],
    }


def _finite(metrics: dict) -> tuple[dict, list[str]]:
    """``metrics`` with every non-finite float (nested ones too) as None, and their names:
    JSON has no NaN, and a null must not pass for a number."""
    undefined: list[str] = []

    def clean(v, name):
        if isinstance(v, float) and not math.isfinite(v):
            undefined.append(name)
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{name}.{k}") for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{name}[{i}]") for i, x in enumerate(v)]
        return v

    return {k: clean(v, k) for k, v in metrics.items()}, undefined


def _first_examples(parts: list[list], per_task: int) -> dict[str, list[tuple]]:
    """The first ``per_task`` clips of every task, in split order (the same for any world size)."""
    out: dict[str, list] = defaultdict(list)
    for _, task, clip in sorted((e for part in parts for e in part), key=lambda e: e[0]):
        if len(out[task]) < per_task:
            out[task].append(clip)
    return dict(sorted(out.items()))
