"""Evaluate a loaded model on an evaluation split: batched KV-cached generation, read-out, scores.

    results = evaluate(loaded, data, EvalOptions(batch_size=32))

Batches are formed once, globally and deterministically: per task, samples with the same prompt
and generation lengths, in split order, cut into ``batch_size`` pieces. Rank ``r`` of ``W``
takes batches ``r, r + W, ...``; per-sample records are gathered and put back in split order
before scoring. Each batch is computed identically whatever the number of processes, so 1 and
N processes give the same results, bit for bit, and so do two runs on the same machine.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from evav import distributed as dist
from evav.config import from_dict
from evav.data.clips import BadSample
from evav.eval.load import Loaded
from evav.eval.readers import Reader, chance_level, make_reader, prompt_length
from evav.eval.samples import ClipReader, EvalData, EvalSample
from evav.frames import RenderSpec, TextRenderer
from evav.model import generate

log = logging.getLogger("evav.eval")


@dataclass
class EvalOptions:
    batch_size: int = 32
    max_video_frames: int = 8  # frames predicted for pretraining clips (no answer segment)
    examples_per_task: int = 2  # clips kept for the report (input | predicted | true)
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


def plan_batches(data: EvalData, readers: dict[str, Reader], batch_size: int) -> list[list[int]]:
    """Indices into ``data.samples``, grouped by (task, prompt length, generated length)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(data.samples):
        groups[(s.task, prompt_length(s.meta), readers[s.task].gen_length(s))].append(i)
    batches = []
    for _, idx in sorted(groups.items()):
        batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return batches


def evaluate(
    loaded: Loaded,
    data: EvalData,
    opts: EvalOptions,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
) -> dict:
    check_render_hash(loaded, data, opts.allow_render_mismatch)
    text = TextRenderer(render_spec_of(data))
    tasks = data.by_task(population=True)
    readers = {
        t: make_reader(t, ss, text, opts.max_video_frames)
        for t, ss in tasks.items()
        if t in data.by_task()
    }
    batches = plan_batches(data, readers, opts.batch_size)
    mine = batches[rank::world]
    clips = ClipReader()
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
            records += list(zip(batch, recs))
            examples += [
                e for e in ex if sum(t == e[1] for _, t, _ in examples) < opts.examples_per_task
            ]
            bar.update(len(batch))
    finally:
        bar.close()
        clips.close()
    gathered = [r for part in dist.all_gather_objects(records) for r in part]
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
    """Generate and read one batch (same task, prompt length and generated length)."""
    reader = readers[samples[0].task]
    p, n = prompt_length(samples[0].meta), reader.gen_length(samples[0])
    good, out = [], [None] * len(samples)
    prompts, truths = [], []
    for j, s in enumerate(samples):
        try:
            clip = clips.clip(s)
        except BadSample as e:
            out[j] = {"key": s.key, "task": s.task, "bad": str(e)}
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
            rec = reader.read(gen_u8[k], truths[k], s)
            out[j] = {"key": s.key, "task": s.task, **rec}
            examples.append((index[j], s.task, (prompts[k], gen_u8[k], truths[k])))
    return out, examples


def _score(records: list[tuple[int, dict]], data: EvalData, readers: dict[str, Reader]) -> dict:
    by_task: dict[str, list[dict]] = defaultdict(list)
    for _, r in records:
        by_task[r["task"]].append(r)
    tasks = {}
    for task, recs in sorted(by_task.items()):
        ok = [r for r in recs if "bad" not in r]
        reader = readers[task]
        metrics = reader.score(ok) if ok else {}
        metrics.pop("n", None)
        tasks[task] = {
            "kind": reader.kind,
            "samples": len(ok),
            "skipped": len(recs) - len(ok),
            "chance": chance_level(reader),
            **metrics,
        }
    return {
        "split": data.split,
        "render_hash": data.render_hash,
        "datasets": sorted(data.manifests),
        "tasks": tasks,
        "skipped_metadata": len(data.bad),
        "predictions": [r for _, r in records],
    }


def _first_examples(parts: list[list], per_task: int) -> dict[str, list[tuple]]:
    """The first ``per_task`` clips of every task, in split order (the same for any world size)."""
    out: dict[str, list] = defaultdict(list)
    for _, task, clip in sorted((e for part in parts for e in part), key=lambda e: e[0]):
        if len(out[task]) < per_task:
            out[task].append(clip)
    return dict(sorted(out.items()))
