"""sst2: GLUE SST-2 sentiment, text -> label word.

Official layout: ``SST-2/{train,dev}.tsv`` (header ``sentence<TAB>label``, label 0 = negative,
1 = positive; ``test.tsv`` has no labels and is skipped). Splits: train, val (= dev).
The files are read with the csv module's rules (``"``-quoted fields may hold tabs and newlines;
rows end at a line feed, so U+2028 or a form feed stays inside its sentence). A row without exactly
two fields, with a label other than 0/1, with no words, or that cannot be read (invalid UTF-8,
a csv error) is quarantined as ``FILE:LINE`` (the row's first line).
``balance=true`` orders the train split's rows negative, positive, negative, ...
(each label in file order) and drops what is left of the commoner label, so that the training
clips, and any ``--limit`` of them, are half of each; the majority word (56% of SST-2's training
rows are positive) is then not the best guess of a model that cannot read the sentences yet.
A sentence longer than ``max_words`` (64) tokens keeps its first ``max_words``, or with
``truncate=last`` its last ones; shorter ones are kept whole. The paper truncates inputs to their
last 20 tokens (as reported in a secondary source, ../shared/PAPER.md), so its setting is
``max_words=20 truncate=last``. The first author's public code counts the ``|`` separator among
those 20 (19 words and ``|``), splits at whitespace only, and left-pads short inputs with
``<pad>`` frames; in evav the separator is a frame of its own, punctuation is split off as its
own token and nothing is padded, so ``max_words=19`` gives that code's 20 frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from evav.errors import BadInputError
from preprocessing.builders.base import Builder, Example, Item, read_table

LABELS = ["negative", "positive"]
FILES = {"train": "train.tsv", "val": "dev.tsv"}


@dataclass
class Sst2Options:
    max_words: int = 64  # longer sentences keep max_words tokens: their first (or last: truncate)
    balance: bool = False  # train split: negative and positive rows alternately, half of each
    # which max_words tokens a longer sentence keeps: its first, or its last (the paper's code:
    # the last 20, `max_words=20 truncate=last`)
    truncate: Literal["first", "last"] = "first"

    def __post_init__(self):
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        if self.truncate not in ("first", "last"):
            raise ValueError(f"truncate must be 'first' or 'last', got {self.truncate!r}")


class Sst2Builder(Builder):
    name = "sst2"
    Options = Sst2Options

    def list_items(self) -> dict[str, list[Item]]:
        found = {split: self.src / f for split, f in FILES.items() if (self.src / f).is_file()}
        self.expect(bool(found), "expected GLUE SST-2 files train.tsv and/or dev.tsv")
        out = {}
        for split, path in found.items():
            rows = read_table(path, "\t")
            header = next(rows, (1, None, ""))[1]
            self.expect(
                header is not None and header[:2] == ["sentence", "label"],
                f"{path.name}: expected the header 'sentence<TAB>label'",
            )
            # data: the row's fields, or None and why it cannot be read
            out[split] = [Item(f"{path}:{n}", (row, why), _label(row)) for n, row, why in rows]
        if self.options.balance and "train" in out:
            out["train"] = balanced(out["train"])
        return out

    def example(self, item: Item) -> Example:
        fields, why = item.data
        if fields is None:
            raise BadInputError(item.source, why)
        if len(fields) != 2:
            raise BadInputError(
                item.source, f"broken row: {len(fields)} tab-separated fields, expected 2"
            )
        sentence, label = fields[0].strip(), fields[1].strip()
        if label not in ("0", "1"):
            raise BadInputError(item.source, f"label {label!r} is not 0 or 1")
        tokens = truncated(self.text.tokenize(sentence), self.options)
        if not tokens:
            raise BadInputError(item.source, "empty sentence")
        word = LABELS[int(label)]
        return Example(
            "sst2",
            self.text.render_tokens(tokens),
            self.words(word),
            word,
            int(label),
            extra={"text": sentence},
        )


def truncated(tokens: list[str], options: Sst2Options) -> list[str]:
    """At most ``max_words`` of the sentence's tokens: its first ones, or its last ones."""
    n = options.max_words
    return tokens[-n:] if options.truncate == "last" else tokens[:n]


def balanced(items: list[Item]) -> list[Item]:
    """Rows of the two labels alternately (negative, positive, ...), each label in file order,
    until the rarer one runs out: balanced however many ``--limit`` then keeps. Rows whose label
    cannot be read come first, for ``example`` to quarantine."""
    by_label: dict[str, list[Item]] = {"0": [], "1": []}
    unreadable = []
    for it in items:
        by_label.get(it.stratum, unreadable).append(it)
    pairs = zip(by_label["0"], by_label["1"])
    return unreadable + [it for pair in pairs for it in pair]


def _label(fields: list[str] | None) -> str | None:
    """A row's label, "0" or "1" (its --limit stratum); None for a row that has none."""
    label = fields[1].strip() if fields is not None and len(fields) == 2 else None
    return label if label in ("0", "1") else None


BUILDER = Sst2Builder
