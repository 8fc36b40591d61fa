"""The ``seqsal`` command line: serve, up, tokenize, saliency, verify, report, batch, models and model-path.

A thin layer over each component's settings (:mod:`seqsal.settings`): flags override the
``SEQSAL_*`` environment variables, which override the defaults.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from seqsal.errors import SeqsalError
from seqsal.settings import ClientSettings, SeqsalSettings
from seqsal.v1 import common_pb2
from server_kit.logging_setup import LogFormat, configure_json_logging, resolve_format
from server_kit.settings import ModelSettings, ServerSettings

app = typer.Typer(help="seqsal: interactive prompt debugging with sequence saliency.", no_args_is_help=True)
serve_app = typer.Typer(help="Run a seqsal server.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")

console = Console()
err_console = Console(stderr=True)


class MethodOption(StrEnum):
    grad_l2 = "grad_l2"
    grad_dot_input = "grad_dot_input"
    integrated_gradients = "integrated_gradients"
    occlusion = "occlusion"
    lime = "lime"


class GranularityOption(StrEnum):
    tokens = "tokens"
    words = "words"
    sentences = "sentences"
    lines = "lines"
    paragraphs = "paragraphs"
    custom_regex = "custom_regex"


class AggregateOption(StrEnum):
    sum = "sum"
    mean = "mean"


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    html = "html"


def _setup_logging(level: str, log_format: LogFormat = "text") -> None:
    """Rich text logs on stderr, or JSON lines (``log_format`` json, or auto off a terminal)."""
    if resolve_format(log_format) == "json":
        configure_json_logging(level)
        return
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
        force=True,
    )


#: Client security flags given before the command (``seqsal --token ... saliency ...``).
_client_flags: dict[str, Any] = {}

#: The environment variable of each client flag (for code that builds its own clients: batch).
_CLIENT_FLAG_ENV = {
    "auth_token": "SEQSAL_AUTH_TOKEN",
    "tls": "SEQSAL_TLS",
    "tls_ca_file": "SEQSAL_TLS_CA_FILE",
    "tls_client_cert_file": "SEQSAL_TLS_CLIENT_CERT_FILE",
    "tls_client_key_file": "SEQSAL_TLS_CLIENT_KEY_FILE",
    "tls_server_name": "SEQSAL_TLS_SERVER_NAME",
}


S = TypeVar("S", bound=SeqsalSettings)


def _settings(cls: type[S] = ClientSettings, **overrides: Any) -> S:  # type: ignore[assignment]
    """Settings of one component (``cls``): the global client flags and ``overrides`` that were given
    (None = not given), over ``SEQSAL_*`` and ``.env``."""
    values = _client_flags | overrides
    return cls(**{k: v for k, v in values.items() if v is not None and v != []})


@contextmanager
def _client_flags_in_environment() -> Iterator[None]:
    """Export the client flags as SEQSAL_* variables for the duration (then restore the environment)."""
    saved = {name: os.environ.get(name) for name in _CLIENT_FLAG_ENV.values()}
    try:
        for key, value in _client_flags.items():
            if value is not None:
                os.environ[_CLIENT_FLAG_ENV[key]] = str(int(value) if isinstance(value, bool) else value)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@app.callback()
def main(
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Bearer token for the servers (default: SEQSAL_AUTH_TOKEN).",
            show_default=False,
        ),
    ] = None,
    tls: Annotated[
        bool | None, typer.Option("--tls/--no-tls", help="Connect with TLS (default: SEQSAL_TLS).")
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA bundle (PEM) of the servers' certificates; implies --tls.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Client certificate (PEM) for mutual TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Private key (PEM) of --tls-cert.")] = None,
    tls_server_name: Annotated[
        str | None, typer.Option(help="Name to verify in the server certificate instead of the host.")
    ] = None,
) -> None:
    """seqsal: interactive prompt debugging with sequence saliency."""
    _client_flags.clear()
    _client_flags.update(
        auth_token=token,
        tls=tls,
        tls_ca_file=tls_ca,
        tls_client_cert_file=tls_cert,
        tls_client_key_file=tls_key,
        tls_server_name=tls_server_name,
    )


def _serve(
    what: str, run: Any, cls: type[ServerSettings], *, model: list[str] | None, **overrides: Any
) -> None:
    """Run a server's ``serve(settings)`` with the flags that were given (None = not given);
    configuration errors become one clear line and exit code 2."""
    from seqsal.tls import TlsConfigError
    from server_kit.auth import BindPolicyError

    unknown = set(overrides) - set(cls.model_fields)
    assert not unknown, f"flags without a setting of the same name in {cls.__name__}: {unknown}"
    settings = _settings(cls, models=model, **overrides)
    _setup_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings))
    except (BindPolicyError, TlsConfigError, FileNotFoundError) as error:
        err_console.print(f"[bold red]cannot start the {what} server[/]: {error}")
        raise typer.Exit(code=2) from None
    except SeqsalError as error:  # e.g. a --model that is neither a model directory nor a GGUF file
        err_console.print(f"[bold red]cannot start the {what} server[/]: {error.message}")
        raise typer.Exit(code=2) from None


def _fail(error: SeqsalError) -> None:
    where = f" (field: {error.field})" if error.field else ""
    err_console.print(f"[bold red]{error.code.name}[/]{where}: {error.message}")
    raise typer.Exit(code=2)


HostOption = Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")]
DtypeOption = Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16 (GPU).")]
ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server", "-s", help="Address of a running saliency server (host:port); none = in-process."
    ),
]
ModelOption = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="In-process: model to load, 'ID=PATH' or 'PATH' (repeatable; default SmolLM2); PATH is a "
        "model directory, a .gguf file (converted once into the data directory) or smollm2 / gemma3. "
        "With --server: the id of a model it hosts (default: its default model).",
    ),
]


FillerOption = Annotated[
    str, typer.Option(help="occlusion: replace each removed segment by this text (default: delete it).")
]
SamplesOption = Annotated[int, typer.Option(help="lime: random masks scored (0 = 64).")]
SeedOption = Annotated[int, typer.Option(help="lime masks and verify's random draws: the seed.")]


@serve_app.command("saliency")
def serve_saliency(
    host: HostOption = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 50051; 0 = any free).")] = None,
    model: ModelOption = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda:N.")] = None,
    dtype: DtypeOption = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens per request.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests computed at once.")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Requests waiting before RESOURCE_EXHAUSTED.")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL for a shared cache (or REDIS_URL).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (default 9101; 0 = off).")
    ] = None,
) -> None:
    """Serve SaliencyService over gRPC until SIGTERM/SIGINT (then drain in-flight calls)."""
    flags = dict(locals())  # each flag is the setting of the same name (--model: models)
    from saliency_server.server import serve
    from saliency_server.settings import SaliencySettings

    _serve("saliency", serve, SaliencySettings, **flags)


@serve_app.command("inference")
def serve_inference(
    host: HostOption = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 50052; 0 = any free).")] = None,
    model: ModelOption = None,
    backend: Annotated[
        str | None,
        typer.Option(help="vllm (default), transformers (no vLLM on this host), or openai (remote)."),
    ] = None,
    openai_url: Annotated[
        str | None, typer.Option(help="With --backend openai: e.g. http://host:8000/v1.")
    ] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="vLLM: GPUs per model.")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="vLLM: share of GPU memory.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM: context length.")] = None,
    dtype: DtypeOption = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (default 9102; 0 = off).")
    ] = None,
) -> None:
    """Serve InferenceService (generation and scoring) over gRPC until SIGTERM/SIGINT."""
    flags = dict(locals())  # each flag is the setting of the same name (--model: models)
    from inference_server.server import serve
    from inference_server.settings import InferenceSettings

    _serve("inference", serve, InferenceSettings, **flags)


@app.command()
def up(
    model: ModelOption = None,
    backend: Annotated[
        str | None, typer.Option(help="Inference backend: vllm, transformers or openai.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Saliency server port (default 50051).")] = None,
    inference_port: Annotated[int | None, typer.Option(help="Inference server port (default 50052).")] = None,
    ui_port: Annotated[int | None, typer.Option(help="UI port (default 8501).")] = None,
    log_dir: Annotated[Path, typer.Option(help="Where each component's log goes.")] = Path("logs"),
) -> None:
    """Run the whole product on this machine: cache, inference, saliency (and the UI); Ctrl-C stops it."""
    from inference_server.settings import InferenceSettings
    from saliency_server.settings import SaliencySettings
    from seqsal_cli.settings import StackSettings
    from seqsal_cli.stack import Stack, StackError

    saliency = _settings(SaliencySettings, models=model, port=port)
    inference = _settings(InferenceSettings, models=model, backend=backend, port=inference_port)
    own = _settings(StackSettings, ui_port=ui_port)
    _setup_logging(saliency.log_level)
    _prepare_models(saliency)
    stack = Stack(saliency, inference, log_dir=log_dir, console=err_console)
    try:
        stack.start(stack.plan(redis_port=own.stack_redis_port, ui_port=own.ui_port))
    except StackError as error:
        err_console.print(f"[bold red]could not start the stack[/]: {error}")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:  # Ctrl-C while starting: stop what already runs
        err_console.print("interrupted; stopping...")
        stack.stop()
        raise typer.Exit(code=130) from None
    err_console.print("[bold green]seqsal is up[/]; Ctrl-C stops it.")
    for component in stack.components:
        console.print(f"  {component.name:<24} {component.url}")
    try:
        code = stack.wait()
    finally:
        err_console.print("stopping...")
        stack.stop()
    raise typer.Exit(code=code)


def _prepare_models(settings: ModelSettings) -> None:
    """Convert GGUF models here, with their progress on this terminal, before the servers start."""
    from server_kit.model_registry import model_specs

    try:
        for spec in model_specs(settings):
            err_console.print(f"model [bold]{spec.id}[/]: {spec.path}")
    except SeqsalError as error:
        err_console.print(
            f"[bold red]could not start the stack[/]: no model for the inference and saliency servers: "
            f"{error.message}"
        )
        raise typer.Exit(code=1) from None


@app.command("model-path")
def model_path(
    source: Annotated[
        str | None,
        typer.Argument(help="A .gguf file, or smollm2 / gemma3 (default: the default model)."),
    ] = None,
) -> None:
    """Print a model's local directory, converting it from its GGUF file on first use."""
    from server_kit.default_model import ensure_default_model
    from server_kit.gguf_convert import ModelConversionError
    from server_kit.gguf_models import resolve_model_path

    settings = _settings(ModelSettings)
    _setup_logging(settings.log_level)
    try:
        print(resolve_model_path(source, settings) if source else ensure_default_model(settings))
    except ModelConversionError as error:
        err_console.print(f"[bold red]cannot prepare the model[/]: {error}")
        raise typer.Exit(code=2) from None


