"""The seqsal CLI, in-process on a tiny model and against a running server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saliency_server.settings import SaliencySettings
from seqsal_cli.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich tables wrap at the terminal width; make it wide so cells stay whole."""
    from seqsal_cli import cli

    monkeypatch.setattr(cli.console, "width", 200)


PROMPT = "Taste-likes: Cheese\nTaste-dislikes: <script>alert(1)</script> eggs\nAnalysis:"
TARGET = " A savoury tart. Not for you."


def _model_args(model_dir: Path) -> list[str]:
    return ["--model", f"tiny={model_dir}"]


def test_saliency_json_in_process(tiny_llama_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "saliency",
            "--prompt",
            PROMPT,
            "--target",
            TARGET,
            "--format",
            "json",
            "--granularity",
            "sentences",
            *_model_args(tiny_llama_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    parts = [t.get("part") for t in data["tokens"]]
    assert parts[0] == "PROMPT" and parts[-1] == "TARGET"
    assert [s["method"] for s in data["scores"]] == ["GRAD_L2", "GRAD_DOT_INPUT"]
    assert len(data["scores"][0]["scores"]) == len(data["tokens"])
    target_texts = [s["text"] for s in data["segments"] if s["part"] == "TARGET"]
    assert target_texts == [" A savoury tart.", " Not for you."]


def test_saliency_html_escapes_prompt(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "heatmap.html"
    result = runner.invoke(
        app,
        [
            "saliency",
            "--prompt",
            PROMPT,
            "--target",
            TARGET,
            "--format",
            "html",
            "--out",
            str(out),
            *_model_args(tiny_llama_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;" in page


def test_saliency_table_and_span(tiny_llama_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "saliency",
            "--prompt",
            PROMPT,
            "--target",
            TARGET,
            "--span",
            "0:5",
            "--method",
            "grad_l2",
            *_model_args(tiny_llama_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "GRAD_L2" in result.stdout and "log p(target)" in result.stdout


def test_bad_input_is_a_clear_error(tiny_llama_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "saliency",
            "--prompt",
            "x",
            "--target",
            "y",
            "--granularity",
            "custom_regex",
            "--regex",
            "((",
            *_model_args(tiny_llama_dir),
        ],
    )
    assert result.exit_code == 2
    assert "INVALID_ARGUMENT" in result.output and "custom_regex" in result.output and "((" in result.output


def test_tokenize_in_process(tiny_llama_dir: Path) -> None:
    result = runner.invoke(app, ["tokenize", "Hello world", *_model_args(tiny_llama_dir)])
    assert result.exit_code == 0, result.output
    assert "<s>" in result.stdout and "tokens (tiny)" in result.stdout


@pytest.fixture(scope="module")
def running_server(tiny_llama_dir: Path) -> Iterator[str]:
    """A real saliency server in a background thread."""
    from saliency_server.server import build_server, build_serving

    settings = SaliencySettings(models=[f"tiny={tiny_llama_dir}"], port=0)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def start() -> None:
        serving = build_serving(settings)
        server = build_server(serving, settings)
        holder["port"] = server.bind("127.0.0.1", 0)
        await server.start()
        holder["server"] = server
        ready.set()

    thread = threading.Thread(
        target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True
    )
    thread.start()
    assert ready.wait(60)
    yield f"127.0.0.1:{holder['port']}"
    server = holder["server"]
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_cli_against_server(running_server: str) -> None:
    result = runner.invoke(app, ["models", "--server", running_server])
    assert result.exit_code == 0, result.output
    assert "tiny (default)" in result.stdout and "LlamaForCausalLM" in result.stdout
    args = [
        "saliency",
        "--server",
        running_server,
        "--prompt",
        PROMPT,
        "--target",
        TARGET,
        "--format",
        "json",
    ]
    first = json.loads(runner.invoke(app, args).stdout)
    second = json.loads(runner.invoke(app, args).stdout)
    assert not first.get("cache_hit") and second["cache_hit"] is True
    assert first["scores"] == second["scores"]


def test_cli_server_unreachable() -> None:
    result = runner.invoke(app, ["models", "--server", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "UNAVAILABLE" in result.output


def test_saliency_scale_options(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The CLI applies the same scale rules as the UI: the first token is left out unless --scale-all."""
    pages = {}
    for name, extra in {"default": [], "all": ["--scale-all", "--clip", "99", "--aggregate", "mean"]}.items():
        out = tmp_path / f"{name}.html"
        args = ["saliency", "--prompt", "Hello there, friend.", "--target", " Hi.", "--format", "html"]
        result = runner.invoke(app, [*args, "--out", str(out), *extra, *_model_args(tiny_llama_dir)])
        assert result.exit_code == 0, result.output
        pages[name] = out.read_text()
    assert 'class="u p-prompt excl' in pages["default"] and "hatched" in pages["default"]
    assert " excl" not in pages["all"] and "99th percentile" in pages["all"]
    result = runner.invoke(
        app, ["saliency", "--prompt", "x", "--target", "y", "--clip", "0", *_model_args(tiny_llama_dir)]
    )
    assert result.exit_code == 2 and "clip_percentile" in result.output


def test_every_serve_flag_is_a_setting_of_its_server() -> None:
    """`seqsal serve X --flag` sets the setting of the same name (a flag without one would be lost)."""
    import inspect

    from inference_server.settings import InferenceSettings
    from saliency_server.settings import SaliencySettings
    from seqsal_cli.cli import serve_inference, serve_saliency

    for command, cls in ((serve_saliency, SaliencySettings), (serve_inference, InferenceSettings)):
        flags = set(inspect.signature(command).parameters) - {"model"}
        assert flags and flags <= set(cls.model_fields), flags - set(cls.model_fields)
