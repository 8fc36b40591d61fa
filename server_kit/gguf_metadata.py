"""What a GGUF file says about its tokenizer, and making a converted tokenizer say the same.

transformers rebuilds a tokenizer from a GGUF file's vocabulary but not all of its
settings: Gemma 3's file says ``tokenizer.ggml.add_bos_token = true``, yet the
tokenizer transformers returns adds no BOS, and Gemma without its BOS produces
garbage. :func:`read_tokenizer_metadata` reads the file's own keys (with the
``gguf`` package, never the weights); :func:`apply_tokenizer_metadata` sets the
special tokens, BOS/EOS insertion and chat template from them;
:func:`tokenizer_mismatches` lists what still differs (the conversion refuses a
tokenizer with any).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Special-token roles: (GGUF key suffix, transformers attribute).
SPECIAL_ROLES = (
    ("bos_token_id", "bos_token"),
    ("eos_token_id", "eos_token"),
    ("unknown_token_id", "unk_token"),
    ("padding_token_id", "pad_token"),
)
PROBE_TEXT = "Hello world"


@dataclass(frozen=True)
class TokenizerMetadata:
    """The tokenizer settings a GGUF file declares (None = the file does not say)."""

    model: str | None  # tokenizer.ggml.model: "llama" (SentencePiece), "gpt2" (BPE), ...
    special_ids: dict[str, int]  # transformers attribute (bos_token, ...) -> id
    add_bos: bool | None
    add_eos: bool | None
    chat_template: str | None


def read_tokenizer_metadata(gguf: Path) -> TokenizerMetadata:
    """Read the ``tokenizer.*`` keys of ``gguf``.

    Where the file does not say whether a BOS is added, llama.cpp adds one for
    SentencePiece vocabularies (``tokenizer.ggml.model = llama``); so does this.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    model = value("tokenizer.ggml.model")
    special_ids = {
        attribute: int(found)
        for suffix, attribute in SPECIAL_ROLES
        if (found := value(f"tokenizer.ggml.{suffix}")) is not None
    }
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is None and model == "llama":
        add_bos = True
    add_eos = value("tokenizer.ggml.add_eos_token")
    template = value("tokenizer.chat_template")
    return TokenizerMetadata(
        model=str(model) if model is not None else None,
        special_ids=special_ids,
        add_bos=None if add_bos is None else bool(add_bos),
        add_eos=None if add_eos is None else bool(add_eos),
        chat_template=str(template) if template else None,
    )


def apply_tokenizer_metadata(tokenizer: Any, metadata: TokenizerMetadata) -> None:
    """Make ``tokenizer`` (a transformers fast tokenizer) follow ``metadata``, in place."""
    vocab_size = len(tokenizer)
    for attribute, token_id in metadata.special_ids.items():
        if 0 <= token_id < vocab_size:
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    # The setters rebuild the post-processor (TemplateProcessing) that inserts BOS/EOS; only touch
    # it where the tokenizer disagrees with the file (a byte-level post-processor stays as it is).
    bos_now, eos_now = _adds_bos_eos(tokenizer, metadata)
    if metadata.add_eos is not None and eos_now is not None and eos_now != metadata.add_eos:
        tokenizer.add_eos_token = metadata.add_eos
    if metadata.add_bos is not None and bos_now is not None and bos_now != metadata.add_bos:
        tokenizer.add_bos_token = metadata.add_bos
    tokenizer.chat_template = metadata.chat_template


def _adds_bos_eos(tokenizer: Any, metadata: TokenizerMetadata) -> tuple[bool | None, bool | None]:
    """Whether ``tokenizer`` puts the file's BOS in front / EOS at the end (None: the file names none)."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    bos_id = metadata.special_ids.get("bos_token")
    eos_id = metadata.special_ids.get("eos_token")
    return (
        None if bos_id is None else ids[:1] == [bos_id],
        None if eos_id is None else ids[-1:] == [eos_id],
    )


def tokenizer_mismatches(tokenizer: Any, metadata: TokenizerMetadata) -> list[str]:
    """How ``tokenizer`` differs from what ``metadata`` declares (empty = it agrees)."""
    problems: list[str] = []
    vocab_size = len(tokenizer)
    for attribute, token_id in metadata.special_ids.items():
        if not 0 <= token_id < vocab_size:
            continue  # e.g. a padding id past the vocabulary: nothing to compare
        actual = getattr(tokenizer, f"{attribute}_id", None)
        if actual != token_id:
            problems.append(f"{attribute}_id is {actual}, the file says {token_id}")
    bos_now, eos_now = _adds_bos_eos(tokenizer, metadata)
    for name, wanted, actual in (("bos", metadata.add_bos, bos_now), ("eos", metadata.add_eos, eos_now)):
        if wanted is not None and actual is not None and actual != wanted:
            ids = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
            problems.append(f"add_{name}_token should be {wanted}, but {PROBE_TEXT!r} encodes as {ids}")
    if (tokenizer.chat_template or None) != metadata.chat_template:
        problems.append("the chat template differs from the file's tokenizer.chat_template")
    return problems