def _client(server: str | None, model: list[str] | None) -> Any:
    if server:
        from seqsal.client import SaliencyClient

        if model and len(model) > 1:
            raise typer.BadParameter("with --server, give at most one --model: the hosted model's id")
        return SaliencyClient(server, settings=_settings())
    from saliency_server.local import LocalSaliencyClient
    from saliency_server.settings import SaliencySettings

    settings = _settings(SaliencySettings, models=model)
    _setup_logging("WARNING")
    return LocalSaliencyClient(settings)


def _read_text(value: str | None, file: Path | None, name: str) -> str | None:
    if value is not None and file is not None:
        raise typer.BadParameter(f"give --{name} or --{name}-file, not both")
    if file is not None:
        return sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    return value


@app.command()
def tokenize(
    text: Annotated[str, typer.Argument(help="Text to tokenise.")],
    as_target: Annotated[bool, typer.Option(help="Tokenise as a target (no BOS).")] = False,
    server: ServerOption = None,
    model: ModelOption = None,
) -> None:
    """Show how a model tokenises a text (ids, pieces, char offsets)."""
    try:
        with _client(server, model) as client:
            response = client.tokenize(text, as_target=as_target)
    except SeqsalError as error:
        _fail(error)
    table = Table(
        "#", "id", "piece", "chars", "special", title=f"{len(response.tokens)} tokens ({response.model})"
    )
    for i, token in enumerate(response.tokens):
        table.add_row(
            str(i),
            str(token.id),
            repr(token.text),
            f"{token.start}-{token.end}",
            "yes" if token.special else "",
        )
    console.print(table)


