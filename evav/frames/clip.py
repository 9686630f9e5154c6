"""A sample is a clip: ``[task frame] [input frames ...] [separator] [output frames ...]``.

``build_clip`` assembles the frames and the per-frame loss mask (which frames are supervised:
the answer frames, or every frame for pretraining on raw text or video). Padding is not part of a
clip: the loader pads to its clip budget with zero frames and a pad mask, so pad frames are never
rendered text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evav.frames.text import TextRenderer


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8
    loss_mask: np.ndarray  # (T,) bool: frames the loss is computed on
    segments: dict[str, int] = field(
        default_factory=dict
    )  # frame counts: task, input, separator, output

    def __post_init__(self):
        assert (
            self.frames.ndim == 4 and self.frames.shape[-1] == 3 and self.frames.dtype == np.uint8
        )
        assert self.loss_mask.shape == (self.frames.shape[0],)


def build_clip(
    text: TextRenderer,
    task: str,
    inputs: np.ndarray,
    outputs: np.ndarray | None = None,
    supervise: str = "outputs",
) -> Clip:
    """Assemble a clip. ``supervise`` is ``"outputs"`` (answer frames only) or ``"all"``.

    Without ``outputs`` (pretraining on raw text or video) the clip is
    ``[task] [inputs]`` and every frame after the task frame is supervised.
    """
    spec = text.spec
    for name, arr in (("inputs", inputs), ("outputs", outputs)):
        if arr is not None and (arr.ndim != 4 or arr.shape[1:] != (spec.height, spec.width, 3)):
            raise ValueError(
                f"{name}: expected (T, {spec.height}, {spec.width}, 3), got {arr.shape}"
            )
    parts = [text.task_frame(task)[None], inputs]
    segments = {"task": 1, "input": len(inputs)}
    if outputs is not None:
        parts += [text.separator()[None], outputs]
        segments.update(separator=1, output=len(outputs))
    frames = np.concatenate(parts).astype(np.uint8, copy=False)
    mask = np.zeros(len(frames), dtype=bool)
    if supervise == "all" or outputs is None:
        mask[1:] = True
    elif supervise == "outputs":
        mask[len(frames) - len(outputs) :] = True
    else:
        raise ValueError(f"supervise must be 'outputs' or 'all', got {supervise!r}")
    return Clip(frames, mask, segments)
