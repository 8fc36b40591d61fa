"""``seqsal up``: the whole product on one machine, started in order and stopped together.

Cache (a private ``redis-server`` when the binary is there and no ``REDIS_URL``
is given, else the embedded cache), inference server, saliency server and the
UI (once it exists) each run as a child process; each is waited for through
its health check before the next one starts, and Ctrl-C or SIGTERM stops them
all (the servers drain their in-flight calls). A component that exits once the
stack is up is started again, after a backoff that doubles with each failure in
a row (1 s, 2 s, 4 s ... up to 30 s); the others keep running meanwhile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from inference_server.settings import InferenceSettings
from saliency_server.settings import SaliencySettings
from seqsal.health import grpc_serving as grpc_serving  # re-exported
from seqsal.tls import ClientTLS
from server_kit.server_tls import server_tls_enabled
from server_kit.settings import ServerSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
UI_APP = REPO_ROOT / "ui" / "app.py"


class StackError(RuntimeError):
    """A component failed to start; the message says which and where its log is."""


@dataclass
class Component:
    """One child process of the stack."""

    name: str
    command: list[str]
    ready: Callable[[], bool]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: failures in a row since it was last healthy for RESTART_RESET_S
    failures: int = 0
    #: when it was (re)started, and when its next restart is due (after a failure)
    started_at: float = 0.0
    restart_at: float | None = None
    #: it was restarted and has not answered its health check since
    recovering: bool = False

    def spawn(self, env: dict[str, str]) -> None:
        """Start the child process, appending to its log."""
        assert self.log_path is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env | self.env,
                start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
            )
        self.started_at = time.monotonic()


#: Restart backoff after a component fails once the stack is up: doubles per failure in a row.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
#: A component healthy this long after a restart has its failure count reset.
RESTART_RESET_S = 60.0


def redis_ready(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def http_ready(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def client_tls(settings: ServerSettings) -> ClientTLS:
    """How the stack (and its UI) reach its servers: the client TLS settings; if only the servers
    have TLS configured, TLS trusting their own certificate (right for a self-signed one)."""
    tls = ClientTLS.from_settings(settings)
    if tls.enabled or not server_tls_enabled(settings):
        return tls
    return ClientTLS(
        enabled=True,
        ca_file=settings.tls_cert_file,
        cert_file=settings.tls_client_cert_file,
        key_file=settings.tls_client_key_file,
        server_name=settings.tls_server_name,
    )


def security_env(settings: ServerSettings) -> tuple[dict[str, str], dict[str, str]]:
    """Environment for the servers (accepted tokens) and for the clients (token, TLS) of the stack."""
    servers: dict[str, str] = {}
    clients: dict[str, str] = {}
    tokens = [t.get_secret_value() for t in settings.auth_tokens]
    if tokens:
        servers["SEQSAL_AUTH_TOKENS"] = ",".join(tokens)
    if settings.auth_token_file:
        servers["SEQSAL_AUTH_TOKEN_FILE"] = str(settings.auth_token_file)
    client_token = settings.auth_token.get_secret_value() if settings.auth_token else (tokens or [None])[0]
    if client_token:
        clients["SEQSAL_AUTH_TOKEN"] = client_token
    tls = client_tls(settings)
    if tls.enabled:
        clients["SEQSAL_TLS"] = "1"
        for name, value in (
            ("SEQSAL_TLS_CA_FILE", tls.ca_file),
            ("SEQSAL_TLS_CLIENT_CERT_FILE", tls.cert_file),
            ("SEQSAL_TLS_CLIENT_KEY_FILE", tls.key_file),
            ("SEQSAL_TLS_SERVER_NAME", tls.server_name),
        ):
            if value:
                clients[name] = str(value)
    return servers, clients


class Stack:
    """Starts components in order, waits for each, stops them in reverse."""

    def __init__(
        self,
        saliency: SaliencySettings,
        inference: InferenceSettings,
        *,
        log_dir: Path,
        console: Console | None = None,
    ) -> None:
        #: the servers' settings; their models, security and TLS are the saliency server's, passed to both
        self.saliency = saliency
        self.inference = inference
        self.log_dir = log_dir
        self.console = console or Console(stderr=True)
        self.components: list[Component] = []
        #: set by SIGTERM/SIGINT (or a caller) to end :meth:`wait`
        self.stopping = threading.Event()
        self.backoff_s = RESTART_BACKOFF_S
        self.backoff_max_s = RESTART_BACKOFF_MAX_S
        self.reset_s = RESTART_RESET_S

    def plan(self, *, redis_port: int, ui_port: int, with_ui: bool = True) -> list[Component]:
        """The components to run for these settings."""
        s, i = self.saliency, self.inference
        python = sys.executable
        env: dict[str, str] = {"SEQSAL_DATA_DIR": str(s.data_dir)}
        if s.models:
            env["SEQSAL_MODELS"] = ",".join(s.models)
        components: list[Component] = []
        redis_url = s.redis_url
        if not redis_url and shutil.which("redis-server"):
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            components.append(
                Component(
                    name="redis",
                    command=[
                        "redis-server",
                        "--bind",
                        "127.0.0.1",
                        "--port",
                        str(redis_port),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--maxmemory",
                        f"{s.cache_max_mb}mb",
                        "--maxmemory-policy",
                        "allkeys-lru",
                    ],
                    ready=lambda: redis_ready(redis_url or ""),
                    url=redis_url,
                )
            )
        if redis_url:
            env["REDIS_URL"] = redis_url
        inference = f"{i.host}:{i.port}"
        saliency = f"{s.host}:{s.port}"
        server_env, client_env = security_env(s)
        tls = client_tls(s)
        scheme = "grpcs" if tls.enabled else "grpc"
        components.append(
            Component(
                name=f"inference ({i.backend})",
                command=[python, "-m", "seqsal_cli", "serve", "inference", "--backend", i.backend],
                ready=lambda: grpc_serving(inference, tls=tls),
                url=f"{scheme}://{inference}",
                env=env
                | server_env
                | {"SEQSAL_INFERENCE_HOST": i.host, "SEQSAL_INFERENCE_PORT": str(i.port)},
            )
        )
        components.append(
            Component(
                name="saliency",
                command=[python, "-m", "seqsal_cli", "serve", "saliency"],
                ready=lambda: grpc_serving(saliency, tls=tls),
                url=f"{scheme}://{saliency}",
                # it scores OCCLUSION/LIME/Verify variants through the inference server, as a client
                env=env
                | server_env
                | client_env
                | {"SEQSAL_HOST": s.host, "SEQSAL_PORT": str(s.port), "SEQSAL_SCORE_ADDRESS": inference},
            )
        )
        if with_ui and UI_APP.exists():
            components.append(
                Component(
                    name="ui",
                    command=[
                        python,
                        "-m",
                        "streamlit",
                        "run",
                        str(UI_APP),
                        "--server.port",
                        str(ui_port),
                        "--server.address",
                        "127.0.0.1",
                        "--server.headless",
                        "true",
                        "--browser.gatherUsageStats",
                        "false",
                        "--client.toolbarMode",
                        "minimal",
                    ],
                    ready=lambda: http_ready(f"http://127.0.0.1:{ui_port}/_stcore/health"),
                    url=f"http://127.0.0.1:{ui_port}",
                    env=env
                    | client_env
                    | {"SEQSAL_SALIENCY_ADDRESS": saliency, "SEQSAL_INFERENCE_ADDRESS": inference},
                )
            )
        return components

    def start(self, components: list[Component], *, timeout_s: float = 600.0) -> None:
        """Start each component and wait for it to be healthy; on failure stop what started."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for component in components:
            component.log_path = self.log_dir / f"{component.name.split()[0]}.log"
            component.log_path.write_bytes(b"")
            self.console.print(f"starting [bold]{component.name}[/] (log: {component.log_path})")
            component.spawn(dict(os.environ))
            self.components.append(component)
            deadline = time.monotonic() + timeout_s
            while not component.ready():
                if component.process.poll() is not None:
                    self.stop()
                    raise StackError(
                        f"{component.name} exited with code {component.process.returncode}; "
                        f"see {component.log_path}:\n{_tail(component.log_path)}"
                    )
                if time.monotonic() > deadline:
                    self.stop()
                    raise StackError(
                        f"{component.name} was not healthy after {timeout_s:.0f} s; see {component.log_path}"
                    )
                time.sleep(0.5)
            self.console.print(f"  [green]ready[/] {component.name}: {component.url}")

    def stop(self, grace_s: float = 35.0) -> None:
        """SIGTERM every component, newest first, and wait for them (then SIGKILL)."""
        for component in reversed(self.components):
            process = component.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.components.clear()

    def wait(self, poll_s: float = 0.5) -> int:
        """Keep the stack running until we are interrupted (SIGTERM, SIGINT, :attr:`stopping`).

        A component that exits is started again after a backoff (:meth:`watch`); the others keep
        running, so a saliency server that crashed does not take the UI down with it.
        """

        def on_signal(signum: int, frame: object) -> None:
            self.stopping.set()

        # both signals explicitly: a shell's background job inherits SIGINT ignored, and Ctrl-C or
        # `kill -INT` must still stop the stack
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping.wait(poll_s):
                self.watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def watch(self) -> None:
        """One look at every component: schedule a restart of one that exited, make restarts that
        are due, report recoveries."""
        now = time.monotonic()
        for component in self.components:
            process = component.process
            if process is None:
                continue
            if component.restart_at is not None:
                if now >= component.restart_at:
                    component.restart_at = None
                    component.recovering = True
                    self.console.print(f"restarting [bold]{component.name}[/] (log: {component.log_path})")
                    component.spawn(dict(os.environ))
                continue
            if process.poll() is not None:
                if now - component.started_at >= self.reset_s and not component.recovering:
                    component.failures = 0
                delay = min(self.backoff_max_s, self.backoff_s * 2**component.failures)
                component.failures += 1
                component.restart_at = now + delay
                self.console.print(
                    f"[red]{component.name} exited ({process.returncode}); restarting it in {delay:g} s; "
                    f"see {component.log_path}[/]"
                )
                continue
            if component.recovering and component.ready():
                component.recovering = False
                self.console.print(f"  [green]ready again[/] {component.name}: {component.url}")
            elif (
                not component.recovering and component.failures and now - component.started_at >= self.reset_s
            ):
                component.failures = 0


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
