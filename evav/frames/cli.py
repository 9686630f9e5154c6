"""`evav render` and `evav tokenizer`: look at what the model sees; train a subword tokenizer.

evav render --text "the movie was great" --out words.png
evav render ../shared/datasets/fsdd/recordings/7_george_5.wav --out seven.png
evav render clip.mp4 --frames 8 --out clip.gif height=128 width=128
evav tokenizer train --input corpus.txt --out tok.model --vocab-size 8000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from evav.config import ConfigError, load_config
from evav.errors import BadInputError, describe_error

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
    p.epilog = (
        "Exit status: 0, or 2 with one line `evav render: error: PATH: reason` on stderr for a "
        "bad option or input file."
    )
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
    """Render one input; any bad option or input file is one line on stderr and exit code 2:
    ``evav render: error: PATH: reason`` (never a traceback)."""
    try:
        return _render(args)
    except _RenderError as e:
        print(f"evav render: error: {e}", file=sys.stderr)
        return 2


class _RenderError(Exception):
    """A bad option or input, already worded for the user."""


def _render(args: argparse.Namespace) -> int:
    import numpy as np

    from evav.frames import (
        RenderSpec,
        TextRenderer,
        render_audio,
        render_image,
        render_video,
        save_clip,
    )
    from evav.frames.video import MAX_FRAMES

    overrides = list(args.overrides)
    if args.file and "=" in args.file and not Path(args.file).exists():  # `--text T height=128`
        overrides.insert(0, args.file)
        args.file = None
    if bool(args.text) == bool(args.file):
        raise _RenderError("give exactly one of --text TEXT or one FILE")
    if Path(args.out).suffix.lower() not in (".png", ".gif", ".mp4"):
        raise _RenderError(f"--out {args.out}: must end in .png, .gif or .mp4")
    if not 1 <= args.frames <= MAX_FRAMES:
        raise _RenderError(f"--frames must be between 1 and {MAX_FRAMES}, got {args.frames}")
    try:
        spec = load_config(RenderSpec, args.config, overrides)
        text = TextRenderer(spec)
    except (ConfigError, ValueError, OSError) as e:
        raise _RenderError(str(e)) from None
    if args.text:
        try:
            frames = text.render_text(args.text)
        except Exception as e:  # never expected: every character has a drawing (text.py)
            raise _RenderError(f"--text: {describe_error(e)}") from None
        if len(frames) == 0:
            raise _RenderError("the text has no tokens to render")
    else:
        path = Path(args.file)
        try:
            kind = args.kind or guess_kind(path)
            if kind == "image":
                frames = render_image(path, spec)
            elif kind == "audio":
                frames = render_audio(path, spec)
            else:
                frames = render_video(path, spec, args.frames)
        except BadInputError as e:
            raise _RenderError(str(e)) from None
        except Exception as e:  # a decoder's own error on a hostile file: name the file
            raise _RenderError(f"{path}: {describe_error(e)}") from None
    if args.task:
        frames = np.concatenate([text.task_frame(args.task)[None], frames])
    try:
        out = save_clip(frames, args.out)
    except (OSError, ValueError) as e:
        raise _RenderError(f"--out {args.out}: cannot write: {describe_error(e)}") from None
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
    from evav.frames.text import import_sentencepiece

    try:
        spm = import_sentencepiece("evav tokenizer")
    except ValueError as e:
        raise ConfigError(str(e)) from None

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
