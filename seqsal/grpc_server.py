"""Shared gRPC server plumbing: options, health, reflection, interceptor and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from seqsal.interceptor import ErrorInterceptor
from seqsal.settings import Settings

logger = logging.getLogger("seqsal.grpc")


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options: large messages for long prompts, keep-alive for idle clients behind proxies."""
    size = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def request_classes(services: Iterable[_descriptor.ServiceDescriptor]) -> dict[str, type]:
    """Full method path -> request message class, for the interceptor's tolerant decoding."""
    classes: dict[str, type] = {}
    for service in services:
        for method in service.methods:
            classes[f"/{service.full_name}/{method.name}"] = method.input_type._concrete_class
    return classes


class GrpcServer:
    """An asyncio gRPC server with health, reflection, error mapping and SIGTERM draining."""

    def __init__(self, settings: Settings, services: list[_descriptor.ServiceDescriptor]) -> None:
        self.settings = settings
        self.services = services
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(request_classes(services))],
            options=server_options(settings),
            maximum_concurrent_rpcs=None,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [s.full_name for s in services] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.port = 0
        self._stopping = asyncio.Event()

    def bind(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0 = a free port); returns the port."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}: address in use or not available")
        return self.port

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)

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
        logger.info("draining: waiting up to %.0f s for in-flight calls", grace)
        await self.server.stop(grace)
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
