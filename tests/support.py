"""Test helpers (not part of the package): free ports, a real `mlflow server`, one torch thread.

    with mlflow_server(tmp_path) as uri:   # "http://127.0.0.1:<free port>"
        ensure_store(uri)

`mlflow_server` starts the server with the low-memory flags (one worker, job execution off;
~0.5 GB, healthy in a few seconds), SQLite backend `<root>/server.db`, proxied artifacts in
`<root>/server-artifacts`; it is stopped with SIGTERM to its process group at exit, even when
the body raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent  # the repository
BIN = Path(sys.executable).parent  # the venv's console scripts (sophon-ray, ray, mlflow)
# digits in seconds rather than minutes: 30 pretraining steps, 3 protection iterations
FAST = ["--smoke", "--set", "pretrain.steps=30", "--set", "protect.iterations=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block (small models gain little from two, and a second thread
    spin-waiting on a busy 2-core machine made smoke training ~10x slower); the previous count is
    restored afterwards, so nothing leaks into later tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(root: str | Path, timeout: float = 90.0) -> Iterator[str]:
    """Run `mlflow server` for the duration of the block; yields its http URI.

    Args:
        root: folder for the server's database, artifacts and log (`server.log`).
        timeout: seconds to wait for `/health` before failing (the log tail is in the error).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow = BIN / "mlflow"
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{(root / 'server.db').resolve()}",
           "--artifacts-destination", str((root / "server-artifacts").resolve()),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server did not become healthy (exit {proc.poll()}):\n{tail}")
            time.sleep(0.25)
        yield uri
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()
