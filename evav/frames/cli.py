"""`evav render` and `evav tokenizer`: look at what the model sees; train a subword tokenizer.

evav render --text "the movie was great" --out words.png
evav render ../shared/datasets/fsdd/recordings/7_george_5.wav --out seven.png
evav render clip.mp4 --frames 8 --out clip.gif height=128 width=128
evav tokenizer train --input corpus.txt --out tok.model --vocab-size 8000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from evav.config import load_config
from evav.errors import BadInputError

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif"}
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv"}


def guess_kind(path: Path) -> str:
    """image, audio or video from the file name; a clear error for anything else."""
    from PIL import Image

    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in Image.registered_extensions():
        return "image"
    raise BadInputError(path, f"cannot tell the modality from the suffix {suffix!r}; pass --kind")


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", metavar="FILE", help="an image, audio or video file")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="RenderSpec overrides, e.g. height=128 width=128 audio.n_mels=128",
    )
    p.add_argument("--text", help="render this text instead of a file")
    p.add_argument("--out", required=True, help="output: .png (contact sheet), .gif or .mp4")
    p.add_argument("--kind", choices=["image", "audio", "video"], help="force the input's modality")
    p.add_argument("--frames", type=int, default=16, help="frame budget for video (default 16)")
    p.add_argument("--task", help="prepend this task-name frame")
    p.add_argument("--config", help="a RenderSpec YAML file (e.g. configs/render/64.yaml)")


def render_main(args: argparse.Namespace) -> int:
    import numpy as np

    from evav.frames import (
        RenderSpec,
        TextRenderer,
        render_audio,
        render_image,
        render_video,
        save_clip,
    )

    overrides = list(args.overrides)
    if args.file and "=" in args.file:  # `evav render --text T height=128`
        overrides.insert(0, args.file)
        args.file = None
    if bool(args.text) == bool(args.file):
        raise SystemExit("evav render: give exactly one of --text TEXT or one FILE")
    if Path(args.out).suffix.lower() not in (".png", ".gif", ".mp4"):
        raise SystemExit(f"evav render: --out {args.out}: must end in .png, .gif or .mp4")
    spec = load_config(RenderSpec, args.config, overrides)
    text = TextRenderer(spec)
    if args.text:
        frames = text.render_text(args.text)
        if len(frames) == 0:
            raise SystemExit("evav render: the text has no tokens to render")
    else:
        path = Path(args.file)
        kind = args.kind or guess_kind(path)
        if kind == "image":
            frames = render_image(path, spec)
        elif kind == "audio":
            frames = render_audio(path, spec)
        else:
            frames = render_video(path, spec, args.frames)
    if args.task:
        frames = np.concatenate([text.task_frame(args.task)[None], frames])
    out = save_clip(frames, args.out)
    print(f"{out}: {len(frames)} frames of {spec.height}x{spec.width} (render hash {spec.hash})")
    return 0


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model on a text file")
    t.add_argument("--input", required=True, help="a UTF-8 text file, one sentence per line")
    t.add_argument("--out", required=True, help="the model file to write (NAME.model)")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")


def tokenizer_main(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    src, out = Path(args.input), Path(args.out)
    if not src.is_file() or src.stat().st_size == 0:
        raise BadInputError(src, "missing or empty text file")
    if out.suffix != ".model":
        raise SystemExit(f"evav tokenizer: --out must end in .model, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prefix = Path(tmp) / "tok"
        spm.SentencePieceTrainer.train(
            input=str(src),
            model_prefix=str(prefix),
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        prefix.with_suffix(".model").replace(out)
        prefix.with_suffix(".vocab").replace(out.with_suffix(".vocab"))
    print(
        f"{out}: SentencePiece {args.model_type} model, vocabulary up to {args.vocab_size}; "
        f"use it with tokenizer={out}"
    )
    return 0
