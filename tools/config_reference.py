"""Generate docs/config.md, the config reference, from the config dataclasses themselves.

    python tools/config_reference.py            # (re)write docs/config.md
    python tools/config_reference.py --check    # exit 1 when docs/config.md is out of date

Every key of a training config (``evav.train.TrainConfig`` and its nested sections) and of the
rendering settings (``RenderSpec``) is listed with its type, its default and the comment written
beside the field in the code (or the lines of comment just above it). The page is generated, so
it cannot drift from the code: tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "config.md"

if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


# Meanings for fields that have no comment in the code, keyed "Class.field". Prefer a comment
# beside the field (it wins); a key here that names no field is an error, so none goes stale.
NOTES = {
    "TrainConfig.run_dir": "checkpoints, metrics.jsonl, config.yaml; the same run_dir resumes",
    "TrainConfig.seed": "model init, data order and every random stream",
    "TrainConfig.steps": "optimizer steps to train for (the learning-rate schedule ends here)",
    "TrainConfig.log_every": "steps between metric records and log lines",
    "TrainConfig.val_batches": "batches of the validation split per validation",
    "TrainConfig.keep_last": "checkpoints that verify, kept (plus those of keep_every)",
    "ModelConfig.preset": "architecture preset (table below); null fields take its values",
    "ModelConfig.family": "flat or paper",
    "ModelConfig.mlp_ratio": "MLP hidden width = dim * mlp_ratio",
    "ModelConfig.width": "frame width in pixels; must match the RenderSpec of the data",
    "ModelConfig.patch_size": "patch side in pixels: (height/p) * (width/p) tokens per frame",
    "ModelConfig.init_std": "standard deviation of the initial linear weights",
    "EngineConfig.zero_stage": "DeepSpeed ZeRO: 0 none, 1 optimizer states, 2 + gradients, "
    "3 + parameters sharded over ranks",
    "EngineConfig.precision": "bf16: DeepSpeed bf16 (bf16 weights, fp32 master copy); fp32: full",
    "EngineConfig.grad_accum_steps": "micro-batches per optimizer step",
    "OptimConfig.lr": "peak learning rate",
    "OptimConfig.betas": "AdamW betas",
    "OptimConfig.weight_decay": "AdamW weight decay (not applied to 1-D parameters)",
    "OptimConfig.warmup_steps": "linear warmup to lr over this many steps",
    "OptimConfig.min_lr_ratio": "the cosine decay ends at lr * min_lr_ratio",
    "OptimConfig.grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "MetricsConfig.experiment": "MLflow experiment of new runs",
    "MetricsConfig.close_timeout_s": "at the end, wait at most this long for MLflow to take "
    "what is queued",
    "RenderSpec.height": "frame height in pixels",
    "RenderSpec.width": "frame width in pixels",
    "AudioSpec.sample_rate": "Hz; every recording is resampled to this first",
    "AudioSpec.n_fft": "STFT window size in samples",
    "AudioSpec.hop_length": "STFT hop in samples",
    "AudioSpec.n_mels": "mel bands (spectrogram rows before resizing to the frame)",
    "AudioSpec.f_min": "lowest mel frequency in Hz",
}


def field_notes(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (annotation as written, comment)}`` read from the class's source code.

    The comment is the ``# ...`` on the field's line, else the comment lines directly above it.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    notes = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        note = comments.get(stmt.lineno, "")
        if not note:  # a block of whole-line comments right above the field
            above, line = [], stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            note = " ".join(above)
        note = note or NOTES.get(f"{cls.__name__}.{stmt.target.id}", "")
        notes[stmt.target.id] = (ast.get_source_segment(source, stmt.annotation), note)
    return notes


def yaml_value(value: object) -> str:
    """A default as it would be written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def section(cls: type, prefix: str, title: str, level: int = 2) -> list[str]:
    """Markdown for one dataclass: heading, docstring, a table of its fields, nested sections."""
    notes = field_notes(cls)
    doc = inspect.cleandoc(cls.__doc__ or "")
    is_generated_doc = doc.startswith(f"{cls.__name__}(")  # dataclass's automatic signature
    out = [f"{'#' * level} {title}", ""]
    out.append(f"`{cls.__module__}.{cls.__qualname__}`" + ("" if is_generated_doc else f": {doc}"))
    out += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        annotation, note = notes.get(f.name, (str(f.type), ""))
        key = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(default):
            nested.append((type(default), f"{key}."))
            anchor = f"{key}".replace(".", "")
            note = note or _summary(type(default))
            out.append(f"| `{key}` | {type(default).__name__} | see [{key}](#{anchor}) | {note} |")
            continue
        shown = "(required)" if default is dataclasses.MISSING else f"`{yaml_value(default)}`"
        ann = " ".join(annotation.split())  # an annotation wrapped over lines: one line
        if ann.startswith("(") and ann.endswith(")"):
            ann = ann[1:-1]
        ann = ann.replace("|", "\\|")
        out.append(f"| `{key}` | `{ann}` | {shown} | {note.replace('|', chr(92) + '|')} |")
    out.append("")
    for sub, sub_prefix in nested:
        out += section(sub, sub_prefix, sub_prefix.rstrip("."), level + 1)
    return out


