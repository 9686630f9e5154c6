"""text: a raw text corpus -> rendered-text language-model pretraining clips (every frame supervised).

``--src`` is a ``.txt`` file (one document per non-empty line) or a ``.jsonl`` file (one
object per line with a ``text`` field; ``field=NAME`` to change), or a folder of such files
named by split (``train``, ``val``/``valid``/``validation``/``dev``, ``test``; other names go
to train). Each document is tokenized and cut into clips of ``clip_tokens`` token frames;
clip ``w`` of line ``n`` of ``FILE`` has source ``FILE:n:w``. A line that is not JSON, or lacks
the field, is quarantined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evav.errors import BadInputError
from preprocessing.builders.base import Builder, Example, Item

SPLITS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
}
SUFFIXES = (".txt", ".jsonl")


@dataclass
class TextOptions:
    clip_tokens: int = 16
    field: str = "text"  # the jsonl field holding the text

    def __post_init__(self):
        if self.clip_tokens < 1:
            raise ValueError("clip_tokens must be >= 1")


class TextBuilder(Builder):
    name = "text"
    Options = TextOptions

    def list_items(self) -> dict[str, list[Item]]:
        if self.src.is_file():
            self.expect(
                self.src.suffix in SUFFIXES, "expected a .txt or .jsonl file, or a folder of them"
            )
            files = [self.src]
        else:
            files = sorted(p for p in self.src.iterdir() if p.suffix in SUFFIXES)
            self.expect(bool(files), "expected .txt or .jsonl files (train.txt, val.jsonl, ...)")
        out: dict[str, list[Item]] = {}
        for f in files:
            split = SPLITS.get(f.stem, "train") if f != self.src else "train"
            out.setdefault(split, []).extend(self._items(f))
        return out

    def _items(self, path: Path) -> list[Item]:
        items = []
        k = self.options.clip_tokens
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                source = f"{path}:{n}"
                if path.suffix == ".jsonl":
                    try:
                        text = json.loads(line)[self.options.field]
                        if not isinstance(text, str):
                            raise TypeError(f"field {self.options.field!r} is not a string")
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        items.append(
                            Item(source, ("bad", f"not a JSON object with a text field: {e}"))
                        )
                        continue
                else:
                    text = line
                tokens = self.text.tokenize(text)
                for w in range(0, len(tokens), k):
                    items.append(Item(f"{source}:{w // k}", ("ok", tuple(tokens[w : w + k]))))
        return items

    def example(self, item: Item) -> Example:
        kind, value = item.data
        if kind == "bad":
            raise BadInputError(item.source, value)
        return Example(
            "text",
            self.text.render_tokens(list(value)),
            supervise="all",
            extra={"text": " ".join(value)},
        )


BUILDER = TextBuilder