@app.command()
def saliency(
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from a file ('-' = stdin).")
    ] = None,
    target: Annotated[str | None, typer.Option(help="Target text to explain.")] = None,
    target_file: Annotated[Path | None, typer.Option(help="Read the target from a file.")] = None,
    foil: Annotated[
        str | None, typer.Option(help="Contrastive foil: why the target rather than this?")
    ] = None,
    method: Annotated[list[MethodOption] | None, typer.Option(help="Method(s); repeatable.")] = None,
    granularity: Annotated[
        GranularityOption, typer.Option(help="Segment granularity.")
    ] = GranularityOption.words,
    regex: Annotated[str, typer.Option(help="With --granularity custom_regex: where segments start.")] = "",
    span: Annotated[
        list[str] | None, typer.Option(help="Explain only target chars START:END; repeatable. Default: all.")
    ] = None,
    ig_steps: Annotated[int, typer.Option(help="Integrated-gradients steps (0 = server default).")] = 0,
    filler: FillerOption = "",
    samples: SamplesOption = 0,
    seed: SeedOption = 0,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="Output format.")
    ] = OutputFormat.table,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write json/html here instead of stdout.")
    ] = None,
    intensity: Annotated[float, typer.Option(help="Colour intensity (>0).")] = 1.0,
    scale_all: Annotated[
        bool,
        typer.Option(
            help="Count the first token (attention sink) and special tokens in the colour range and in "
            "their segments' scores (default: left out, shown uncoloured)."
        ),
    ] = False,
    clip: Annotated[
        float | None, typer.Option(help="Colour range = this percentile of |score| (e.g. 99), not the max.")
    ] = None,
    aggregate: Annotated[
        AggregateOption, typer.Option(help="Segment score: sum over its tokens (the paper's) or mean.")
    ] = AggregateOption.sum,
    user_text: Annotated[
        str,
        typer.Option(
            help="With a chat-templated prompt: your own text inside it. The template around it (roles, "
            "its built-in system prompt) is then left out of the colour range."
        ),
    ] = "",
    server: ServerOption = None,
    model: ModelOption = None,
) -> None:
    """Explain which parts of a prompt made the model produce a target."""
    from seqsal import render
    from seqsal.scale import ScaleRules

    try:
        rules = ScaleRules(
            include_sink=scale_all,
            include_special=scale_all,
            clip_percentile=clip,
            aggregate=aggregate.value,
            include_template=not user_text,
            user_text=user_text,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error

    request = _saliency_request(
        prompt=_read_text(prompt, prompt_file, "prompt"),
        target=_read_text(target, target_file, "target"),
        span=span,
        methods=method or [],
        foil=foil,
        granularity=granularity,
        regex=regex,
        ig_steps=ig_steps,
        model=model[0].partition("=")[0] if server and model else "",
        filler=filler,
        samples=samples,
        seed=seed,
    )
    try:
        with _client(server, model) as client:
            response = client.saliency(request)
    except SeqsalError as error:
        _fail(error)
    if output_format is OutputFormat.table:
        for index in range(len(response.scores)):
            console.rule(render.method_name(response.scores[index].method))
            console.print(render.render_terminal(response, index, intensity=intensity, rules=rules))
        console.print(
            f"[dim]model {response.model} ({response.dtype}, {response.device}) · "
            f"log p(target) = {response.target_logprob:.3f} · {response.server_time_ms:.0f} ms"
            f"{' · cached' if response.cache_hit else ''}[/]"
        )
        return
    text = (
        render.render_json(response)
        if output_format is OutputFormat.json
        else render.render_html(response, intensity=intensity, rules=rules)
    )
    if out:
        out.write_text(text, encoding="utf-8")
        err_console.print(f"wrote {out}")
    else:
        sys.stdout.write(text + ("\n" if not text.endswith("\n") else ""))


def _saliency_request(
    *,
    prompt: str | None,
    target: str | None,
    span: list[str] | None,
    methods: list[MethodOption],
    foil: str | None,
    granularity: GranularityOption,
    regex: str,
    ig_steps: int,
    model: str,
    filler: str,
    samples: int,
    seed: int,
) -> Any:
    """The SaliencyRequest of the saliency and verify commands."""
    from seqsal.client import perturbation_options, saliency_request

    if not prompt or not target:
        raise typer.BadParameter(
            "both a prompt (--prompt/--prompt-file) and a target (--target/--target-file) are needed"
        )
    spans = []
    for item in span or []:
        start, _, end = item.partition(":")
        if not start.isdigit() or not end.isdigit():
            raise typer.BadParameter(f"--span {item!r} must be START:END char offsets into the target")
        spans.append((int(start), int(end)))
    return saliency_request(
        prompt=prompt,
        target=target,
        target_spans=spans,
        methods=[common_pb2.Method.Value(m.value.upper()) for m in methods],
        foil=foil,
        granularity=common_pb2.Granularity.Value(granularity.value.upper()),
        custom_regex=regex,
        ig_steps=ig_steps,
        model=model,
        perturbation=perturbation_options(filler=filler, samples=samples, seed=seed),
    )


@app.command()
def verify(
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from a file ('-' = stdin).")
    ] = None,
    target: Annotated[str | None, typer.Option(help="Target text whose explanation to check.")] = None,
    target_file: Annotated[Path | None, typer.Option(help="Read the target from a file.")] = None,
    foil: Annotated[str | None, typer.Option(help="Contrastive foil, as for saliency.")] = None,
    method: Annotated[MethodOption, typer.Option(help="The method whose explanation to check.")] = (
        MethodOption.grad_l2
    ),
    granularity: Annotated[
        GranularityOption, typer.Option(help="Segments ranked and removed.")
    ] = GranularityOption.sentences,
    regex: Annotated[str, typer.Option(help="With --granularity custom_regex: where segments start.")] = "",
    span: Annotated[list[str] | None, typer.Option(help="Explain only target chars START:END.")] = None,
    k: Annotated[
        list[int] | None, typer.Option("--k", help="Segments to remove; repeatable (1 2 3 5).")
    ] = None,
    draws: Annotated[int, typer.Option(help="Random draws per k (0 = 8).")] = 0,
    seed: SeedOption = 0,
    filler: FillerOption = "",
    samples: SamplesOption = 0,
    show_prompts: Annotated[bool, typer.Option(help="Print the prompt with the top-k removed.")] = False,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table (words) or json.")
    ] = OutputFormat.table,
    server: ServerOption = None,
    model: ModelOption = None,
) -> None:
    """Check an explanation: remove its most salient segments and k random ones, and compare."""
    from google.protobuf import json_format

    from seqsal.client import verify_request
    from seqsal.verification import describe_step, describe_sufficiency

    problem = _saliency_request(
        prompt=_read_text(prompt, prompt_file, "prompt"),
        target=_read_text(target, target_file, "target"),
        span=span,
        methods=[method],
        foil=foil,
        granularity=granularity,
        regex=regex,
        ig_steps=0,
        model=model[0].partition("=")[0] if server and model else "",
        filler=filler,
        samples=samples,
        seed=seed,
    )
    request = verify_request(problem=problem, k=k or [], random_draws=draws, seed=seed)
    try:
        with _client(server, model) as client:
            response = client.verify(request)
    except SeqsalError as error:
        _fail(error)
    if output_format is not OutputFormat.table:
        sys.stdout.write(json_format.MessageToJson(response, preserving_proto_field_name=True) + "\n")
        return
    granularity_value = response.saliency.granularity
    console.print(
        f"[bold]{method.value}[/] · log p(target) = {response.full_logprob:.2f} · "
        f"{response.removable_segments} removable segments"
    )
    for step in response.steps:
        console.print(f"  {describe_step(step, granularity_value)}")
        console.print(f"  [dim]{describe_sufficiency(step, response.full_logprob, granularity_value)}[/]")
        if show_prompts:
            console.print(step.ablated_prompt, markup=False, highlight=False)
    console.print(
        f"[dim]scored by {response.scored_by} · {response.perturbations} prompts · "
        f"{response.server_time_ms:.0f} ms[/]"
    )


