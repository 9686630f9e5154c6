"""Audio -> log-mel spectrogram frames (torch + numpy; no torchaudio).

Any file PyAV can decode (wav, flac, mp3, the audio track of a video) is mixed to mono and
resampled to ``spec.audio.sample_rate`` explicitly, so files recorded at 8 kHz and 48 kHz give
spectrograms on the same frequency axis. The power mel spectrogram is turned to decibels, the top
``top_db`` below the clip's peak is mapped to 0..255 (louder = brighter), low frequencies at the
bottom, and resized to H x W: the whole clip as one frame (the paper), or one frame per
``window_s`` seconds (long audio). Grey, repeated over the 3 channels.

Samples that cannot be audio are refused (BadInputError), never drawn as a misleading picture
(preprocessing/README.md has the table): any NaN or inf; a peak above ``MAX_AMPLITUDE`` (full
scale is 1.0; integer PCM never exceeds it, lossy decoders overshoot by a few dB, so a float file
at 1e30 is corrupt or mis-scaled data, and clipping it would invent a square wave); a peak below
``SILENCE_PEAK`` (-80 dBFS, 3 steps of 16-bit PCM: nothing but dither, which the per-clip
normalisation would otherwise stretch to full brightness); and more than ``MAX_AUDIO_SECONDS``
(a few bytes of compressed silence can decode to hours of samples).
"""

from __future__ import annotations

import functools
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from evav.errors import BadInputError, check_nonempty_file
from evav.frames.spec import AudioSpec, RenderSpec

MAX_AMPLITUDE = 16.0  # |sample| above this (24 dB over full scale) is refused
SILENCE_PEAK = 1e-4  # a peak below this (-80 dBFS) is silence, refused
MAX_AUDIO_SECONDS = 1200.0  # longer files are refused before (or while) decoding


def _check_riff_complete(path: Path) -> None:
    """A WAV file whose data chunk is shorter than its header says is truncated.

    FFmpeg derives a WAV's duration from the file size, so a cut file decodes "fine" and only
    the RIFF header tells the truth. Streaming writers that leave the size at 0 or 0xFFFFFFFF
    are not judged.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        size = path.stat().st_size
        while True:
            hdr = f.read(8)
            if len(hdr) < 8:
                return
            chunk, n = hdr[:4], int.from_bytes(hdr[4:], "little")
            if chunk == b"data":
                available = size - f.tell()
                if 0 < n < 0xFFFFFFF0 and available < n:
                    raise BadInputError(
                        path,
                        f"truncated: WAV header declares {n} data bytes, file holds {available}",
                    )
                return
            f.seek(n + (n & 1), 1)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode an audio file to mono float32 at ``sample_rate``; BadInputError on bad files."""
    path = check_nonempty_file(path)
    _check_riff_complete(path)
    chunks, n = [], 0
    too_long = BadInputError(path, f"longer than {MAX_AUDIO_SECONDS:g} s: refused (cut it)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise BadInputError(path, "no audio stream")
            stream = container.streams.audio[0]
            declared = _declared_seconds(container, stream)
            if declared is not None and declared > MAX_AUDIO_SECONDS:
                raise too_long
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    n += chunks[-1].size
                if n > MAX_AUDIO_SECONDS * sample_rate:  # the header lied, or there is none
                    raise too_long
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except BadInputError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError) as e:
        raise BadInputError(path, f"not a readable audio file: {e}") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise BadInputError(path, "no audio samples decoded (empty stream)")
    got = samples.size / sample_rate
    if declared is not None and got < 0.95 * declared - 0.02:
        raise BadInputError(
            path, f"truncated: header declares {declared:.3f} s, only {got:.3f} s decoded"
        )
    check_samples(samples, path)
    return samples


def check_samples(samples: np.ndarray, where: str | Path) -> None:
    """BadInputError unless mono samples are finite, at most MAX_AMPLITUDE and not silent."""
    if samples.ndim != 1 or samples.size == 0:
        raise BadInputError(where, f"expected non-empty mono samples, got shape {samples.shape}")
    finite = np.isfinite(samples)
    if not finite.all():
        bad = int(samples.size - np.count_nonzero(finite))
        raise BadInputError(where, f"{bad} of {samples.size} samples are not finite (NaN or inf)")
    peak = float(np.abs(samples).max())
    if peak > MAX_AMPLITUDE:
        raise BadInputError(
            where,
            f"absurd amplitude: peak {peak:.3g}, more than {MAX_AMPLITUDE:g} (full scale is 1.0)",
        )
    if peak < SILENCE_PEAK:
        raise BadInputError(
            where, f"silent: peak amplitude {peak:.3g} is below {SILENCE_PEAK:g} (-80 dBFS)"
        )


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


@functools.lru_cache(maxsize=8)
def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float
) -> torch.Tensor:
    """Triangular HTK-scale mel filters, ``(n_mels, n_fft // 2 + 1)``, area-normalised (Slaney)."""

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)

    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (center - lower)
    down = (upper - freqs[None]) / (upper - center)
    fb = np.maximum(0.0, np.minimum(up, down)) * (2.0 / (upper - lower))
    return torch.from_numpy(fb.astype(np.float32))


def log_mel(samples: np.ndarray, a: AudioSpec) -> np.ndarray:
    """Mono samples -> ``(n_mels, n_steps)`` float32 in [0, 1] (1 = the clip's peak)."""
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if x.numel() < a.n_fft:
        x = F.pad(x, (0, a.n_fft - x.numel()))
    spec = (
        torch.stft(
            x,
            a.n_fft,
            a.hop_length,
            window=torch.hann_window(a.n_fft),
            center=True,
            return_complex=True,
        )
        .abs()
        .pow(2)
    )
    f_max = a.f_max if a.f_max is not None else a.sample_rate / 2
    mel = mel_filterbank(a.sample_rate, a.n_fft, a.n_mels, a.f_min, f_max) @ spec
    if not bool(mel.max() > 1e-10):  # digital silence: nothing to show, black (not white)
        return np.zeros(mel.shape, np.float32)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    floor = db.max() - a.top_db
    img = (db.clamp_min(floor) - floor) / a.top_db
    return img.numpy()


def spectrogram_frames(samples: np.ndarray, spec: RenderSpec) -> np.ndarray:
    """Mono samples at ``spec.audio.sample_rate`` -> ``(T, H, W, 3)`` uint8 spectrogram frames."""
    a = spec.audio
    img = log_mel(samples, a)[::-1].copy()  # low frequencies at the bottom
    if a.window_s is None:
        pieces = [img]
    else:
        step = max(1, round(a.window_s * a.sample_rate / a.hop_length))
        n = -(-img.shape[1] // step)
        padded = np.zeros((img.shape[0], n * step), np.float32)  # silence = 0 after scaling
        padded[:, : img.shape[1]] = img
        pieces = [padded[:, i * step : (i + 1) * step] for i in range(n)]
    t = torch.from_numpy(np.stack(pieces))[:, None]  # (T, 1, n_mels, steps)
    t = F.interpolate(
        t, size=(spec.height, spec.width), mode="bilinear", align_corners=False, antialias=True
    )
    grey = (t[:, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return np.repeat(grey[..., None], 3, axis=-1)


def render_audio(audio: str | Path | np.ndarray, spec: RenderSpec) -> np.ndarray:
    """An audio file (or mono samples at ``spec.audio.sample_rate``) -> ``(T, H, W, 3)`` uint8."""
    if isinstance(audio, np.ndarray):
        check_samples(audio, "audio samples")
    else:
        audio = load_audio(audio, spec.audio.sample_rate)
    return spectrogram_frames(audio, spec)
