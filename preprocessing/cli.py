"""`evav preprocess` and `evav inspect`.

evav preprocess BUILDER --src RAW --out DIR [--workers N] [--num-parts N --part I]
                [--shard-mb MB | --shard-samples N] [--codec C] [--limit N] [--seed S]
                [option=value ...] [render.FIELD=value ...]
evav preprocess --merge --out DIR          # after every --part build finished
evav preprocess BUILDER ... --out s3://bucket/prefix/ds [--stage DIR]   # build in DIR, upload
evav preprocess --list                     # builders and their options
evav inspect DIR_OR_TAR [--out sheet.png|clip.gif] [--num 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from evav.config import ConfigError


def add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Builder options and render fields go after the flags as key=value, e.g. "
        "`evav preprocess synthetic --out d train_per_task=200 render.height=128`; "
        "`evav preprocess --list` shows every builder's options."
    )
    p.add_argument(
        "builder",
        nargs="?",
        help="which corpus (see --list): a builder name, an installed `evav.builders` entry "
        "point, or MODULE:CLASS for a Builder subclass of your own",
    )
    p.add_argument("--src", help="the raw dataset folder (its official layout)")
    p.add_argument(
        "--out",
        help="output folder: DIR/{split}/shard-NNNNNN.tar + manifest.json; or an s3:// URL "
        "(built in --stage, then uploaded, manifest last)",
    )
    p.add_argument(
        "--stage",
        help="with a URL --out: the local folder to build in before the upload (default: "
        "$EVAV_CACHE/stage/<hash of the URL>, EVAV_CACHE defaulting to ~/.cache/evav; the same "
        "on every run, so a killed build or upload resumes)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes on this machine")
    p.add_argument(
        "--num-parts", type=int, help="machines sharing the build (default: Slurm array size)"
    )
    p.add_argument(
        "--part", type=int, help="this machine's part, 0-based (default: Slurm array index)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="for generated data and random draws, and which inputs --limit keeps",
    )
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size (default 64)")
    p.add_argument("--shard-samples", type=int, help="inputs per shard (overrides --shard-mb)")
    p.add_argument(
        "--codec", help="evav.codec preset or CODEC:PIX_FMT[:crf=N] (default: per builder)"
    )
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="keep N inputs of each split, stratified by class (every class in proportion, at "
        "least one each when N allows), drawn with --seed, in the builder's order",
    )
    p.add_argument(
        "--merge", action="store_true", help="write DIR/manifest.json from finished parts"
    )
    p.add_argument("--list", action="store_true", help="list builders and their options")


def preprocess_main(args: argparse.Namespace) -> int:
    from preprocessing.builders import builder_names, get_builder
    from preprocessing.merge import merge
    from preprocessing.runner import (
        BuildConfig,
        WorkerDied,
        build,
        describe,
        parse_overrides,
        slurm_parts,
    )

    if args.list:
        for name in builder_names():
            try:
                cls = get_builder(name)
            except ValueError as e:  # an installed entry point that does not load
                print(f"{name:13s} cannot be loaded: {e}")
                continue
            opts = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls.Options))
            print(f"{name:13s} codec {cls.codec:13s} {opts}")
        return 0
    try:
        if not args.out:
            raise ValueError("--out DIR is required")
        out, url = _out_and_url(args)
        if args.merge:
            manifest = merge(out)
        else:
            if not args.builder:
                raise ValueError("name a BUILDER (see `evav preprocess --list`), or use --merge")
            num_parts, part = slurm_parts()
            options, render = parse_overrides(args.overrides)
            cfg = BuildConfig(
                builder=args.builder,
                out=out,
                src=args.src,
                options=options,
                render=render,
                workers=args.workers,
                num_parts=args.num_parts if args.num_parts is not None else num_parts,
                part=args.part if args.part is not None else part,
                seed=args.seed,
                shard_samples=args.shard_samples,
                shard_mb=args.shard_mb,
                codec=args.codec,
                limit=args.limit,
                command=_command(args),
            )
            manifest = build(cfg)
            if manifest is None:
                return 0
        if url is not None:
            from evav.data.publish import publish

            print(publish(out, url).line())
    except (ValueError, ConfigError, OSError, WorkerDied) as e:  # OSError: writing --out
        print(f"evav preprocess: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {describe(manifest)}")
    return 0


def _out_and_url(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the local folder to build in, the URL to publish to or None). A URL is checked here,
    before any build work: a missing bucket or a store that is down is one line, exit 2."""
    from evav.data.remote import is_url

    if args.out.lower().startswith("pipe:"):
        raise ValueError(
            f"--out {args.out}: a shell command is not an output; give a folder or URL"
        )
    if not is_url(args.out):
        if args.stage:
            raise ValueError(
                "--stage is for a URL --out (s3://...); a local --out is built in place"
            )
        return args.out, None
    from evav.data.publish import check_writable, stage_dir

    url = args.out.rstrip("/")
    check_writable(url)
    stage = args.stage or str(stage_dir(url))
    print(f"{url}: building in {stage}, then uploading")
    return stage, url


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "?"


def _command(args: argparse.Namespace) -> str:
    """The command line, rebuilt from the parsed arguments (the same however evav was started)."""
    words = ["evav", "preprocess", args.builder]
    for flag in (
        "src",
        "out",
        "workers",
        "num_parts",
        "part",
        "seed",
        "shard_mb",
        "shard_samples",
        "codec",
        "limit",
    ):
        v = getattr(args, flag)
        if v is not None:
            words += [f"--{flag.replace('_', '-')}", str(v)]
    return shlex.join(words + list(args.overrides))


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Exit status: 0, 1 when --verify found a problem (each is listed as `SHARD KEY: reason`, "
        "then counted per reason), 2 when PATH cannot be inspected."
    )
    p.add_argument(
        "path",
        help="a dataset folder (with manifest.json), a split folder or a .tar; or a dataset's "
        "URL (s3://..., https://...: its manifest lists the shards) or one .tar's",
    )
    p.add_argument("--out", help="write N random samples: a contact sheet .png, or a .gif")
    p.add_argument("--num", type=int, default=8, help="samples in --out (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which random samples")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check every shard (size, sha256, tar structure, sample count) and every sample "
        "(metadata, clip checksum, render hash, a clean decode to its frames); exit 1 on any "
        "problem",
    )
    p.add_argument(
        "--max-lines",
        type=int,
        default=50,
        help="with --verify: list at most this many problems (all are counted; default 50)",
    )


def inspect_main(args: argparse.Namespace) -> int:
    from preprocessing.inspect import inspect, verify, write_examples

    try:
        rc, report = 0, None
        if args.verify:
            v = verify(args.path, keep=max(0, args.max_lines))
            print(v.text())
            rc = 0 if v.ok else 1
        else:
            report = inspect(args.path)
            print(report.text())
        if args.out:
            out = write_examples(report or inspect(args.path), args.out, args.num, args.seed)
            print(f"wrote {out}")
    except (ValueError, OSError) as e:  # OSError: a URL the store cannot serve
        print(f"evav inspect: error: {e}", file=sys.stderr)
        return 2
    return rc
