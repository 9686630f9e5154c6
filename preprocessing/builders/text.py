"""text: a raw text corpus -> rendered-text language-model pretraining clips (every frame supervised).

``--src`` is a ``.txt`` file (one document per non-empty line) or a ``.jsonl`` file (one
object per line with a ``text`` field; ``field=NAME`` to change), or a folder of such files
named by split (``train``, ``val``/``valid``/``validation``/``dev``, ``test``; other names go
to train). Each document is tokenized and cut into clips of ``clip_tokens`` token frames;
clip ``w`` of line ``n`` of ``FILE`` has source ``FILE:n:w``. Lines end at a line feed only (CR
LF tolerated; U+2028 or a form feed inside a line is whitespace of that line, never a line
break). A line that is not UTF-8, not JSON (a ``.jsonl`` line nested too deep to parse
included), not an object or lacks a string field is quarantined as ``FILE:n``, as is a ``.txt``
or ``.jsonl`` entry that is not a readable regular file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evav.errors import BadInputError, check_nonempty_file, describe_error
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
        if not self.field:
            raise ValueError("field must name the jsonl field holding the text")


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
        try:  # a directory or FIFO named like a corpus file; an unreadable one
            check_nonempty_file(path)
        except BadInputError as e:
            if e.reason.startswith("empty file"):
                return []  # no documents
            return [Item(str(path), ("bad", e.reason))]
        items = []
        k = self.options.clip_tokens
        with open(path, "rb") as f:  # binary: lines end at b"\n" only
            for n, raw in enumerate(f, start=1):
                source = f"{path}:{n}"
                try:
                    line = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
                except UnicodeDecodeError as e:
                    items.append(
                        Item(source, ("bad", f"invalid UTF-8: {e.reason} at byte {e.start}"))
                    )
                    continue
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    text, why = self._field(line)
                    if text is None:
                        items.append(Item(source, ("bad", why)))
                        continue
                else:
                    text = line
                tokens = self.text.tokenize(text)
                for w in range(0, len(tokens), k):
                    items.append(Item(f"{source}:{w // k}", ("ok", tuple(tokens[w : w + k]))))
        return items

    def _field(self, line: str) -> tuple[str | None, str]:
        """A jsonl line's text field, or None and why not."""
        name = self.options.field
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
            return None, f"not a JSON object with a text field: {describe_error(e)}"
        if not isinstance(obj, dict):
            return None, f"not a JSON object with a text field: a JSON {type(obj).__name__}"
        if name not in obj:
            return None, f"not a JSON object with a text field: no field {name!r}"
        if not isinstance(obj[name], str):
            return None, f"not a JSON object with a text field: field {name!r} is not a string"
        return obj[name], ""

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
