"""Structured logs: JSON lines with the request id a client sent, the id echoed back, spans when asked.

In process, a JSON handler on the ``seqsal`` logger collects what a real server logs; one test
runs ``seqsal serve saliency`` as a subprocess, where JSON is the default off a terminal.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from saliency_server.server import SERVICE
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncSaliencyClient, SaliencyClient
from seqsal.errors import InternalError, UnauthenticatedError
from seqsal.v1 import common_pb2
from seqsal_cli.stack import grpc_serving
from server_kit.logging_setup import JsonFormatter, json_handler, request_id_var, resolve_format

if TYPE_CHECKING:
    from conftest import RunningSaliencyServer

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "log-test-token-123"


def make_settings(models: list[str], **overrides: Any) -> SaliencySettings:
    values: dict[str, Any] = {
        "models": models,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "auth_tokens": [TOKEN],
        "auth_token_file": None,
        "rate_limit_per_minute": 0,
    }
    values.update(overrides)
    return SaliencySettings(_env_file=None, **values)  # type: ignore[call-arg]


class Captured:
    """JSON log lines written by the ``seqsal`` loggers while the fixture is active."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def for_request(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["request_id"] == request_id]


@pytest.fixture
def captured() -> Iterator[Captured]:
    logger = logging.getLogger("seqsal")
    capture = Captured()
    handler = json_handler(capture.stream)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture(scope="module")
async def srv(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    tiny_llama_dir: Path,
) -> AsyncIterator[RunningSaliencyServer]:
    async with run_saliency_server(make_settings([f"tiny={tiny_llama_dir}"])) as running:
        yield running


# --- the formatter ---------------------------------------------------------------------------------


def test_json_formatter_fields() -> None:
    record = logging.LogRecord("seqsal.access", logging.INFO, __file__, 1, "%s done", ("Saliency",), None)
    record.rpc, record.status, record.duration_ms = "Saliency", "OK", 12.5
    token = request_id_var.set("abc123")
    try:
        data = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert data["level"] == "INFO" and data["logger"] == "seqsal.access"
    assert data["message"] == "Saliency done" and data["request_id"] == "abc123"
    assert (data["rpc"], data["status"], data["duration_ms"]) == ("Saliency", "OK", 12.5)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", data["ts"])
    try:
        raise ValueError("boom")
    except ValueError:
        failing = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    data = json.loads(JsonFormatter().format(failing))
    assert data["request_id"] is None and "ValueError: boom" in data["exc"]


def test_auto_format_is_text_on_a_terminal_and_json_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Tty()) == "json" and resolve_format("text", io.StringIO()) == "text"


# --- request ids through a real server -------------------------------------------------------------


async def test_log_lines_carry_the_clients_request_id(srv: RunningSaliencyServer, captured: Captured) -> None:
    async with AsyncSaliencyClient(srv.address, token=TOKEN, tls=False, timeout=60) as client:
        await client.saliency(prompt="Logs: hello", target=" there.", request_id="ui-req-0001")
        segments = client.saliency_all_segments(
            prompt="Logs: a", target=" B. C.", granularity=common_pb2.SENTENCES, request_id="batch-row-7"
        )
        assert len([m async for m in segments]) == 2
        await client.list_models()
        generated = client.last_request_id
    assert generated and re.fullmatch(r"[0-9a-f]{16}", generated)  # the client makes one when none is given
    for rid, rpc in (
        ("ui-req-0001", "Saliency"),
        ("batch-row-7", "SaliencyAllSegments"),
        (generated, "ListModels"),
    ):
        (access,) = [r for r in captured.for_request(rid) if r["logger"] == "seqsal.access"]
        assert access["rpc"] == rpc and access["status"] == "OK", access
        assert access["duration_ms"] > 0 and access["client"].startswith("token:")
        assert TOKEN not in json.dumps(access)


