"""evav.data: stream shards built by `evav preprocess` into training batches (see loader.py)."""

from evav.data.loader import Batches, DataConfig, DataExhaustedError, Loader

__all__ = ["Batches", "DataConfig", "DataExhaustedError", "Loader"]
