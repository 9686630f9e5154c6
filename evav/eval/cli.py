"""`evav eval` and `evav generate`.

evav eval runs/fsdd                          # the run's training data, val split, newest checkpoint
evav eval runs/fsdd --data shards/fsdd --split test --limit 50 --seed 1 --out results.json
torchrun --nproc_per_node 2 -m evav.cli eval runs/fsdd --data shards/fsdd   # samples split over ranks
evav generate runs/fsdd --task fsdd --input 7_george_0.wav --frames 1 --out answer.gif
evav generate exports/tiny --task add --input "two plus two" --frames 1 --out answer.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("evav.eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a run dir (its newest checkpoint that verifies), a "
        "RUN/checkpoints/step_NNNNNNNN dir, or an export dir (evav export)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="dataset dir(s) with manifest.json, comma-separated (default: the run's training "
        "data, data.train, on its validation split)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="default: with --data, test when every dataset has it, else val; "
        "without, the run's data.val_split",
    )
    p.add_argument(
        "--out",
        default=None,
        help="results JSON (default: RUN/eval/DATASET/SPLIT/step_NNNNNNNN.json for a training "
        "checkpoint, else ./eval/DATASET/SPLIT/step_NNNNNNNN.json)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most N samples per task, stratified: every answer in proportion",
    )
    p.add_argument("--seed", type=int, default=0, help="which samples --limit draws (default 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-video-frames",
        type=int,
        default=8,
        help="frames predicted for pretraining clips (clips without an answer segment)",
    )
    p.add_argument("--report", default=None, help="report dir (default: next to --out, *_report)")
    p.add_argument("--no-report", action="store_true", help="write the JSON only")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--allow-render-mismatch",
        action="store_true",
        help="evaluate even if the data was rendered differently from the training data",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import torch

    from evav import distributed as dist
    from evav.distributed import EngineConfig
    from evav.eval import report
    from evav.eval.load import load_checkpoint
    from evav.eval.run import EvalOptions, RenderMismatchError, evaluate
    from evav.eval.samples import NoSamplesError, default_split, load_eval_data, one_line
    from evav.metrics import redact_uri

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("DeepSpeed", "deepspeed", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from evav import threads

    threads_set = threads.configure(0)  # before any thread pool starts; samples decode here
    denv = dist.launch_env()
    if denv.world_size > 1:
        denv = dist.init(EngineConfig())
    if denv.rank == 0:
        log.info("CPU threads per process: %s", threads_set)
    try:
        device = torch.device(
            "cuda"
            if args.device == "auto" and torch.cuda.is_available()
            else "cpu"
            if args.device == "auto"
            else args.device
        )
        if device.type == "cuda" and denv.world_size > 1:
            device = dist.device()
        try:
            if args.limit is not None and args.limit < 1:
                raise ValueError(f"--limit must be >= 1, not {args.limit}")
            loaded = load_checkpoint(args.checkpoint, device)
            if args.data:
                dirs = [d for d in args.data.split(",") if d]
                split = args.split or default_split(dirs)
            else:
                split = args.split or loaded.config.data.val_split
                dirs = training_data(loaded, split)
            data = load_eval_data(dirs, split, args.limit, args.seed)
        except (OSError, ValueError) as e:
            print(f"evav eval: error: {one_line(str(e), 1000)}", file=sys.stderr)
            return 2
        if denv.is_main:
            log.info(
                "checkpoint %s (step %d), %d samples of split %r in %d task(s), %d process(es)%s",
                loaded.path,
                loaded.step,
                len(data.samples),
                split,
                len(data.by_task()),
                denv.world_size,
                f"; {len(data.skipped)} bad sample(s) skipped" if data.skipped else "",
            )
        opts = EvalOptions(
            batch_size=args.batch_size,
            max_video_frames=args.max_video_frames,
            allow_render_mismatch=args.allow_render_mismatch,
            progress=not args.quiet,
        )
        try:
            results = evaluate(loaded, data, opts, denv.rank, denv.world_size, device)
        except (RenderMismatchError, NoSamplesError) as e:
            print(f"evav eval: error: {e}", file=sys.stderr)
            return 2
        if not denv.is_main:
            return 0
        results = {
            "checkpoint": str(loaded.path),
            "step": loaded.step,
            "model": loaded.config.model.preset,
            "processes": denv.world_size,
            "dataset": report.dataset_name(dirs),
            "limit": args.limit,
            "seed": args.seed,
            **results,
        }
        out = Path(args.out) if args.out else default_out(loaded, results["dataset"], split)
        rdir = Path(args.report) if args.report else out.with_name(out.stem + "_report")
        try:
            report.write_results(results, out)
            files = [out]
            if not args.no_report:
                files.append(report.write_report(results, rdir).parent)
        except (OSError, ValueError) as e:
            print(f"evav eval: error: {one_line(str(e), 1000)}", file=sys.stderr)
            return 2
        print(
            f"{results['dataset']}, split {split}, step {loaded.step}"
            + (f", {args.limit} per task (seed {args.seed})" if args.limit else "")
        )
        print(report.summary_table(results))
        if results["skipped_total"]:
            print(report.skipped_summary(results))
        print(
            f"results: {out}" + (f"\nreport:  {files[1] / 'report.md'}" if len(files) > 1 else "")
        )
        if not args.no_mlflow:
            run_id = report.log_mlflow(
                results, files, loaded.tracking_uri, loaded.mlflow_run_id, loaded.step
            )
            if run_id:
                where = (
                    redact_uri(loaded.tracking_uri) if loaded.tracking_uri else "the default store"
                )
                print(f"mlflow:  run {run_id} at {where}")
        return 0
    finally:
        dist.destroy()


def default_out(loaded, dataset: str, split: str) -> Path:
    """RUN/eval/DATASET/SPLIT/step_N.json for RUN/checkpoints/step_N, else the same under ./"""
    from evav.eval.report import results_path

    p = loaded.path
    run = p.parent.parent if p.parent.name == "checkpoints" else Path(".")
    return results_path(run, dataset, split, loaded.step)


def training_data(loaded, split: str) -> list[str]:
    """The run's training datasets (``data.train``) that have ``split``; a one-line ValueError
    when none has."""
    from evav.manifest import load_manifest

    dirs, why = [], []
    for d in loaded.config.data.train:
        try:
            m = load_manifest(d)
        except (OSError, ValueError) as e:
            why.append(f"{d}: {e}")
            continue
        if split in m.splits:
            dirs.append(d)
        else:
            why.append(f"{d} has no split {split!r}")
    if not dirs:
        listed = "; ".join(why) if why else "data.train is empty"
        raise ValueError(
            f"no --data given and the checkpoint's training data has no {split!r} split to "
            f"evaluate ({listed}); pass --data DIR"
        )
    return dirs


# -- evav generate ---------------------------------------------------------------------------


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run dir, a checkpoint dir or an export dir")
    p.add_argument(
        "--input",
        required=True,
        help="text, or an image/audio/video file (the modality comes from the suffix)",
    )
    p.add_argument("--task", required=True, help="the task name rendered in the first frame")
    p.add_argument("--frames", type=int, default=1, help="frames to generate after the prompt")
    p.add_argument(
        "--data",
        default=None,
        help="a dataset dir whose RenderSpec to render with "
        "(default: the training data's, else a default spec of the model's frame size)",
    )
    p.add_argument("--video-frames", type=int, default=8, help="frames taken from a video input")
    p.add_argument("--out", required=True, help="clip.png | clip.gif | clip.mp4")
    p.add_argument("--allow-render-mismatch", action="store_true")


def generate_main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from evav.errors import BadInputError
    from evav.eval.load import load_checkpoint
    from evav.eval.samples import one_line
    from evav.frames import TextRenderer, render_audio, render_image, render_video, save_clip
    from evav.frames.cli import guess_kind
    from evav.model import generate

    if args.frames < 1:
        raise BadInputError(args.out, "--frames must be >= 1")
    if not Path(args.input).is_file() and looks_like_path(args.input):
        print(
            f"evav generate: error: --input {one_line(args.input)}: no such file "
            "(text to render has a space, or neither a slash nor a file extension)",
            file=sys.stderr,
        )
        return 2
    try:
        loaded = load_checkpoint(args.checkpoint)
        spec = render_spec_for(loaded, args.data)
    except (OSError, ValueError) as e:
        print(f"evav generate: error: {e}", file=sys.stderr)
        return 2
    if spec.hash != loaded.render_hash and not args.allow_render_mismatch:
        print(
            f"evav generate: error: the checkpoint was trained on render hash {loaded.render_hash}, "
            f"this RenderSpec has {spec.hash}; pass --data DIR (the training data) or "
            "--allow-render-mismatch",
            file=sys.stderr,
        )
        return 2
    text = TextRenderer(spec)
    src = Path(args.input)
    try:
        if src.is_file():
            kind = guess_kind(src)
            inputs = {
                "image": lambda: render_image(src, spec),
                "audio": lambda: render_audio(src, spec),
                "video": lambda: render_video(src, spec, args.video_frames),
            }[kind]()
        else:
            inputs = text.render_text(args.input)
        prompt = np.concatenate([text.task_frame(args.task)[None], inputs, text.separator()[None]])
    except BadInputError as e:
        print(f"evav generate: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - whatever a decoder does with a bad file, say it in a line
        what = str(src) if src.is_file() else "--input/--task text"
        print(
            f"evav generate: error: {one_line(what)}: cannot render it "
            f"({type(e).__name__}: {one_line(str(e))})",
            file=sys.stderr,
        )
        return 2
    x = torch.from_numpy(prompt)[None].float().div(255)
    gen = generate(loaded.model, x, args.frames)[0]
    gen_u8 = gen.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    try:
        out = save_clip(np.concatenate([prompt, gen_u8]), args.out)
    except (OSError, ValueError) as e:
        print(f"evav generate: error: {args.out}: cannot write it ({e})", file=sys.stderr)
        return 2
    print(f"{out}: {len(prompt)} prompt frames + {len(gen_u8)} generated")
    print(read_back(loaded, spec, args.task, gen_u8, args.data))
    return 0


def looks_like_path(s: str) -> bool:
    """An --input that is meant as a file: one word with a slash or a file extension."""
    import re

    return not re.search(r"\s", s) and (
        "/" in s or "\\" in s or bool(re.search(r"\.[A-Za-z]\w{0,4}$", s))
    )


def read_back(loaded, spec, task: str, gen_THWC, data_dir: str | None) -> str:
    """One line: the answer read back from generated frames, against the task's answers in the
    data (``data_dir``, else the training data; its test or val split), with the distance to
    it and to the runner-up (classification tasks); open and multi-label answers as the nearest
    answer word of each frame; frame answers (tracking, video) are scored by evav eval."""
    from evav.eval.readers import (
        ClassificationReader,
        MultiLabelReader,
        _contains,
        _VocabularyReader,
        make_reader,
    )
    from evav.eval.samples import default_split, load_eval_data, one_line
    from evav.frames import TextRenderer

    dirs = [data_dir] if data_dir else list(loaded.config.data.train)
    try:
        data = load_eval_data(dirs, default_split(dirs))
        samples = data.by_task(population=True).get(task)
        if not samples:
            return f"read back: none (no sample of task {one_line(task)!r} in {', '.join(dirs)})"
        reader = make_reader(task, samples, TextRenderer(spec))
    except (OSError, ValueError) as e:
        return f"read back: none ({one_line(str(e))})"
    if isinstance(reader, ClassificationReader):
        ranked = reader.ranked(gen_THWC)
        (best, d), rest = ranked[0], ranked[1:]
        frames = min(len(gen_THWC), reader.max_len)
        note = (
            f"; compared on {frames} of {reader.max_len} answer frames"
            if frames < reader.max_len
            else ""
        )
        runner = f", runner-up {one_line(rest[0][0])!r} at {rest[0][1]:.1f}" if rest else ""
        return f"read back: {one_line(best)!r} (mean squared distance {d:.1f}{runner}{note})"
    if isinstance(reader, _VocabularyReader):  # open and multi-label answers: words
        words = reader.decoder.decode(gen_THWC[: reader.max_len])
        found = (
            f"; labels {[one_line(x) for x in reader.labels if _contains(words, reader.text.tokenize(x))]}"
            if isinstance(reader, MultiLabelReader)
            else ""
        )
        return (
            f"read back: {one_line(' '.join(words))!r} (each frame as the nearest of the task's "
            f"{len(reader.vocab)} answer words{found})"
        )
    return f"read back: none (task {one_line(task)!r} is of kind {reader.kind}; evav eval reads it)"


def render_spec_for(loaded, data_dir: str | None):
    """The RenderSpec to render inputs with: ``data_dir``'s, the training data's, or a default."""
    from evav.config import from_dict, load_config
    from evav.frames import RenderSpec
    from evav.manifest import load_manifest

    saved = loaded.path / "render_spec.yaml"  # written by evav export
    if not data_dir and saved.is_file():
        return load_config(RenderSpec, saved, [])
    for d in [data_dir] if data_dir else list(loaded.config.data.train):
        try:
            return from_dict(RenderSpec, load_manifest(d).render_spec, "render_spec")
        except (OSError, ValueError):
            if data_dir:
                raise
    return RenderSpec(height=loaded.config.model.height, width=loaded.config.model.width)
