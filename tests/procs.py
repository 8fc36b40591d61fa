"""Processes that fault tests kill and restart: our own redis-server, and seqsal servers.

The servers run as ``seqsal serve ...`` children started through :class:`seqsal_cli.stack.Stack`
(the code ``seqsal up`` uses), so what is tested is what ships. Everything here waits for
state (a health check, a PING), never for a fixed time.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from seqsal_cli.stack import Component, Stack, redis_ready

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(port: int, timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
    """A throwaway ``redis-server`` (no persistence) on ``port``, once it answers PING."""
    assert REDIS_SERVER is not None, "redis-server is not installed"
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    while not redis_ready(f"redis://127.0.0.1:{port}/0"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(0.05)
    return process


def metric_value(port: int, name: str, labels: dict[str, str]) -> float | None:
    """A sample of a server's Prometheus ``/metrics`` on ``port`` (None: absent or not answering)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a child (if it still runs) and reap it."""
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(timeout=30)


@dataclass
class ServerProcess:
    """One seqsal server child process (``saliency`` or ``inference``) on a fixed port.

    :meth:`start` waits until it is SERVING; :meth:`kill` is SIGKILL; :meth:`start` again
    brings it back on the same port.
    """

    component: Component
    log_dir: Path
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.component.process

    def start(self, timeout_s: float = 180.0) -> None:
        stack = Stack(
            SaliencySettings(_env_file=None),  # type: ignore[call-arg]
            InferenceSettings(_env_file=None),  # type: ignore[call-arg]
            log_dir=self.log_dir,
            console=Console(quiet=True),
        )
        stack.start([self.component], timeout_s=timeout_s)

    def kill(self) -> None:
        stop(self.component.process)

    def log(self) -> str:
        path = self.component.log_path
        return path.read_text(errors="replace") if path and path.exists() else ""


def server_process(
    kind: str, model_spec: str, log_dir: Path, *, env: dict[str, str] | None = None
) -> ServerProcess:
    """A (not yet started) ``seqsal serve <kind>`` child on a free port, transformers backend, CPU,
    in-process cache unless ``env`` sets ``REDIS_URL``, metrics off unless ``env`` turns them on."""
    port = free_port()
    saliency = SaliencySettings(_env_file=None, models=[model_spec], port=port, device="cpu")  # type: ignore[call-arg]
    inference = InferenceSettings(_env_file=None, backend="transformers", port=port)  # type: ignore[call-arg]
    stack = Stack(saliency, inference, log_dir=log_dir, console=Console(quiet=True))
    (component,) = [
        c
        for c in stack.plan(redis_port=free_port(), ui_port=free_port(), with_ui=False)
        if c.name.startswith(kind)
    ]
    component.env |= {
        "REDIS_URL": "",
        "SEQSAL_DEVICE": "cpu",
        "SEQSAL_METRICS_PORT": "0",
        "SEQSAL_INFERENCE_METRICS_PORT": "0",
        "SEQSAL_SHUTDOWN_GRACE_S": "2",
    } | (env or {})
    return ServerProcess(component=component, log_dir=log_dir, port=port)
