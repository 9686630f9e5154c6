"""Evaluation metrics on decoded answers and generated frames: pure functions of numpy arrays.

| task kind | metrics |
|---|---|
| classification (sst2, cifar10, fsdd/audiomnist, synthetic) | accuracy, weighted F1, macro F1, confusion matrix |
| open answers (clevrer) | accuracy, weighted F1 |
| multi-label (tinyvirat) | macro F1 over labels |
| tracking (lasot) | mean IoU of boxes |
| colorization | colorfulness (Hasler & Suesstrunk 2003), colour distribution consistency (CDC) |
| video prediction | PSNR and SSIM per predicted frame index |
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification(
    pred: Sequence[str], true: Sequence[str], labels: Sequence[str] | None = None
) -> dict:
    """Accuracy, weighted and macro F1, and the confusion matrix (rows = true, cols = predicted).

    ``labels`` fixes the class order; predictions outside it count as wrong for every class.
    """
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions for {len(true)} answers")
    labels = list(labels) if labels is not None else sorted(set(true))
    index = {c: i for i, c in enumerate(labels)}
    conf = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for p, t in zip(pred, true):
        if t in index and p in index:
            conf[index[t], index[p]] += 1
    tp = np.diag(conf).astype(float)
    support = np.array([sum(1 for t in true if t == c) for c in labels], dtype=float)
    predicted = np.array([sum(1 for p in pred if p == c) for c in labels], dtype=float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros_like(tp),
        where=(precision + recall) > 0,
    )
    n = len(true)
    present = support > 0
    return {
        "accuracy": float(sum(p == t for p, t in zip(pred, true)) / n) if n else 0.0,
        "f1_weighted": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "f1_macro": float(f1[present].mean()) if present.any() else 0.0,
        "confusion": conf.tolist(),
        "labels": labels,
        "n": n,
    }


def multilabel_f1(
    pred: Sequence[set[str]], true: Sequence[set[str]], labels: Sequence[str]
) -> dict:
    """Macro F1 over ``labels`` for multi-label answers (sets of label words per sample)."""
    f1s = []
    for c in labels:
        tp = sum(1 for p, t in zip(pred, true) if c in p and c in t)
        fp = sum(1 for p, t in zip(pred, true) if c in p and c not in t)
        fn = sum(1 for p, t in zip(pred, true) if c not in p and c in t)
        if tp + fn == 0:
            continue  # a label never present contributes nothing
        f1s.append(2 * tp / (2 * tp + fp + fn))
    exact = sum(1 for p, t in zip(pred, true) if set(p) == set(t))
    return {
        "f1_macro": float(np.mean(f1s)) if f1s else 0.0,
        "exact_match": exact / len(true) if len(true) else 0.0,
        "n": len(true),
    }


def box_iou(
    a: tuple[float, float, float, float] | None, b: tuple[float, float, float, float] | None
) -> float:
    """IoU of two inclusive pixel boxes ``(x0, y0, x1, y1)``; 0 when either is missing."""
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    union = area(a) + area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def colorfulness(frames_NHWC: np.ndarray) -> float:
    """Mean Hasler-Suesstrunk colourfulness of uint8 RGB frames (0 for grey images)."""
    f = frames_NHWC.astype(np.float64)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    axes = tuple(range(1, rg.ndim))
    std = np.sqrt(rg.std(axis=axes) ** 2 + yb.std(axis=axes) ** 2)
    mean = np.sqrt(rg.mean(axis=axes) ** 2 + yb.mean(axis=axes) ** 2)
    return float((std + 0.3 * mean).mean())


def colour_distribution_consistency(frames_THWC: np.ndarray, bins: int = 32) -> float:
    """CDC: mean Jensen-Shannon divergence of per-channel histograms between consecutive frames.

    Lower is more temporally consistent colour (0 for identical colour distributions).
    """
    if len(frames_THWC) < 2:
        return 0.0

    def hist(frame, c):
        h = np.histogram(frame[..., c], bins=bins, range=(0, 256))[0].astype(np.float64) + 1e-12
        return h / h.sum()

    def js(p, q):
        m = 0.5 * (p + q)
        return 0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum()

    vals = [
        js(hist(a, c), hist(b, c))
        for a, b in zip(frames_THWC[:-1], frames_THWC[1:])
        for c in range(3)
    ]
    return float(np.mean(vals))


def psnr(pred: np.ndarray, true: np.ndarray) -> float:
    """PSNR in dB between uint8 images (inf for identical ones)."""
    mse = np.mean((pred.astype(np.float64) - true.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(pred: np.ndarray, true: np.ndarray, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) of uint8 images ``(H, W[, C])``, uniform ``window``, per channel."""
    import torch
    import torch.nn.functional as F

    def prep(x):
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
        t = t[..., None] if t.ndim == 2 else t
        return t.permute(2, 0, 1)[:, None]  # (C, 1, H, W)

    x, y = prep(pred), prep(true)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = torch.ones(1, 1, window, window, dtype=torch.float64) / window**2
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mu_x**2
    syy = F.conv2d(y * y, k) - mu_y**2
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def per_frame_quality(pred_NTHWC: np.ndarray, true_NTHWC: np.ndarray) -> dict:
    """PSNR and SSIM for each predicted frame index, averaged over samples."""
    if pred_NTHWC.shape != true_NTHWC.shape:
        raise ValueError(
            f"prediction {pred_NTHWC.shape} and truth {true_NTHWC.shape} differ in shape"
        )
    n, t = pred_NTHWC.shape[:2]
    if n == 0 or t == 0:
        raise ValueError(f"no frames to compare (shape {pred_NTHWC.shape})")
    ps = [[psnr(pred_NTHWC[i, j], true_NTHWC[i, j]) for i in range(n)] for j in range(t)]
    ss = [[ssim(pred_NTHWC[i, j], true_NTHWC[i, j]) for i in range(n)] for j in range(t)]
    finite = lambda xs: [x for x in xs if np.isfinite(x)] or [100.0]  # noqa: E731
    return {
        "psnr_per_frame": [float(np.mean(finite(x))) for x in ps],
        "ssim_per_frame": [float(np.mean(x)) for x in ss],
        "psnr": float(np.mean([np.mean(finite(x)) for x in ps])),
        "ssim": float(np.mean(ss)),
        "n": n,
    }
