"""A local S3 server for benchmarks/worker_check.py and tests/test_targets.py: moto's, in a process
of its own (served from a thread of the caller, it waits for the GIL that deltalake's blocking
calls hold, delta-rs #3942), on 127.0.0.1 on a free port, with one bucket `datasets`."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


@contextlib.contextmanager
def local_s3(log_path: Path):
    """Start the server (its output in `log_path`) and create the bucket; yield the environment a
    user would set for a real store (endpoint, credentials, region); stop the server after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(log_path).open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{endpoint}/datasets", method="PUT"), timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"moto's S3 server exited: {Path(log_path).read_text()}") from None
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto's S3 server did not answer in 30 s: {Path(log_path).read_text()}")
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
