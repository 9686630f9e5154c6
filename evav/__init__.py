"""evav: everything is a video. Render any modality as frames; train one next-frame predictor."""

__version__ = "0.1.0"
