"""Security of both gRPC servers: bearer tokens, the bind rule, TLS and mutual TLS, and the limits.

Real servers on free ports with tiny models. Certificates (a CA, a server certificate for
localhost/127.0.0.1, a client certificate, and a client certificate from an unknown CA) are
made in the test with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from inference_server.server import SERVICE as INFERENCE_SERVICE
from inference_server.settings import InferenceSettings
from saliency_server.server import SERVICE as SALIENCY_SERVICE
from saliency_server.settings import SaliencySettings
from seqsal.client import AsyncInferenceClient, AsyncSaliencyClient, error_from_rpc
from seqsal.errors import ResourceExhaustedError, UnauthenticatedError, UnavailableError
from seqsal.tls import ClientTLS, TlsConfigError
from seqsal.v1 import common_pb2
from seqsal_cli.cli import app
from seqsal_cli.stack import grpc_serving
from server_kit.admission import Admission
from server_kit.auth import BindPolicyError, TokenAuth, is_loopback
from server_kit.grpc_server import GrpcServer
from server_kit.ratelimit import RateLimited, RateLimiter
from server_kit.server_tls import server_credentials

if TYPE_CHECKING:
    from conftest import RunningInferenceServer, RunningSaliencyServer

TOKEN = "tok-alpha-0123456789"
OTHER_TOKEN = "tok-bravo-9876543210"
WRONG_TOKEN = "tok-wrong-5555555555"

AnyClient = AsyncSaliencyClient | AsyncInferenceClient


S = TypeVar("S", SaliencySettings, InferenceSettings)


def make_settings(models: list[str], *, cls: type[S] = SaliencySettings, **overrides: Any) -> S:  # type: ignore[assignment]
    """Test settings: CPU, float32, transformers, no Redis, no metrics port, nothing from .env."""
    values: dict[str, Any] = {
        "models": models,
        "device": "cpu",
        "dtype": "float32",
        "redis_url": None,
        "backend": "transformers",
        "metrics_port": 0,
        "auth_tokens": [],
        "auth_token_file": None,
        "rate_limit_per_minute": 0,
    }
    values.update(overrides)
    return cls(_env_file=None, **values)  # type: ignore[call-arg]


# --- certificates ----------------------------------------------------------------------------------


@dataclass
class Pki:
    """PEM files: a CA, a server certificate it signed, a client certificate it signed, and a
    client certificate signed by another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, *, server: bool
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("seqsal test CA")
    rogue_ca_key, rogue_ca_cert = _ca("someone else's CA")
    files: dict[str, bytes] = {"ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM)}
    files["server.pem"], files["server.key"] = _leaf(ca_key, ca_cert, "seqsal server", server=True)
    files["client.pem"], files["client.key"] = _leaf(ca_key, ca_cert, "seqsal client", server=False)
    files["rogue.pem"], files["rogue.key"] = _leaf(rogue_ca_key, rogue_ca_cert, "intruder", server=False)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return Pki(
        ca=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        client_cert=root / "client.pem",
        client_key=root / "client.key",
        rogue_cert=root / "rogue.pem",
        rogue_key=root / "rogue.key",
    )


# --- servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saliency_models(tiny_llama_dir: Path) -> list[str]:
    return [f"tiny={tiny_llama_dir}"]


@pytest.fixture(scope="module")
def inference_models(tiny_chat_llama_dir: Path) -> list[str]:
    return [f"tiny={tiny_chat_llama_dir}"]


@pytest.fixture(scope="module")
async def secured_saliency(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    saliency_models: list[str],
) -> AsyncIterator[RunningSaliencyServer]:
    settings = make_settings(saliency_models, auth_tokens=[TOKEN, OTHER_TOKEN])
    async with run_saliency_server(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
async def secured_inference(
    run_inference_server: Callable[[InferenceSettings], AbstractAsyncContextManager[RunningInferenceServer]],
    inference_models: list[str],
) -> AsyncIterator[RunningInferenceServer]:
    settings = make_settings(inference_models, cls=InferenceSettings, auth_tokens=[TOKEN, OTHER_TOKEN])
    async with run_inference_server(settings) as srv:
        yield srv


@dataclass
class Target:
    """One secured server and how to call it."""

    address: str
    service: str
    client_class: type[AnyClient]
    call: Callable[[Any], Any]  # the main unary RPC
    stream: Callable[[Any], Any]  # the server-streaming RPC


async def _saliency_call(client: AsyncSaliencyClient) -> None:
    response = await client.saliency(prompt="Auth check: hello.", target=" Hi.")
    assert response.scores


async def _saliency_stream(client: AsyncSaliencyClient) -> None:
    messages = [
        m
        async for m in client.saliency_all_segments(
            prompt="Hi.", target=" A. B.", granularity=common_pb2.SENTENCES
        )
    ]
    assert messages


async def _generate_call(client: AsyncInferenceClient) -> None:
    response = await client.generate(prompt="The cat", max_tokens=3)
    assert response.candidates


async def _generate_stream(client: AsyncInferenceClient) -> None:
    assert [m async for m in client.generate_stream(prompt="The cat", max_tokens=3)]


@pytest.fixture(params=["saliency", "inference"])
def target(
    request: pytest.FixtureRequest,
    secured_saliency: RunningSaliencyServer,
    secured_inference: RunningInferenceServer,
) -> Target:
    if request.param == "saliency":
        return Target(
            secured_saliency.address,
            SALIENCY_SERVICE.full_name,
            AsyncSaliencyClient,
            _saliency_call,
            _saliency_stream,
        )
    return Target(
        secured_inference.address,
        INFERENCE_SERVICE.full_name,
        AsyncInferenceClient,
        _generate_call,
        _generate_stream,
    )


# --- authentication --------------------------------------------------------------------------------


async def test_no_token_is_unauthenticated(target: Target) -> None:
    async with target.client_class(target.address, token="", tls=False) as client:
        for call in (target.call, target.stream, lambda c: c.list_models(), lambda c: c.tokenize("hi")):
            with pytest.raises(UnauthenticatedError) as info:
                await call(client)
            assert "bearer token" in info.value.message


async def test_wrong_token_is_unauthenticated_and_not_echoed(target: Target) -> None:
    async with target.client_class(target.address, token=WRONG_TOKEN, tls=False) as client:
        for call in (target.call, target.stream):
            with pytest.raises(UnauthenticatedError) as info:
                await call(client)
            assert "not accepted" in info.value.message
            assert WRONG_TOKEN not in info.value.message and TOKEN not in info.value.message


async def test_malformed_authorization_is_unauthenticated(target: Target) -> None:
    async with grpc.aio.insecure_channel(target.address) as channel:
        list_models = channel.unary_unary(
            f"/{target.service}/ListModels",
            request_serializer=common_pb2.ListModelsRequest.SerializeToString,
            response_deserializer=common_pb2.ListModelsResponse.FromString,
        )
        for value in (f"Basic {TOKEN}", "Bearer ", TOKEN):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await list_models(
                    common_pb2.ListModelsRequest(), metadata=(("authorization", value),), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
            assert TOKEN not in (info.value.details() or "")


async def test_right_tokens_are_accepted(target: Target) -> None:
    for token in (TOKEN, OTHER_TOKEN):
        async with target.client_class(target.address, token=token, tls=False) as client:
            await target.call(client)
            await target.stream(client)
            assert (await client.list_models()).models[0].id == "tiny"


async def test_token_comes_from_the_environment(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `seqsal batch` and the UI rely on: a client built with just an address uses SEQSAL_AUTH_TOKEN."""
    monkeypatch.setenv("SEQSAL_AUTH_TOKEN", OTHER_TOKEN)
    async with target.client_class(target.address) as client:
        await target.call(client)


async def test_health_and_reflection_need_no_token(target: Target) -> None:
    async with grpc.aio.insecure_channel(target.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", target.service):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [
            r
            async for r in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        ]
    assert target.service in {s.name for s in replies[0].list_services_response.service}
    assert await asyncio.to_thread(grpc_serving, target.address)  # the stack's readiness probe, too


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# team tokens\n{TOKEN}\n\n  {OTHER_TOKEN}  # ci\n")
    auth = TokenAuth(["static-token"], path, reload_interval_s=0.0)
    assert auth.count == 3
    assert auth.matches(TOKEN) and auth.matches(OTHER_TOKEN) and auth.matches("static-token")
    assert not auth.matches(WRONG_TOKEN) and not auth.matches("# team tokens") and not auth.matches("")
    path.write_text(f"{WRONG_TOKEN}\n")
    assert auth.matches(WRONG_TOKEN) and not auth.matches(TOKEN)
    path.unlink()  # a vanished file keeps the tokens read before
    assert auth.matches(WRONG_TOKEN) and auth.matches("static-token")
    with pytest.raises(FileNotFoundError, match="SEQSAL_AUTH_TOKEN_FILE"):
        TokenAuth([], tmp_path / "missing")


def test_settings_read_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEQSAL_AUTH_TOKENS", f"{TOKEN}, {OTHER_TOKEN},")
    monkeypatch.setenv("SEQSAL_AUTH_TOKEN", TOKEN)
    settings = SaliencySettings(_env_file=None)  # type: ignore[call-arg]
    assert [t.get_secret_value() for t in settings.auth_tokens] == [TOKEN, OTHER_TOKEN]
    assert TOKEN not in repr(settings)  # secrets stay out of logs
    auth = TokenAuth.from_settings(settings)
    assert auth is not None and auth.matches(OTHER_TOKEN)
    monkeypatch.setenv("SEQSAL_AUTH_TOKENS", "")
    assert TokenAuth.from_settings(SaliencySettings(_env_file=None)) is None  # type: ignore[call-arg]


# --- where an open server may listen ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_open_server_refuses_a_public_address() -> None:
    server = GrpcServer(make_settings([]), [SALIENCY_SERVICE], name="saliency")
    with pytest.raises(BindPolicyError) as info:
        server.bind("0.0.0.0", 0)
    message = str(info.value)
    assert (
        "0.0.0.0" in message and "SEQSAL_AUTH_TOKENS" in message and "SEQSAL_ALLOW_UNAUTHENTICATED" in message
    )
    assert server.bind("127.0.0.1", 0) > 0  # loopback is fine
    await server.server.stop(None)


@pytest.mark.parametrize(
    "overrides", [{"allow_unauthenticated": True}, {"auth_tokens": [TOKEN]}], ids=["override", "with-token"]
)
async def test_public_address_allowed_with_override_or_token(overrides: dict[str, Any]) -> None:
    server = GrpcServer(make_settings([], **overrides), [SALIENCY_SERVICE], name="saliency")
    assert server.bind("0.0.0.0", 0) > 0
    summary = server.security_summary()
    assert ("NONE" in summary) if "allow_unauthenticated" in overrides else ("1 accepted" in summary)
    await server.server.stop(None)


def test_cli_refuses_before_loading_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SEQSAL_AUTH_TOKENS", "SEQSAL_AUTH_TOKEN_FILE", "SEQSAL_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    for server in ("saliency", "inference"):
        args = ["serve", server, "--host", "0.0.0.0", "--port", "0", "--model", f"x={tmp_path / 'nothing'}"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "refusing to listen on '0.0.0.0' without authentication" in " ".join(result.output.split())


# --- TLS and mutual TLS ----------------------------------------------------------------------------


async def test_tls(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    saliency_models: list[str],
    pki: Pki,
) -> None:
    settings = make_settings(saliency_models, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    async with run_saliency_server(settings) as srv:
        assert "TLS: tls" in srv.server.security_summary()
        for address in (srv.address, f"localhost:{srv.port}"):
            async with AsyncSaliencyClient(
                address, token="", tls=ClientTLS(ca_file=pki.ca), timeout=10
            ) as client:
                await _saliency_call(client)
        async with AsyncSaliencyClient(
            srv.address, token="", tls=ClientTLS(ca_file=pki.ca, server_name="localhost"), timeout=10
        ) as client:
            assert (await client.list_models()).models
        # plaintext to a TLS server, and TLS that does not trust its CA (system roots): refused
        for tls in (ClientTLS(enabled=False), ClientTLS()):
            async with AsyncSaliencyClient(srv.address, token="", tls=tls, timeout=5) as client:
                with pytest.raises(UnavailableError):
                    await client.list_models()
        assert await asyncio.to_thread(grpc_serving, srv.address, tls=ClientTLS(ca_file=pki.ca))
        assert not await asyncio.to_thread(grpc_serving, srv.address)


async def test_mutual_tls_with_token_on_the_inference_server(
    run_inference_server: Callable[[InferenceSettings], AbstractAsyncContextManager[RunningInferenceServer]],
    inference_models: list[str],
    pki: Pki,
) -> None:
    settings = make_settings(
        inference_models,
        cls=InferenceSettings,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
        auth_tokens=[TOKEN],
    )
    async with run_inference_server(settings) as srv:
        assert "TLS: mutual" in srv.server.security_summary()
        good = ClientTLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        async with AsyncInferenceClient(srv.address, token=TOKEN, tls=good, timeout=10) as client:
            await _generate_call(client)
            await _generate_stream(client)
        async with AsyncInferenceClient(srv.address, token="", tls=good, timeout=10) as client:
            with pytest.raises(UnauthenticatedError):  # mTLS does not replace the token
                await client.list_models()
        no_cert = ClientTLS(ca_file=pki.ca)
        rogue = ClientTLS(ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key)
        for tls in (no_cert, rogue):
            async with AsyncInferenceClient(srv.address, token=TOKEN, tls=tls, timeout=5) as client:
                with pytest.raises(UnavailableError):
                    await client.list_models()
        # health is open, but the handshake is not
        assert await asyncio.to_thread(grpc_serving, srv.address, tls=good)
        assert not await asyncio.to_thread(grpc_serving, srv.address, tls=no_cert)


async def test_mutual_tls_on_the_saliency_server_through_the_cli(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    saliency_models: list[str],
    pki: Pki,
) -> None:
    settings = make_settings(
        saliency_models,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca,
        auth_tokens=[TOKEN],
    )
    runner = CliRunner()
    async with run_saliency_server(settings) as srv:
        base = ["--tls-ca", str(pki.ca)]
        cert = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
        command = ["models", "--server", f"localhost:{srv.port}"]
        ok = await asyncio.to_thread(runner.invoke, app, ["--token", TOKEN, *base, *cert, *command])
        assert ok.exit_code == 0, ok.output
        assert "tiny" in ok.output
        no_token = await asyncio.to_thread(runner.invoke, app, ["--token", "", *base, *cert, *command])
        assert no_token.exit_code == 2 and "UNAUTHENTICATED" in no_token.output
        no_cert = await asyncio.to_thread(runner.invoke, app, ["--token", TOKEN, *base, *command])
        assert no_cert.exit_code == 2 and "UNAVAILABLE" in no_cert.output


def test_half_configured_tls_is_a_clear_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="both"):
        server_credentials(make_settings([], tls_cert_file=pki.server_cert))
    with pytest.raises(TlsConfigError, match="needs"):
        server_credentials(make_settings([], tls_client_ca_file=pki.ca))
    with pytest.raises(TlsConfigError, match="cannot read"):
        server_credentials(make_settings([], tls_cert_file=tmp_path / "no.pem", tls_key_file=pki.server_key))
    with pytest.raises(TlsConfigError, match="key"):
        ClientTLS(cert_file=pki.client_cert).credentials()


# --- limits ----------------------------------------------------------------------------------------


def test_rate_limiter_refills_over_the_minute() -> None:
    now = [1000.0]
    limiter = RateLimiter(6, clock=lambda: now[0])  # 6 a minute: one every 10 s
    for _ in range(6):
        limiter.acquire("a")
    with pytest.raises(RateLimited) as info:
        limiter.acquire("a")
    assert info.value.retry_after_s == pytest.approx(10.0)
    limiter.acquire("b")  # another caller has its own bucket
    now[0] += 9.0
    with pytest.raises(RateLimited) as info:
        limiter.acquire("a")
    assert info.value.retry_after_s == pytest.approx(1.0)
    now[0] += 1.0
    limiter.acquire("a")
    now[0] += 3600.0  # a full bucket holds no more than a minute's worth
    for _ in range(6):
        limiter.acquire("a")
    with pytest.raises(RateLimited):
        limiter.acquire("a")


async def test_rate_limit_per_token(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    saliency_models: list[str],
) -> None:
    limit = 3
    settings = make_settings(saliency_models, auth_tokens=[TOKEN, OTHER_TOKEN], rate_limit_per_minute=limit)
    async with run_saliency_server(settings) as srv:
        async with AsyncSaliencyClient(srv.address, token=TOKEN, tls=False) as client:
            for _ in range(limit):
                await client.list_models()
            with pytest.raises(ResourceExhaustedError) as info:
                await client.tokenize("one too many")
            assert "3 requests per minute" in info.value.message and "retry in" in info.value.message
        async with AsyncSaliencyClient(srv.address, token=OTHER_TOKEN, tls=False) as other:
            for _ in range(limit):
                await other.list_models()  # unaffected by the first token's use
        async with AsyncSaliencyClient(srv.address, token=WRONG_TOKEN, tls=False) as intruder:
            with pytest.raises(UnauthenticatedError):  # authentication comes first
                await intruder.list_models()
        # the standard retry hint: a google.rpc.RetryInfo detail
        async with grpc.aio.insecure_channel(srv.address) as channel:
            list_models = channel.unary_unary(
                f"/{SALIENCY_SERVICE.full_name}/ListModels",
                request_serializer=common_pb2.ListModelsRequest.SerializeToString,
                response_deserializer=common_pb2.ListModelsResponse.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await list_models(
                    common_pb2.ListModelsRequest(),
                    metadata=(("authorization", f"Bearer {TOKEN}"),),
                    timeout=5,
                )
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = dict(raw.value.trailing_metadata() or ())["grpc-status-details-bin"]
        retry = error_details_pb2.RetryInfo()
        assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
        assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 60 / limit
        assert isinstance(error_from_rpc(raw.value), ResourceExhaustedError)
        # health is never rate limited
        for _ in range(limit + 1):
            assert await asyncio.to_thread(grpc_serving, srv.address)


async def test_rate_limit_without_auth_is_per_client_address(
    run_saliency_server: Callable[[SaliencySettings], AbstractAsyncContextManager[RunningSaliencyServer]],
    saliency_models: list[str],
) -> None:
    settings = make_settings(saliency_models, rate_limit_per_minute=2)
    async with run_saliency_server(settings) as srv:
        for _ in range(2):  # a new connection (new port) each time: still the same caller
            async with AsyncSaliencyClient(srv.address, token="", tls=False) as client:
                await client.list_models()
        async with AsyncSaliencyClient(srv.address, token="", tls=False) as client:
            with pytest.raises(ResourceExhaustedError):
                await client.list_models()
            for _ in range(3):  # what clients poll while they wait is not counted
                assert list((await client.get_request_status("some-call")).calls) == []


def test_in_flight_limit() -> None:
    limit = Admission(2, "SEQSAL_X")
    with limit.hold(), limit.hold():
        assert limit.depth == 2
        with pytest.raises(ResourceExhaustedError, match="SEQSAL_X"), limit.hold():
            pass
    assert limit.depth == 0


async def test_inference_requests_in_flight_are_bounded(
    run_inference_server: Callable[[InferenceSettings], AbstractAsyncContextManager[RunningInferenceServer]],
    inference_models: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(inference_models, cls=InferenceSettings, max_concurrency=1)
    async with run_inference_server(settings) as srv:
        backend = srv.serving.default.backend
        real_generate = backend.generate
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow_generate(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await release.wait()
            return await real_generate(*args, **kwargs)

        monkeypatch.setattr(backend, "generate", slow_generate)
        async with AsyncInferenceClient(srv.address, token="", tls=False, timeout=30) as client:
            first = asyncio.create_task(client.generate(prompt="The cat", max_tokens=2))
            await asyncio.wait_for(entered.wait(), 10)
            with pytest.raises(ResourceExhaustedError, match="SEQSAL_INFERENCE_MAX_CONCURRENCY"):
                await client.generate(prompt="The dog", max_tokens=2)
            assert (await client.tokenize("not limited")).tokens  # only generation calls count
            release.set()
            assert (await first).candidates
            assert (await client.generate(prompt="The dog", max_tokens=2)).candidates
        assert srv.serving.inflight.depth == 0


# --- the token and certificates travel with the CLI's batch and with `seqsal up` ---------------------


async def test_batch_cli_sends_the_token(
    secured_saliency: RunningSaliencyServer,
    secured_inference: RunningInferenceServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SEQSAL_AUTH_TOKEN", raising=False)
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "The cat sat on the"}\n')
    out = tmp_path / "out.jsonl"
    args = [
        "batch", str(source), "--out", str(out), "--saliency-server", secured_saliency.address,
        "--inference-server", secured_inference.address, "--max-new-tokens", "3",
    ]  # fmt: skip
    refused = await asyncio.to_thread(CliRunner().invoke, app, args)
    assert refused.exit_code == 1 and "UNAUTHENTICATED" in out.read_text()
    out.unlink()
    result = await asyncio.to_thread(CliRunner().invoke, app, ["--token", TOKEN, *args])
    assert result.exit_code == 0, result.output + out.read_text()
    assert "saliency" in json.loads(out.read_text())
    assert "SEQSAL_AUTH_TOKEN" not in os.environ  # the flag was exported for the batch only


def test_stack_passes_tokens_and_tls_to_its_children(pki: Pki, tmp_path: Path) -> None:
    from seqsal_cli.stack import UI_APP, Stack

    settings = make_settings(
        ["tiny=/models/tiny"],
        auth_tokens=[TOKEN, OTHER_TOKEN],
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
    )
    components = {
        c.name.split()[0]: c
        for c in Stack(settings, InferenceSettings(), log_dir=tmp_path).plan(redis_port=1, ui_port=2)
    }
    for name in ("inference", "saliency"):
        assert components[name].env["SEQSAL_AUTH_TOKENS"] == f"{TOKEN},{OTHER_TOKEN}"
        assert components[name].url.startswith("grpcs://")
    assert "SEQSAL_AUTH_TOKEN" not in components["inference"].env
    # the saliency server calls the inference server's Score (OCCLUSION, LIME, Verify) as a client
    saliency = components["saliency"].env
    assert saliency["SEQSAL_AUTH_TOKEN"] == TOKEN and saliency["SEQSAL_TLS_CA_FILE"] == str(pki.server_cert)
    assert saliency["SEQSAL_SCORE_ADDRESS"].endswith(str(InferenceSettings().port))
    if UI_APP.exists():
        ui = components["ui"].env
        assert ui["SEQSAL_AUTH_TOKEN"] == TOKEN and "SEQSAL_AUTH_TOKENS" not in ui
        assert ui["SEQSAL_TLS"] == "1" and ui["SEQSAL_TLS_CA_FILE"] == str(pki.server_cert)
    plain = Stack(make_settings(["tiny=/models/tiny"]), InferenceSettings(), log_dir=tmp_path).plan(
        redis_port=1, ui_port=2
    )
    assert not any(k.startswith(("SEQSAL_AUTH", "SEQSAL_TLS")) for c in plain for k in c.env)
