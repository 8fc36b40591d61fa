"""Shared gRPC server plumbing: options, health, reflection, the call lifecycle and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server_kit.auth import TokenAuth, check_bind_policy, is_loopback
from server_kit.call_lifecycle import CallLifecycle
from server_kit.metrics import ServerMetrics
from server_kit.ratelimit import RateLimiter
from server_kit.server_tls import server_credentials, server_tls_mode
from server_kit.settings import ServerSettings
from server_kit.tracing import make_tracer

logger = logging.getLogger("seqsal.grpc")


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Channel options: large messages for long prompts, keep-alive for idle clients behind proxies."""
    size = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # close connections after a while (gracefully) so clients re-resolve DNS and find new replicas
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 600_000),  # long IG calls may finish first
    ]


def preflight(settings: ServerSettings, host: str, what: str) -> None:
    """Check the security settings before the slow start-up (loading models).

    Raises :class:`~server_kit.auth.BindPolicyError` (an open server on a non-loopback address),
    ``FileNotFoundError`` (a missing token file) or :class:`~seqsal.tls.TlsConfigError`.
    """
    check_bind_policy(host, settings, authenticated=TokenAuth.from_settings(settings) is not None, what=what)
    server_credentials(settings)


def request_classes(services: Iterable[_descriptor.ServiceDescriptor]) -> dict[str, type]:
    """Full method path -> request message class, for the tolerant decoding of requests."""
    classes: dict[str, type] = {}
    for service in services:
        for method in service.methods:
            classes[f"/{service.full_name}/{method.name}"] = method.input_type._concrete_class
    return classes


class GrpcServer:
    """An asyncio gRPC server with health, reflection, error mapping and SIGTERM draining.

    Also, from the settings: bearer-token authentication, a per-caller rate limit, TLS or mutual
    TLS, request ids and access logs, Prometheus metrics (``self.metrics``, served by
    :meth:`start_metrics`) and optional tracing. ``name`` (``saliency``, ``inference``) labels
    its logs and metrics.
    """

    def __init__(
        self, settings: ServerSettings, services: list[_descriptor.ServiceDescriptor], *, name: str = "seqsal"
    ) -> None:
        self.settings = settings
        self.services = services
        self.name = name
        self.metrics = ServerMetrics(name)
        self.auth = TokenAuth.from_settings(settings)
        self.limiter = RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        lifecycle = CallLifecycle(
            request_classes(services),
            auth=self.auth,
            limiter=self.limiter,
            metrics=self.metrics,
            tracer=make_tracer(settings, name),
        )
        self.server = grpc.aio.server(
            interceptors=[lifecycle],
            options=server_options(settings),
            maximum_concurrent_rpcs=None,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.full_name for s in services] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.port = 0
        self.exposed = False  # listening on a non-loopback address
        self._stopping = asyncio.Event()

    def bind(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0 = a free port), with TLS if configured; returns the port.

        Raises :class:`~server_kit.auth.BindPolicyError` for a non-loopback ``host`` without
        authentication (unless ``allow_unauthenticated``).
        """
        check_bind_policy(
            host, self.settings, authenticated=self.auth is not None, what=f"{self.name} server"
        )
        self.exposed = self.exposed or not is_loopback(host)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: address in use or not available")
        return self.port

    def security_summary(self) -> str:
        """One line for the start-up log: authentication, TLS and rate limit in force."""
        if self.auth is not None:
            auth = f"bearer tokens ({self.auth.count} accepted)"
        elif self.exposed:
            auth = "NONE on a non-loopback address (SEQSAL_ALLOW_UNAUTHENTICATED)"
        else:
            auth = "none (loopback only)"
        rate = f"{self.limiter.per_minute}/min per caller" if self.limiter is not None else "off"
        return f"auth: {auth}; TLS: {server_tls_mode(self.settings)}; rate limit: {rate}"

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)
        log = logger.warning if self.auth is None and self.exposed else logger.info
        log("%s server security: %s", self.name, self.security_summary())

    def start_metrics(self, host: str, port: int) -> int:
        """Serve this server's Prometheus metrics on ``http://host:port/metrics`` (0 = a free port)."""
        return self.metrics.start_http(host, port)

    def start_configured_metrics(self, host: str, port: int) -> int | None:
        """:meth:`start_metrics` for a port from the settings: 0 = off; a port in use is logged, not fatal."""
        if port == 0:
            logger.info("%s metrics: off", self.name)
            return None
        try:
            return self.start_metrics(self.settings.metrics_host or host, port)
        except OSError as exc:
            logger.error(
                "%s metrics: cannot listen on port %d (%s); serving without /metrics", self.name, port, exc
            )
            return None

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        for service in self.services:
            await self.health.set(service.full_name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.set_serving(False)
        if self.settings.shutdown_delay_s > 0:
            logger.info(
                "NOT_SERVING: still answering for %.1f s before draining", self.settings.shutdown_delay_s
            )
            await asyncio.sleep(self.settings.shutdown_delay_s)
        logger.info("draining: waiting up to %.0f s for in-flight calls", grace)
        await self.server.stop(grace)
        await asyncio.to_thread(self.metrics.stop_http)
        self._stopping.set()

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then drain and return."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(stop.wait())
        stopped = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopped.cancel()
        if stop.is_set():
            logger.info("signal received: shutting down")
            await self.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
