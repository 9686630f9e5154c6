"""Read answers back from frames: the nearest rendered template by L2 distance on pixels.

Evaluation reads a generated answer frame by comparing it with the rendered frames of every
candidate (a label set, or a whole vocabulary) and taking the closest. Distances are computed as
one matrix product per chunk: ``|x - t|^2 = |x|^2 - 2 x.t + |t|^2``. When every template is grey
(R = G = B, as rendered text is), the product runs on one channel against the query's channel
sum, which is exactly the same distance at a third of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from evav.frames.text import TextRenderer


class TemplateDecoder:
    """Nearest-template decoder over ``labels`` with templates ``(N, H, W, 3)`` uint8."""

    def __init__(self, templates_NHWC: np.ndarray, labels: Sequence[str]):
        if len(templates_NHWC) != len(labels) or len(labels) == 0:
            raise ValueError("need one template per label, and at least one")
        t = torch.from_numpy(np.ascontiguousarray(templates_NHWC)).float()
        self.grey = bool((t[..., 0] == t[..., 1]).all() and (t[..., 1] == t[..., 2]).all())
        self.channels = 1 if self.grey else 3
        self.T = (t[..., :1] if self.grey else t).reshape(len(labels), -1)  # (N, D)
        self.t_sq = (self.T * self.T).sum(1) * (3 if self.grey else 1)  # (N,) full-RGB |t|^2
        self.labels = list(labels)
        self.frame_shape = tuple(templates_NHWC.shape[1:])

    @classmethod
    def for_words(cls, text: TextRenderer, words: Sequence[str]) -> TemplateDecoder:
        """Templates for single-frame words (a label set or a vocabulary)."""
        return cls(np.stack([text.render_token(w) for w in words]), words)

    def distances(self, frames_BHWC: np.ndarray | torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Squared L2 distances ``(B, N)`` from each frame to each template (pixel units 0..255)."""
        x = torch.as_tensor(np.asarray(frames_BHWC)).float()
        if tuple(x.shape[1:]) != self.frame_shape:
            raise ValueError(
                f"frames of shape {tuple(x.shape[1:])}, templates of {self.frame_shape}"
            )
        out = []
        for s in range(0, len(x), chunk):
            xb = x[s : s + chunk]
            x_sq = (xb * xb).flatten(1).sum(1, keepdim=True)
            q = (xb.sum(-1, keepdim=True) if self.grey else xb).flatten(1)
            out.append((x_sq - 2.0 * (q @ self.T.T) + self.t_sq[None]).clamp_min(0.0))
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def decode(self, frames_BHWC: np.ndarray | torch.Tensor) -> list[str]:
        """The nearest template's label for each frame."""
        idx = self.distances(frames_BHWC).argmin(1)
        return [self.labels[i] for i in idx.tolist()]

    def collisions(self, min_rms: float = 1.0) -> list[tuple[str, str, float]]:
        """Pairs of labels whose templates are closer than ``min_rms`` (RMS pixel difference).

        ``min_rms=1.0`` finds identical or near-identical renders, which the decoder cannot tell
        apart. Returns ``(label_a, label_b, rms)`` with each pair once.
        """
        n_pix = self.T.shape[1] * self.channels
        pairs = []
        for s in range(0, len(self.labels), 1024):
            q = self.T[s : s + 1024]
            q_sq = (q * q).sum(1, keepdim=True) * (3 if self.grey else 1)
            d = (q_sq - 2.0 * (q @ self.T.T) * (3 if self.grey else 1) + self.t_sq[None]).clamp_min(
                0
            )
            rms = (d / n_pix).sqrt()
            for i, j in (rms < min_rms).nonzero().tolist():
                if s + i < j:
                    pairs.append((self.labels[s + i], self.labels[j], float(rms[i, j])))
        return pairs
