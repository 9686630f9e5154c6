"""Task readers: how many frames to generate for a sample, how to read them back, how to score.

One reader per task kind (DESIGN.md section 2, item 6):

| kind | read-out | metrics |
|---|---|---|
| classification | nearest rendered candidate answer (every answer of the task in the split) | accuracy, weighted/macro F1, confusion |
| open | each frame -> nearest word of the answer vocabulary | accuracy, weighted F1 |
| multilabel | frames -> words -> the labels whose words appear | macro F1, exact match |
| tracking | red-box detection in each generated frame | mean IoU (and per frame index) |
| colorization | colour statistics of the generated frames | colourfulness, CDC, PSNR (vs truth) |
| video_prediction | pixels | PSNR and SSIM per predicted frame index (and of copying the last input frame) |

The kind comes from the task name for the datasets whose answers are not a closed label set
(``KINDS``), otherwise from the metadata: an answer text means classification, no answer means
video prediction. A pretraining clip (no output segment) is split in half: the first half is the
prompt, up to ``max_video_frames`` of the rest is the truth.

Candidate answers and vocabularies are rendered with the dataset's own RenderSpec, so the
templates are exactly the frames the model was trained to produce.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from evav.eval import scores
from evav.eval.samples import EvalSample
from evav.frames import TextRenderer, find_red_box
from evav.frames.readback import TemplateDecoder

KINDS = {
    "clevrer": "open",
    "tinyvirat": "multilabel",
    "lasot": "tracking",
    "colorize": "colorization",
}


def kind_of(task: str, samples: list[EvalSample]) -> str:
    if task in KINDS:
        return KINDS[task]
    return "classification" if any(s.meta.get("answer") for s in samples) else "video_prediction"


def prompt_length(meta: dict) -> int:
    """Frames given to the model: everything before the answer (or the first half of a clip)."""
    seg = meta["segments"]
    total = int(meta.get("num_frames") or sum(seg.values()))
    if seg.get("output"):
        return total - int(seg["output"])
    return int(seg.get("task", 1)) + max(1, int(seg.get("input", total - 1)) // 2)


class Reader:
    kind = ""

    def __init__(
        self, task: str, samples: list[EvalSample], text: TextRenderer, max_video_frames: int = 8
    ):
        self.task, self.text, self.max_video_frames = task, text, max_video_frames

    def gen_length(self, s: EvalSample) -> int:
        """Frames to generate after the prompt (default: as many as the truth has)."""
        return self.truth_length(s)

    def truth_length(self, s: EvalSample) -> int:
        seg = s.meta["segments"]
        if seg.get("output"):
            return int(seg["output"])
        total = int(s.meta.get("num_frames") or sum(seg.values()))
        return min(self.max_video_frames, total - prompt_length(s.meta))

    def read(self, gen_THWC: np.ndarray, truth_THWC: np.ndarray, s: EvalSample) -> dict:
        raise NotImplementedError

    def baseline(self, prompt_THWC: np.ndarray, truth_THWC: np.ndarray, s: EvalSample) -> dict:
        """Metrics of a trivial prediction made from the prompt alone (none by default)."""
        return {}

    def score(self, records: list[dict]) -> dict:
        raise NotImplementedError


class ClassificationReader(Reader):
    """The answer is the candidate whose rendered frames are nearest (mean squared distance)."""

    kind = "classification"

    def __init__(self, task, samples, text, max_video_frames=8):
        super().__init__(task, samples, text, max_video_frames)
        self.labels = sorted({str(s.meta["answer"]) for s in samples})
        renders = [text.render_text(a) for a in self.labels]
        self.lengths = torch.tensor([len(r) for r in renders])
        self.max_len = int(self.lengths.max())
        if self.max_len == 0:
            raise ValueError(f"task {task!r}: no candidate answer renders to a frame")
        h, w = text.spec.height, text.spec.width
        t = np.zeros((len(renders), self.max_len, h, w, 3), np.uint8)
        for i, r in enumerate(renders):
            t[i, : len(r)] = r
        self.templates = torch.from_numpy(t).float().flatten(2)  # (C, L, D)

    def gen_length(self, s):
        return self.max_len

    def nearest(self, gen_THWC: np.ndarray) -> str:
        return self.ranked(gen_THWC)[0][0]

    def ranked(self, gen_THWC: np.ndarray) -> list[tuple[str, float]]:
        """Every candidate with its mean squared pixel distance to the generated frames,
        nearest first (ties in label order). Fewer frames than the longest answer compare
        each candidate on the frames there are."""
        g = torch.from_numpy(np.asarray(gen_THWC[: self.max_len])).float().flatten(1)  # (L', D)
        d = ((self.templates[:, : len(g)] - g[None]) ** 2).mean(-1)  # (C, L')
        valid = torch.arange(len(g))[None] < self.lengths[:, None]
        per_candidate = (d * valid).sum(1) / valid.sum(1).clamp(min=1)
        # an answer that renders to no frame (whitespace, say) can never be generated
        per_candidate[self.lengths == 0] = float("inf")
        order = sorted(range(len(self.labels)), key=lambda i: (float(per_candidate[i]), i))
        return [(self.labels[i], float(per_candidate[i])) for i in order]

    def read(self, gen_THWC, truth_THWC, s):
        return {"pred": self.nearest(gen_THWC), "true": str(s.meta["answer"])}

    def score(self, records):
        return scores.classification(
            [r["pred"] for r in records], [r["true"] for r in records], self.labels
        )


class _VocabularyReader(Reader):
    """Reads each generated frame as the nearest word of a vocabulary."""

    def __init__(self, task, samples, text, max_video_frames=8):
        super().__init__(task, samples, text, max_video_frames)
        self.vocab = sorted({t for s in samples for t in self.answer_tokens(s)})
        if not self.vocab:
            raise ValueError(f"task {task}: no answer words to build a vocabulary from")
        self.decoder = TemplateDecoder.for_words(text, self.vocab)
        self.max_len = max(len(self.answer_tokens(s)) for s in samples)

    def answer_tokens(self, s: EvalSample) -> list[str]:
        return self.text.tokenize(str(s.meta.get("answer", "")))

    def gen_length(self, s):
        return self.max_len


class OpenAnswerReader(_VocabularyReader):
    """Open answers (CLEVRER): the first ``len(true answer)`` frames, each as its nearest word.

    The answer length is taken from the truth (the model has no end-of-answer frame); CLEVRER's
    descriptive answers are single words, where this changes nothing.
    """

    kind = "open"

    def read(self, gen_THWC, truth_THWC, s):
        true = self.answer_tokens(s)
        pred = self.decoder.decode(gen_THWC[: len(true)])
        return {"pred": " ".join(pred), "true": " ".join(true)}

    def score(self, records):
        out = scores.classification([r["pred"] for r in records], [r["true"] for r in records])
        return {k: out[k] for k in ("accuracy", "f1_weighted", "f1_macro", "n")}


class MultiLabelReader(_VocabularyReader):
    """Multi-label answers (TinyVIRAT): the labels whose words appear in the generated words."""

    kind = "multilabel"

    def __init__(self, task, samples, text, max_video_frames=8):
        super().__init__(task, samples, text, max_video_frames)
        self.labels = sorted({str(x) for s in samples for x in self.true_labels(s)})

    @staticmethod
    def true_labels(s: EvalSample) -> list[str]:
        label = s.meta.get("label")
        return [str(x) for x in label] if isinstance(label, list) else str(s.meta["answer"]).split()

    def read(self, gen_THWC, truth_THWC, s):
        words = self.decoder.decode(gen_THWC)
        found = [lab for lab in self.labels if _contains(words, self.text.tokenize(lab))]
        return {"pred": found, "true": sorted(self.true_labels(s)), "words": words}

    def score(self, records):
        return scores.multilabel_f1(
            [set(r["pred"]) for r in records], [set(r["true"]) for r in records], self.labels
        )


class TrackingReader(Reader):
    """Tracking (LaSOT): the red box found in each generated frame vs the true box."""

    kind = "tracking"

    def read(self, gen_THWC, truth_THWC, s):
        boxes = s.meta.get("extra", {}).get("boxes")
        first = (
            prompt_length(s.meta)
            - int(s.meta["segments"].get("task", 1))
            - int(s.meta["segments"].get("separator", 0))
        )
        ious = []
        for i, frame in enumerate(gen_THWC):
            true = (
                boxes[first + i]
                if boxes and first + i < len(boxes)
                else find_red_box(truth_THWC[i])
            )
            ious.append(
                scores.box_iou(find_red_box(frame), tuple(true) if true is not None else None)
            )
        return {"iou_per_frame": ious, "iou": float(np.mean(ious))}

    def score(self, records):
        by_index = _per_index(records, "iou_per_frame")
        return {
            "mean_iou": _finite_mean([r["iou"] for r in records]),
            "iou_per_frame": by_index,
            "n": len(records),
        }


class ColorizationReader(Reader):
    """Colorization: colourfulness and CDC of the generated frames (and of the truth)."""

    kind = "colorization"

    def read(self, gen_THWC, truth_THWC, s):
        return {
            "colorfulness": scores.colorfulness(gen_THWC),
            "colorfulness_true": scores.colorfulness(truth_THWC),
            "cdc": scores.colour_distribution_consistency(gen_THWC),
            "cdc_true": scores.colour_distribution_consistency(truth_THWC),
            "psnr": scores.psnr(gen_THWC, truth_THWC),
        }

    def score(self, records):
        keys = ("colorfulness", "colorfulness_true", "cdc", "cdc_true", "psnr")
        out = {k: _finite_mean([r[k] for r in records]) for k in keys}
        return {**out, "n": len(records)}


class VideoPredictionReader(Reader):
    """Video prediction (Moving MNIST, raw video): PSNR and SSIM per predicted frame index."""

    kind = "video_prediction"

    def read(self, gen_THWC, truth_THWC, s):
        q = scores.per_frame_quality(gen_THWC[None], truth_THWC[None])
        return {"psnr_per_frame": q["psnr_per_frame"], "ssim_per_frame": q["ssim_per_frame"]}

    def baseline(self, prompt_THWC, truth_THWC, s):
        """Copy the last input frame into every predicted frame (the model must beat this)."""
        last = len(prompt_THWC) - 1
        if s.meta["segments"].get("output"):  # the prompt ends with the separator
            last -= int(s.meta["segments"].get("separator", 0))
        copy = np.repeat(prompt_THWC[last][None], len(truth_THWC), axis=0)
        q = scores.per_frame_quality(copy[None], truth_THWC[None])
        return {
            "copy_last_psnr_per_frame": q["psnr_per_frame"],
            "copy_last_ssim_per_frame": q["ssim_per_frame"],
        }

    def score(self, records):
        psnr, ssim = _per_index(records, "psnr_per_frame"), _per_index(records, "ssim_per_frame")
        out = {
            "psnr": _finite_mean(psnr),
            "ssim": _finite_mean(ssim),
            "psnr_per_frame": psnr,
            "ssim_per_frame": ssim,
            "n": len(records),
        }
        if all("copy_last_psnr_per_frame" in r for r in records):
            out["copy_last_psnr"] = _finite_mean(_per_index(records, "copy_last_psnr_per_frame"))
            out["copy_last_ssim"] = _finite_mean(_per_index(records, "copy_last_ssim_per_frame"))
        return out


READERS = {
    r.kind: r
    for r in (
        ClassificationReader,
        OpenAnswerReader,
        MultiLabelReader,
        TrackingReader,
        ColorizationReader,
        VideoPredictionReader,
    )
}


def make_reader(
    task: str, samples: list[EvalSample], text: TextRenderer, max_video_frames: int = 8
) -> Reader:
    return READERS[kind_of(task, samples)](task, samples, text, max_video_frames)


def majority_baseline(records: list[dict]) -> dict:
    """The answer distribution of ``records`` (``[answer, count]`` pairs of the ``true``
    answers, most frequent first: a list, as JSON objects lose their order) and the accuracy of
    always answering the most frequent one; {} when the answers are not strings."""
    truths = [r.get("true") for r in records]
    if not truths or not all(isinstance(t, str) for t in truths):
        return {}
    counts = sorted(Counter(truths).items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "answers": [[a, n] for a, n in counts],
        "majority_answer": counts[0][0],
        "majority": counts[0][1] / len(truths),
    }


def chance_level(reader: Reader) -> float | None:
    """Accuracy of a uniform random guess, for classification-like kinds."""
    if isinstance(reader, ClassificationReader):
        return 1.0 / len(reader.labels)
    return None


def _contains(words: list[str], part: list[str]) -> bool:
    n = len(part)
    return n > 0 and any(words[i : i + n] == part for i in range(len(words) - n + 1))


def _per_index(records: list[dict], key: str) -> list[float]:
    """Mean over samples of each frame index (samples may have different lengths)."""
    cols: dict[int, list[float]] = defaultdict(list)
    for r in records:
        for i, v in enumerate(r[key]):
            cols[i].append(v)
    return [_finite_mean(cols[i]) for i in sorted(cols)]


def _finite_mean(xs: list[float]) -> float:
    """Mean of the finite values (PSNR is inf for a perfect frame: counted as 100 dB)."""
    vals = [100.0 if x == float("inf") else x for x in xs if not np.isnan(x)]
    return float(np.mean(vals)) if vals else float("nan")
