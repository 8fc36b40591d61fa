"""Optional OpenTelemetry tracing: one SERVER span per gRPC call when ``SEQSAL_TRACING`` is set.

Off by default, and then nothing of OpenTelemetry is imported. When on, the
span's parent comes from the caller's ``traceparent`` metadata (W3C trace
context). If the process has no tracer provider yet and ``opentelemetry-sdk``
is installed, one is set up exporting over OTLP (configured by the standard
``OTEL_EXPORTER_OTLP_*`` variables); a provider set up by someone else (e.g.
``opentelemetry-instrument``) is used as it is.
"""

from __future__ import annotations

import logging
from typing import Any

from server_kit.settings import ServerSettings

logger = logging.getLogger("seqsal.tracing")


def _install_sdk(service: str) -> None:
    from opentelemetry import trace

    if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
        return  # configured already
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.warning("tracing: opentelemetry-sdk is not installed; spans go nowhere")
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"seqsal-{service}"}))
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    except ImportError:
        logger.warning("tracing: no OTLP exporter installed; spans are recorded but not exported")
    trace.set_tracer_provider(provider)
    logger.info("tracing: OpenTelemetry spans exported over OTLP")


def make_tracer(settings: ServerSettings, service: str) -> Any | None:
    """A tracer for the call lifecycle, or None when tracing is off or OpenTelemetry is missing."""
    if not settings.tracing:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        logger.warning("SEQSAL_TRACING is set but opentelemetry-api is not installed; no tracing")
        return None
    _install_sdk(service)
    return trace.get_tracer("seqsal")


def start_span(tracer: Any, rpc_path: str, metadata: dict[str, str], request_id: str) -> Any:
    """A started SERVER span for a call, child of the caller's trace context if it sent one."""
    from opentelemetry import propagate, trace

    service, _, method = rpc_path.lstrip("/").partition("/")
    return tracer.start_span(
        rpc_path.lstrip("/"),
        context=propagate.extract(metadata),
        kind=trace.SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "seqsal.request_id": request_id,
        },
    )


def end_span(span: Any, code: str) -> None:
    """Record the call's status code on ``span`` and end it."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code)
    if code not in ("OK", "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND"):
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()
