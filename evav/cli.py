"""The `evav` command: one subcommand per job; each lives next to the code it drives.

    evav render (--text TEXT | FILE) --out OUT.png|.gif|.mp4 [key=value ...]
    evav tokenizer train --input corpus.txt --out tok.model
    evav model-info
    evav eval CHECKPOINT --data DIR[,DIR...] [--out results.json]
    evav generate CHECKPOINT --input TEXT_OR_FILE --out clip.gif
    evav submit CONFIG.yaml [key=value ...] --run-dir RUN [--nodes N]
    evav export RUN_OR_CHECKPOINT --out DIR [--force]
    evav status RUN [--json]

Subcommand modules are imported only when used, so `evav --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from evav import __version__

# name -> (module, add-arguments function, main function, help)
COMMANDS = {
    "render": (
        "evav.frames.cli",
        "add_render_arguments",
        "render_main",
        "render text or an image/audio/video file to frames and save them",
    ),
    "tokenizer": (
        "evav.frames.cli",
        "add_tokenizer_arguments",
        "tokenizer_main",
        "train a SentencePiece tokenizer for subword text frames",
    ),
    "preprocess": (
        "preprocessing.cli",
        "add_preprocess_arguments",
        "preprocess_main",
        "build WebDataset shards of rendered clips from a raw corpus",
    ),
    "inspect": (
        "preprocessing.cli",
        "add_inspect_arguments",
        "inspect_main",
        "summarise shards (counts, frame histogram, codec) and save example clips",
    ),
    "train": (
        "evav.train",
        "add_arguments",
        "main",
        "train a model with DeepSpeed (one process, torchrun, or Slurm srun)",
    ),
    "eval": (
        "evav.eval.cli",
        "add_arguments",
        "main",
        "evaluate a checkpoint task by task: generate answers, read them back, score them",
    ),
    "generate": (
        "evav.eval.cli",
        "add_generate_arguments",
        "generate_main",
        "generate the frames that follow an input (text, or an image/audio/video file)",
    ),
    "export": (
        "evav.export",
        "add_arguments",
        "main",
        "export a checkpoint as one self-describing folder (fp32 weights, config, model card)",
    ),
    "status": (
        "evav.status",
        "add_arguments",
        "main",
        "where a run stands: step, ETA, speed, checkpoint, eval results, MLflow, running or not",
    ),
    "submit": (
        "evav.launch",
        "add_arguments",
        "main",
        "submit training (and chained evaluation) or a preprocessing array to Slurm",
    ),
    "model-info": (
        "evav.model.cli",
        "add_arguments",
        "main",
        "parameters and FLOPs per frame of every model preset",
    ),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evav", description="evav: everything is a video.")
    parser.add_argument("--version", action="version", version=f"evav {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, add, run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:  # import only the module of the command being run
            mod = importlib.import_module(module)
            getattr(mod, add)(p)
            p.set_defaults(_run=getattr(mod, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    from evav.config import ConfigError
    from evav.errors import BadInputError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    # `key=value` overrides may come anywhere on the line, so they are collected from the
    # arguments argparse does not know; anything else unknown is still an error.
    args, unknown = parser.parse_known_args(argv)
    bad = [a for a in unknown if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = getattr(args, "overrides", []) + unknown
    try:
        return args._run(args) or 0
    except (BadInputError, ConfigError) as e:
        print(f"evav {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # the loader's "no good sample" stop is the data's problem, not a bug: one line, no
        # traceback (looked up only if the loader was imported: most commands never import it)
        loader = sys.modules.get("evav.data.loader")
        if loader is None or not isinstance(e, loader.DataExhaustedError):
            raise
        print(f"evav {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
