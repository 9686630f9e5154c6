"""evav.data: stream shards built by `evav preprocess` into training batches (see loader.py)."""

from evav.data.loader import DataConfig, Loader

__all__ = ["DataConfig", "Loader"]