async def test_request_id_is_echoed_in_metadata(srv: RunningSaliencyServer, captured: Captured) -> None:
    path = f"/{SERVICE.full_name}/ListModels"
    async with grpc.aio.insecure_channel(srv.address) as channel:
        list_models = channel.unary_unary(
            path,
            request_serializer=common_pb2.ListModelsRequest.SerializeToString,
            response_deserializer=common_pb2.ListModelsResponse.FromString,
        )
        auth = ("authorization", f"Bearer {TOKEN}")
        call = list_models(common_pb2.ListModelsRequest(), metadata=(auth, ("x-request-id", "trace-42")))
        await call
        assert dict(await call.initial_metadata())["x-request-id"] == "trace-42"
        # none sent: the server makes one, sends it back and logs with it
        call = list_models(common_pb2.ListModelsRequest(), metadata=(auth,))
        await call
        made = dict(await call.initial_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", made)
        assert [r["rpc"] for r in captured.for_request(made)] == ["ListModels"]
        # refused calls carry it too, and are logged with their status
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await list_models(common_pb2.ListModelsRequest(), metadata=(("x-request-id", "no-token-1"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(info.value.initial_metadata())["x-request-id"] == "no-token-1"
        # an unreasonably long id is replaced, not logged
        call = list_models(common_pb2.ListModelsRequest(), metadata=(auth, ("x-request-id", "x" * 500)))
        await call
        assert re.fullmatch(r"[0-9a-f]{16}", dict(await call.initial_metadata())["x-request-id"])
    (refused,) = captured.for_request("no-token-1")
    assert refused["status"] == "UNAUTHENTICATED" and refused["rpc"] == "ListModels"


async def test_internal_errors_are_logged_with_the_request_id(
    srv: RunningSaliencyServer, captured: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(request: Any) -> Any:
        logging.getLogger("seqsal.saliency").info("about to fail")
        raise RuntimeError("kaboom")

    monkeypatch.setattr(srv.serving, "tokenize", broken)
    async with AsyncSaliencyClient(srv.address, token=TOKEN, tls=False) as client:
        with pytest.raises(InternalError) as info:
            await client.tokenize("x", request_id="err-req-9")
    assert "err-req-9" in info.value.message  # the id to quote when reporting the error
    records = captured.for_request("err-req-9")
    assert [r["logger"] for r in records] == ["seqsal.saliency", "seqsal.grpc", "seqsal.access"]
    assert "RuntimeError: kaboom" in records[1]["exc"] and records[2]["status"] == "INTERNAL"


async def test_sync_client_request_ids(srv: RunningSaliencyServer) -> None:
    """The blocking client too (run in a thread: the server runs on the test's event loop)."""

    def run() -> tuple[str | None, str | None]:
        with SaliencyClient(srv.address, token="wrong", tls=False) as client:
            with pytest.raises(UnauthenticatedError):
                client.tokenize("x", request_id="sync-1")
            first = client.last_request_id
            with pytest.raises(UnauthenticatedError):
                client.list_models()
            return first, client.last_request_id

    first, second = await asyncio.wait_for(asyncio.to_thread(run), 30)
    assert first == "sync-1" and second and second != "sync-1"


# --- tracing ---------------------------------------------------------------------------------------


async def test_tracing_spans_continue_the_callers_trace(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    tiny_llama_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from server_kit import grpc_server

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(grpc_server, "make_tracer", lambda settings, name: provider.get_tracer("test"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    settings = make_settings([f"tiny={tiny_llama_dir}"], tracing=True)
    async with run_saliency_server(settings) as running:
        client = AsyncSaliencyClient(
            running.address, token=TOKEN, tls=False, metadata=[("traceparent", parent)]
        )
        async with client:
            await client.tokenize("hello", request_id="span-1")
    (span,) = exporter.get_finished_spans()
    assert span.name == "seqsal.v1.SaliencyService/Tokenize"
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.attributes is not None
    assert (
        span.attributes["seqsal.request_id"] == "span-1" and span.attributes["rpc.grpc.status_code"] == "OK"
    )


# --- the served process ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_served_process_logs_json_and_serves_metrics(tiny_llama_dir: Path, tmp_path: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQSAL_") and k != "REDIS_URL"}
    env |= {
        "SEQSAL_AUTH_TOKENS": TOKEN,
        "SEQSAL_SHUTDOWN_GRACE_S": "5",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable, "-m", "seqsal_cli", "serve", "saliency", "--host", "0.0.0.0", "--port", str(port),
        "--model", f"tiny={tiny_llama_dir}", "--device", "cpu", "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:  # not a terminal: JSON by default
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not grpc_serving(address):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        with SaliencyClient(address, token=TOKEN, tls=False) as client:
            client.tokenize("hello", request_id="subprocess-1")
        with urllib.request.urlopen(f"http://0.0.0.0:{metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert 'seqsal_grpc_requests_total{code="OK",rpc="Tokenize"} 1.0' in text
        assert 'seqsal_model_load_seconds{model="tiny"}' in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert any("security: auth: bearer tokens (1 accepted); TLS: off; rate limit: off" in m for m in messages)
    assert any("listening on 0.0.0.0" in m for m in messages)
    assert any(m.startswith("saliency metrics on http://0.0.0.0:") for m in messages)
    assert any("signal received" in m for m in messages) and any("draining" in m for m in messages)
    (access,) = [r for r in records if r["logger"] == "seqsal.access"]
    assert access["request_id"] == "subprocess-1" and access["rpc"] == "Tokenize" and access["status"] == "OK"
    assert TOKEN not in log_path.read_text()