@app.command()
def report(
    export: Annotated[Path, typer.Argument(help="A `seqsal batch --verify` output (JSONL).")],
    plot: Annotated[Path | None, typer.Option(help="Write a PNG plot of the drops against k here.")] = None,
) -> None:
    """Compare the methods' faithfulness over an export: mean drops of top-k vs random removal."""
    from seqsal_cli.report import plot as draw
    from seqsal_cli.report import read_export

    cells = read_export(export)
    if not cells:
        err_console.print(f"{export} has no verification: make it with `seqsal batch --verify`")
        raise typer.Exit(code=1)
    table = Table(
        "method",
        "k",
        "rows",
        "top-k drop",
        "random drop",
        "difference",
        "top-k > random",
        title="Faithfulness (drop in log p(target), nats; larger = the explanation found what matters)",
    )
    for cell in cells:
        table.add_row(
            cell.method,
            str(cell.k),
            str(cell.rows),
            f"{cell.topk_drop:.2f}",
            f"{cell.random_drop:.2f}",
            f"{cell.gain:+.2f}",
            f"{cell.wins:.0%}",
        )
    console.print(table)
    if plot is not None:
        draw(cells, plot)
        err_console.print(f"wrote {plot}")


@app.command()
def batch(
    input_path: Annotated[
        Path, typer.Argument(help='JSONL: one {"prompt", "target"?, "id"?, "foil"?} per line.')
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL to append results to (resumable).")],
    granularity: Annotated[
        GranularityOption, typer.Option(help="Segment granularity.")
    ] = GranularityOption.sentences,
    regex: Annotated[str, typer.Option(help="With --granularity custom_regex: where segments start.")] = "",
    method: Annotated[list[MethodOption] | None, typer.Option(help="Method(s); repeatable.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation length for rows without a target.")] = 128,
    chat_template: Annotated[bool, typer.Option(help="Generate with the model's chat template.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, help="Rows in flight at once.")] = 4,
    verify: Annotated[
        bool, typer.Option("--verify", help="Add each method's ablation test (Verify) to every row.")
    ] = False,
    saliency_server: Annotated[str | None, typer.Option(help="Saliency server host:port.")] = None,
    inference_server: Annotated[str | None, typer.Option(help="Inference server host:port.")] = None,
    model: Annotated[str, typer.Option(help="Model id on the servers (default: theirs).")] = "",
) -> None:
    """Explain every row of a JSONL file through the running services (generating missing targets)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from seqsal_cli.batch import BatchOptions, run_batch

    settings = _settings()
    options = BatchOptions(
        methods=[common_pb2.Method.Value(m.value.upper()) for m in method or []],
        granularity=common_pb2.Granularity.Value(granularity.value.upper()),
        custom_regex=regex,
        max_new_tokens=max_new_tokens,
        use_chat_template=chat_template,
        model=model,
        concurrency=concurrency,
        verify=verify,
    )
    with (
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
        ) as progress,
        _client_flags_in_environment(),
    ):  # fmt: skip  (batch builds its own clients)
        task = progress.add_task("explaining", total=None)
        try:
            written, failed, skipped = asyncio.run(
                run_batch(
                    input_path,
                    out,
                    options,
                    saliency_address=saliency_server or settings.saliency_address,
                    inference_address=inference_server or settings.inference_address,
                    on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                )
            )
        except SeqsalError as error:
            _fail(error)
    err_console.print(f"wrote {written} rows to {out} ({failed} with errors); skipped {skipped} already done")
    if failed:
        raise typer.Exit(code=1)


@app.command()
def models(server: ServerOption = None, model: ModelOption = None) -> None:
    """List the models a server (or the in-process service) hosts."""
    try:
        with _client(server, model) as client:
            response = client.list_models()
    except SeqsalError as error:
        _fail(error)
    table = Table("id", "architecture", "max tokens", "dtype", "device", "revision")
    for info in response.models:
        table.add_row(
            info.id + (" (default)" if info.is_default else ""),
            info.architecture,
            str(info.max_tokens),
            info.dtype,
            info.device,
            info.revision,
        )
    console.print(table)


if __name__ == "__main__":
    app()
