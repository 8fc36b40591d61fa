"""The tiny test models load like real local model directories and tokenize like their families."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, STYLES, build_tiny_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Héllo wörld 🙂 -- two  spaces,\nand a new line.",
    "Question: What is 2+2? Answer: 4",
]
EXPECTED_BOS = {"gpt2": None, "llama": "<s>", "mistral": "<s>", "gemma": "<bos>", "qwen2": None}
EXPECTED_MODEL_TYPE = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "mistral",
    "gemma": "gemma",
    "qwen2": "qwen2",
}


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[object, object]]:
    return {
        arch: (AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path))
        for arch, path in tiny_model_dirs.items()
    }


def test_every_architecture_is_built(tiny_model_dirs: dict[str, Path]) -> None:
    assert tuple(tiny_model_dirs) == ARCHITECTURES
    for path in tiny_model_dirs.values():
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_loads_back(arch: str, loaded: dict, tiny_model_dirs: dict[str, Path]) -> None:
    tokenizer, model = loaded[arch]
    assert model.config.model_type == EXPECTED_MODEL_TYPE[arch]
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert json.loads((tiny_model_dirs[arch] / "config.json").read_text())["model_type"] == arch
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # not a degenerate near-uniform model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokenizer_is_fast_with_special_tokens(arch: str, loaded: dict) -> None:
    tokenizer, _ = loaded[arch]
    assert tokenizer.is_fast
    assert tokenizer.eos_token is not None
    assert tokenizer.pad_token is not None
    style = STYLES[arch]
    assert tokenizer.eos_token == style.eos
    assert tokenizer.bos_token == style.bos
    if style.bos is not None:
        assert tokenizer.convert_tokens_to_ids(style.bos) == tokenizer.bos_token_id


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_with_offsets(arch: str, text: str, loaded: dict) -> None:
    tokenizer, _ = loaded[arch]
    encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets, special = encoded["input_ids"], encoded["offset_mapping"], encoded["special_tokens_mask"]
    assert len(offsets) == len(ids)
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids  # bytes, never <unk>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    content = [
        (start, end) for (start, end), is_special in zip(offsets, special, strict=True) if not is_special
    ]
    assert all(offsets[i] == (0, 0) for i, is_special in enumerate(special) if is_special)
    assert all(0 <= start < end <= len(text) for start, end in content)
    assert [start for start, _ in content] == sorted(start for start, _ in content)
    # Pieces of one character (a multi-byte one split in bytes) share its span; the distinct spans
    # tile the text exactly.
    spans = list(dict.fromkeys(content))
    assert "".join(text[start:end] for start, end in spans) == text
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bos_behaviour(arch: str, loaded: dict) -> None:
    tokenizer, _ = loaded[arch]
    ids = tokenizer(TEXTS[0])["input_ids"]
    plain = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    bos = EXPECTED_BOS[arch]
    if bos is None:
        assert ids == plain
        assert ids[0] != tokenizer.eos_token_id
    else:
        assert ids == [tokenizer.convert_tokens_to_ids(bos), *plain]
        assert tokenizer.convert_ids_to_tokens(ids[0]) == bos
    assert ids[-1] != tokenizer.eos_token_id  # nothing appended


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loaded_tokenizer_matches_tokenizer_json(
    arch: str, loaded: dict, tiny_model_dirs: dict[str, Path]
) -> None:
    # transformers may rebuild the pipeline from the vocabulary (it does for qwen2): it must agree.
    tokenizer, _ = loaded[arch]
    raw = Tokenizer.from_file(str(tiny_model_dirs[arch] / "tokenizer.json"))
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == raw.encode(text).ids


def test_metaspace_and_byte_level_pieces(loaded: dict) -> None:
    llama, _ = loaded["llama"]
    gpt2, _ = loaded["gpt2"]
    gemma, _ = loaded["gemma"]
    assert llama.tokenize("the capital")[0].startswith("▁")
    assert not gemma.tokenize("the capital")[0].startswith("▁")  # Gemma prepends no space
    assert gemma.tokenize("the capital")[-1].startswith("▁")
    assert gpt2.tokenize("the capital")[-1].startswith("Ġ")


def test_build_is_deterministic(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    for arch in ("gpt2", "llama"):
        again = build_tiny_model(arch, tmp_path / arch)
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (again / name).read_bytes() == (tiny_model_dirs[arch] / name).read_bytes(), (arch, name)


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_model("qwen2", tmp_path / "qwen2")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        build_tiny_model("bert", tmp_path)
