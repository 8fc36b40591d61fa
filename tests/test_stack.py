"""`seqsal up`: the whole stack as child processes, healthy in order, stopped together."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from seqsal.client import InferenceClient, SaliencyClient
from seqsal_cli.stack import grpc_serving, redis_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_up_starts_everything_and_stops_it(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    saliency_port, inference_port, redis_port, ui_port = free_port(), free_port(), free_port(), free_port()
    env = os.environ | {
        "SEQSAL_STACK_REDIS_PORT": str(redis_port),
        "SEQSAL_SHUTDOWN_GRACE_S": "5",
    }
    env.pop("REDIS_URL", None)
    command = [
        sys.executable, "-m", "seqsal_cli", "up", "--backend", "transformers",
        "--model", f"tiny={tiny_chat_llama_dir}", "--port", str(saliency_port),
        "--inference-port", str(inference_port), "--ui-port", str(ui_port),
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 180
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "seqsal is up" in line:
                break
        assert any("seqsal is up" in line for line in lines), "".join(lines)
        assert grpc_serving(f"127.0.0.1:{saliency_port}") and grpc_serving(f"127.0.0.1:{inference_port}")
        with_redis = shutil.which("redis-server") is not None
        assert redis_ready(f"redis://127.0.0.1:{redis_port}/0") == with_redis

        # the loop the product is for: generate, then explain exactly what was generated
        with InferenceClient(f"127.0.0.1:{inference_port}") as inference:
            generated = inference.generate(prompt="The cat sat on the", max_tokens=5)
        with SaliencyClient(f"127.0.0.1:{saliency_port}") as saliency:
            ids = list(generated.candidates[0].token_ids)
            first = saliency.saliency(prompt=generated.prompt, target_token_ids=ids)
            again = saliency.saliency(prompt=generated.prompt, target_token_ids=ids)
        assert [t.id for t in first.tokens] == list(generated.prompt_token_ids) + ids
        assert again.cache_hit
        if with_redis:
            import redis

            assert (
                redis.Redis(port=redis_port).dbsize() >= 2
            )  # the saliency server caches in the stack's Redis
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0
    assert not grpc_serving(f"127.0.0.1:{saliency_port}", timeout=0.5)
    assert not grpc_serving(f"127.0.0.1:{inference_port}", timeout=0.5)
    assert not redis_ready(f"redis://127.0.0.1:{redis_port}/0")


def test_up_reports_a_component_that_fails(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "seqsal_cli", "up", "--backend", "transformers", "--model", f"x={tmp_path}",
         "--log-dir", str(tmp_path / "logs"), "--port", str(free_port()),
         "--inference-port", str(free_port()), "--ui-port", str(free_port())],
        env=os.environ | {"SEQSAL_STACK_REDIS_PORT": str(free_port())},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "could not start the stack" in result.stderr and "inference" in result.stderr
    assert "config.json" in result.stderr  # the child's own error, from its log


def test_a_component_that_fails_is_restarted_with_backoff_and_the_rest_keep_running(tmp_path: Path) -> None:
    import threading

    from rich.console import Console

    from inference_server.settings import InferenceSettings
    from saliency_server.settings import SaliencySettings
    from seqsal_cli.stack import Component, Stack

    marker = tmp_path / "starts"
    # fails at once the first two times it starts, then stays up
    flaky = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
        "n = len(p.read_text()) if p.exists() else 0; "
        "p.write_text('x' * (n + 1)); time.sleep(60 if n >= 2 else 0.1); sys.exit(3)"
    )
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    components = [
        Component("steady", sleep, ready=lambda: True, url="-"),
        Component("flaky", [sys.executable, "-c", flaky, str(marker)], ready=lambda: True, url="-"),
    ]
    output: list[str] = []
    console = Console(file=io.StringIO(), record=True, width=200)
    stack = Stack(
        SaliencySettings(_env_file=None),
        InferenceSettings(_env_file=None),
        log_dir=tmp_path / "logs",
        console=console,
    )  # type: ignore[call-arg]
    stack.backoff_s = 0.2
    stack.start(components)
    steady = components[0].process
    waiter = threading.Thread(target=lambda: output.append(str(stack.wait(poll_s=0.05))), daemon=True)
    waiter.start()
    try:
        deadline = time.monotonic() + 30
        while not (
            marker.exists()
            and len(marker.read_text()) >= 3
            and "ready again" in console.export_text(clear=False)
        ):
            assert time.monotonic() < deadline, console.export_text()
            time.sleep(0.05)
        assert steady is not None and steady.poll() is None and components[0].process is steady  # untouched
        assert components[1].process is not None and components[1].process.poll() is None  # up again
        text = console.export_text()
        # the backoff doubles with each failure in a row
        assert "flaky exited (3); restarting it in 0.2 s" in text and "restarting it in 0.4 s" in text
        assert components[1].failures == 2
    finally:
        stack.stopping.set()
        waiter.join(10)
        stack.stop(grace_s=5)
    assert output == ["0"]
    assert steady.poll() is not None
