"""A real S3-compatible server for tests: moto's, on loopback, started in this process, with
the environment (AWS_*) pointing at it, so that subprocesses (evav's CLI, torchrun's ranks,
DataLoader workers) reach it too."""

from __future__ import annotations

import contextlib

from tools.mlflow_server import free_port


@contextlib.contextmanager
def moto_s3(mp):
    """Start the server; ``mp``: a pytest MonkeyPatch for the environment. Yields the endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        yield endpoint
    finally:
        server.stop()


def s3():
    """A fresh s3fs filesystem for the test's own looks at the bucket (no caches)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
