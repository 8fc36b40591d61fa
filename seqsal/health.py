"""Is a seqsal server up? The standard gRPC health check, asked once (no token needed)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqsal.tls import ClientTLS, sync_channel


def grpc_serving(address: str, timeout: float = 1.0, tls: ClientTLS | None = None) -> bool:
    """True when the gRPC server at ``address`` reports SERVING (health needs no token)."""
    try:
        with sync_channel(address, tls, []) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
