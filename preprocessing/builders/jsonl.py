"""jsonl: question/answer pairs listed in JSON Lines files, any input modality; no code to write.

Layout: ``--src`` holds ``{split}.jsonl`` files (the file name is the split). Each non-blank line
is one JSON object:

- ``input`` (string): the question as text, or the path, relative to ``--src``, of an image,
  audio or video file;
- ``answer`` (string): the answer text;
- ``task`` (string, optional): the task name, default the option ``task=`` (``jsonl``);
- ``kind`` (optional): ``text``, ``image``, ``audio`` or ``video``; without it an input whose
  suffix ``evav render`` knows (``.png``, ``.wav``, ``.mp4``, ...) is that file, anything else
  is text.

Text inputs keep their first ``max_words`` tokens; videos give ``num_frames`` frames. Lines
end at a line feed only (CR LF tolerated). Each line is one input, named ``FILE:LINE``; a line
that is not UTF-8, not a JSON object, lacks a string ``input``/``answer``, names a file that is
absolute, goes through ``..``, is a symbolic link out of ``--src`` or cannot be read, or whose
text or answer has no words, is quarantined with that reason. ``--limit`` is stratified by
task and answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evav.errors import BadInputError, check_nonempty_file, describe_error
from evav.frames import render_audio, render_image, render_video
from evav.frames.cli import guess_kind
from preprocessing.builders.base import (
    Builder,
    Example,
    Item,
    check_num_frames,
    check_task,
    escapes,
    relative_path,
)

KINDS = ("text", "image", "audio", "video")


@dataclass
class JsonlOptions:
    task: str = "jsonl"  # the task of a line without a "task" field
    max_words: int = 64  # a longer text input keeps its first max_words tokens
    num_frames: int = 8  # frames of a video input

    def __post_init__(self):
        check_task(self.task)
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        check_num_frames(self.num_frames)


class JsonlBuilder(Builder):
    name = "jsonl"
    Options = JsonlOptions

    def list_items(self) -> dict[str, list[Item]]:
        self.expect(self.src.is_dir(), "expected a folder of {split}.jsonl files")
        files = sorted(p for p in self.src.iterdir() if p.suffix == ".jsonl")
        self.expect(bool(files), "expected {split}.jsonl files (train.jsonl, test.jsonl, ...)")
        out = {}
        for path in files:
            items = self._items(path)
            if items:
                out[path.stem] = items
        return out

    def _items(self, path: Path) -> list[Item]:
        """One item per non-blank line: data ``(record, "")`` or ``(None, reason)``."""
        try:  # a directory or FIFO named like a split file; one out of --src; an unreadable one
            why = escapes(self.src, path)
            if why:
                raise BadInputError(path, why)
            check_nonempty_file(path)
        except BadInputError as e:
            if e.reason.startswith("empty file"):
                return []
            return [Item(str(path), (None, e.reason))]
        items = []
        with open(path, "rb") as f:  # binary: lines end at b"\n" only
            for n, raw in enumerate(f, start=1):
                record, why = self._record(raw.removesuffix(b"\n").removesuffix(b"\r"))
                if record is not None or why:
                    stratum = f"{record['task']}: {record['answer']}" if record else None
                    items.append(Item(f"{path}:{n}", (record, why), stratum))
        return items

    def _record(self, raw: bytes) -> tuple[dict | None, str]:
        """A line's checked fields, or None and why not (None and "" for a blank line)."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"invalid UTF-8: {e.reason} at byte {e.start}"
        if not line.strip():
            return None, ""
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # RecursionError: nested thousands deep
            return None, f"not a JSON object: {describe_error(e)}"
        if not isinstance(obj, dict):
            return None, f"not a JSON object: a JSON {type(obj).__name__}"
        record = {"task": obj.get("task", self.options.task), "kind": obj.get("kind")}
        for name in ("input", "answer"):
            if not isinstance(obj.get(name), str):
                return None, f"field {name!r} is missing or not a string"
            record[name] = obj[name]
        if not isinstance(record["task"], str) or not record["task"].strip():
            return None, "field 'task' is not a non-empty string"
        if record["kind"] is not None and record["kind"] not in KINDS:
            return None, f"field 'kind' is {record['kind']!r}, expected one of {', '.join(KINDS)}"
        return record, ""

    def example(self, item: Item) -> Example:
        record, why = item.data
        if record is None:
            raise BadInputError(item.source, why)
        answer = self.text.tokenize(record["answer"])
        if not answer:
            raise BadInputError(item.source, "empty answer")
        kind, text = record["kind"] or self._guess(record["input"]), record["input"]
        if kind == "text":
            tokens = self.text.tokenize(text)[: self.options.max_words]
            if not tokens:
                raise BadInputError(item.source, "empty input text")
            frames, extra = self.text.render_tokens(tokens), {"text": text}
        else:
            path = self._file(item.source, text)
            if kind == "image":
                frames = render_image(path, self.spec)
            elif kind == "audio":
                frames = render_audio(path, self.spec)
            else:
                frames = render_video(path, self.spec, self.options.num_frames)
            extra = {"file": text}
        return Example(
            record["task"],
            frames,
            self.text.render_tokens(answer),
            record["answer"],
            record["answer"],
            extra=extra,
        )

    @staticmethod
    def _guess(text: str) -> str:
        """A media file by its suffix (as `evav render` guesses), else text."""
        try:
            return guess_kind(Path(text))
        except BadInputError:
            return "text"

    def _file(self, source: str, name: str) -> Path:
        """The input file named on a line: relative, inside --src; else BadInputError."""
        path = relative_path(self.src, name)
        if path is None:
            raise BadInputError(source, f"input {name[:200]!r} is not a relative path inside --src")
        why = escapes(self.src, path)
        if why:
            raise BadInputError(source, f"input {name[:200]!r}: {why}")
        return path


BUILDER = JsonlBuilder