def presets_table() -> list[str]:
    """The model presets: the architecture fields each one sets."""
    from evav.model.config import ARCH_DEFAULTS, PRESETS

    keys = ["family", "dim", "depth", "depths", "windows", "head_dim", "mlp_ratio"]
    out = ["| preset | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, values in PRESETS.items():
        full = {**ARCH_DEFAULTS, **values}
        out.append(f"| `{name}` | " + " | ".join(yaml_value(full.get(k)) for k in keys) + " |")
    return out


def render() -> str:
    """The whole page."""
    from evav.frames.spec import RenderSpec
    from evav.train import TrainConfig

    lines = [
        "# Config reference",
        "",
        "<!-- Generated by tools/config_reference.py from the config dataclasses; do not edit. -->",
        "<!-- Regenerate: .venv/bin/python tools/config_reference.py -->",
        "",
        "Configs are YAML files over these dataclasses; `key=value` arguments on the command",
        "line override them, with dots for nested sections (`optim.lr=1e-3`, `model.preset=S`,",
        "`data.train=[shards/a,shards/b]`). An unknown key or a value of the wrong type is an",
        "error that names the key (`evav/config.py`). The resolved config is written to",
        "`RUN/config.yaml` and into every checkpoint.",
        "",
        "- **Training** (`evav train CONFIG.yaml key=value ...`): the keys of `TrainConfig` below.",
        "- **Rendering** (`evav render ... key=value`, `evav preprocess ... render.KEY=value`):",
        "  the keys of `RenderSpec`; `configs/render/*.yaml` hold the 64/128/256 pixel variants.",
        "",
    ]
    lines += section(TrainConfig, "", "TrainConfig (evav train)")
    lines += [
        "### Model presets",
        "",
        "`model.preset` names an architecture; a `model.*` field left `null` takes the "
        "preset's value (parameters and FLOPs: `evav model-info`, docs/models.md).",
        "",
    ]
    lines += presets_table() + [""]
    lines += section(RenderSpec, "", "RenderSpec (rendering)")
    documented = {
        f"{c.__name__}.{f.name}"
        for c in _dataclasses(TrainConfig) | _dataclasses(RenderSpec)
        for f in dataclasses.fields(c)
    }
    stale = sorted(set(NOTES) - documented)
    if stale:
        raise ValueError(f"tools/config_reference.py NOTES name fields that do not exist: {stale}")
    return "\n".join(lines).rstrip() + "\n"


def _summary(cls: type) -> str:
    """The first line of a class's own docstring ('' for the dataclass's generated one)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return "" if doc.startswith(f"{cls.__name__}(") else doc.splitlines()[0]


def _dataclasses(cls: type) -> set[type]:
    """``cls`` and every dataclass nested in it."""
    out = {cls}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out |= _dataclasses(type(default))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is stale")
    p.add_argument("--out", type=Path, default=OUT, help="where to write (default docs/config.md)")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(
                f"{args.out} is out of date: run python tools/config_reference.py", file=sys.stderr
            )
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
