"""`evav eval` and `evav generate`.

evav eval runs/fsdd --data shards/fsdd --out results.json        # newest checkpoint that verifies
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
        "RUN/checkpoints/step_NNNNNNNN dir, or an export dir (tools/export.py)",
    )
    p.add_argument(
        "--data", required=True, help="dataset dir(s) with manifest.json, comma-separated"
    )
    p.add_argument(
        "--split", default=None, help="default: test when every dataset has it, else val"
    )
    p.add_argument(
        "--out",
        default=None,
        help="results JSON (default: RUN/eval/step_NNNNNNNN.json "
        "for a training checkpoint, else ./results.json)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N samples per task")
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
    from evav.eval.samples import NoSamplesError, default_split, load_eval_data
    from evav.metrics import redact_uri

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("DeepSpeed", "deepspeed", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    denv = dist.launch_env()
    if denv.world_size > 1:
        denv = dist.init(EngineConfig())
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
        dirs = [d for d in args.data.split(",") if d]
        try:
            split = args.split or default_split(dirs)
            data = load_eval_data(dirs, split, args.limit)
            loaded = load_checkpoint(args.checkpoint, device)
        except (OSError, ValueError) as e:
            print(f"evav eval: error: {e}", file=sys.stderr)
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
            **results,
        }
        out = Path(args.out) if args.out else default_out(loaded)
        report.write_results(results, out)
        files = [out]
        if not args.no_report:
            rdir = Path(args.report) if args.report else out.with_name(out.stem + "_report")
            files.append(report.write_report(results, rdir).parent)
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


def default_out(loaded) -> Path:
    p = loaded.path
    if p.parent.name == "checkpoints":  # RUN/checkpoints/step_N -> RUN/eval/step_N.json
        return p.parent.parent / "eval" / f"{p.name}.json"
    return Path("results.json")


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
    return 0


def render_spec_for(loaded, data_dir: str | None):
    """The RenderSpec to render inputs with: ``data_dir``'s, the training data's, or a default."""
    from evav.config import from_dict, load_config
    from evav.frames import RenderSpec
    from evav.manifest import load_manifest

    saved = loaded.path / "render_spec.yaml"  # written by tools/export.py
    if not data_dir and saved.is_file():
        return load_config(RenderSpec, saved, [])
    for d in [data_dir] if data_dir else list(loaded.config.data.train):
        try:
            return from_dict(RenderSpec, load_manifest(d).render_spec, "render_spec")
        except (OSError, ValueError):
            if data_dir:
                raise
    return RenderSpec(height=loaded.config.model.height, width=loaded.config.model.width)
