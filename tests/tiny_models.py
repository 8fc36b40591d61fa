"""Tiny random causal LMs of several architectures, built locally for tests.

Each model is a 2-layer transformer of a real architecture (GPT-2, Llama, Mistral,
Gemma, Qwen2) with random weights from a fixed seed, paired with a small BPE
tokenizer trained here on built-in English text in the style of that family:

- ``gpt2``: byte-level BPE, ``<|endoftext|>`` as bos/eos/unk/pad, no BOS added.
- ``llama``, ``mistral``: SentencePiece-like BPE (``▁`` Metaspace pre-tokenizer, byte
  fallback tokens ``<0x00>``..``<0xFF>``) whose post-processor adds ``<s>`` in front.
- ``gemma``: the same with ``<bos>``/``<eos>``/``<pad>``/``<unk>``, no ``▁`` prepended to
  the first word, and BOS added.
- ``qwen2``: byte-level BPE with Qwen's split regex, no BOS token at all (``bos_token``
  is None, as in the real Qwen2 tokenizers) and ``<|endoftext|>`` as eos/pad.

:func:`build_tiny_model` writes model (safetensors) + tokenizer with ``save_pretrained``,
so the directory loads like any local model with ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(dir)``. Building one takes well under a second and
needs no network; the result is the same on every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = ("gpt2", "llama", "mistral", "gemma", "qwen2")

SEED = 1234
VOCAB_SIZE = 640  # BPE target, before the byte-fallback tokens of the SentencePiece-like ones
HIDDEN = 64
LAYERS = 2
HEADS = 2  # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... but not 16
KV_HEADS = 1  # grouped-query attention where the architecture has it
INTERMEDIATE = 128
CONTEXT = 1024
INIT_RANGE = 0.1  # larger than the usual 0.02, so logits and gradients are not all near-uniform

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. Every
morning he rowed out past the rocks, cast his net, and waited for the tide to turn. Some days the
net came back heavy with silver fish; other days it held nothing but weeds and water.

Paris is the capital of France, and Rome is the capital of Italy. Berlin is the capital of Germany,
Madrid is the capital of Spain, and London is the capital of the United Kingdom. The river Seine
flows through Paris, while the Tiber runs through Rome and the Thames through London.

Machine learning models read text as tokens. A tokenizer splits a sentence into pieces, maps each
piece to a number, and the model predicts which piece is likely to come next. Saliency methods ask
which of the earlier tokens mattered most for that prediction: the gradient of the target's
log-probability with respect to each input embedding gives one answer, and integrated gradients
gives another, more careful one.

Question: What is two plus two? Answer: Two plus two is four. Question: What colour is the sky on a
clear day? Answer: The sky is blue. Question: Who wrote the play about the prince of Denmark?
Answer: William Shakespeare wrote Hamlet in about 1600.

She said, "I'll be there at 10:30 tomorrow, don't worry!" He replied: "Great -- see you then." The
numbers 0 1 2 3 4 5 6 7 8 9 and 42, 100, 2024 appear here; so do symbols like #, $, %, &, *, (, ),
[, ], {, }, <, >, /, \\, |, @, ^, _, ~, +, =, ;, and the accented words café, naïve and résumé.
"""

# Qwen2's pre-tokenizer split pattern (the GPT-4 style regex).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class TokenizerStyle:
    """Special tokens and layout of one architecture's tokenizer."""

    kind: str  # "byte_level" or "metaspace"
    specials: tuple[str, ...]  # in id order, ids 0..n-1
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    add_bos: bool
    prepend_first: bool = True  # metaspace: put "▁" before the first word too
    qwen_regex: bool = False
    extra_specials: tuple[str, ...] = field(default=())


STYLES: dict[str, TokenizerStyle] = {
    "gpt2": TokenizerStyle(
        kind="byte_level",
        specials=("<|endoftext|>",),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<|endoftext|>",
        add_bos=False,
    ),
    "llama": TokenizerStyle(
        kind="metaspace",
        specials=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        pad="<unk>",
        unk="<unk>",
        add_bos=True,
    ),
    "mistral": TokenizerStyle(
        kind="metaspace",
        specials=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        pad="</s>",
        unk="<unk>",
        add_bos=True,
    ),
    "gemma": TokenizerStyle(
        kind="metaspace",
        specials=("<pad>", "<eos>", "<bos>", "<unk>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        prepend_first=False,
        extra_specials=("<start_of_turn>", "<end_of_turn>"),
    ),
    "qwen2": TokenizerStyle(
        kind="byte_level",
        specials=("<|endoftext|>",),
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk=None,
        add_bos=False,
        qwen_regex=True,
        extra_specials=("<|im_start|>", "<|im_end|>"),
    ),
}


def build_tokenizer(arch: str):
    """A ``PreTrainedTokenizerFast`` in the style of ``arch``, trained on :data:`CORPUS`."""
    from transformers import PreTrainedTokenizerFast

    style = STYLES[_check_arch(arch)]
    backend = _byte_level_tokenizer(style) if style.kind == "byte_level" else _metaspace_tokenizer(style)
    special_kwargs = {
        name: value
        for name, value in (
            ("bos_token", style.bos),
            ("eos_token", style.eos),
            ("pad_token", style.pad),
            ("unk_token", style.unk),
        )
        if value is not None
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=CONTEXT,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=list(style.extra_specials) or None,
        **special_kwargs,
    )
    return tokenizer


def _byte_level_tokenizer(style: TokenizerStyle):
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    if style.qwen_regex:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Like GPT-2's and Qwen2's: offsets of " word" include the space; nothing is added.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[*style.specials, *style.extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tokenizer


def _metaspace_tokenizer(style: TokenizerStyle):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    prepend = "first" if style.prepend_first else "never"
    trainer_tokenizer = Tokenizer(models.BPE(unk_token=style.unk))
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(style.specials),
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)

    # Lay the vocabulary out like a SentencePiece model: specials, then the 256 byte-fallback
    # tokens, then the learned pieces; rebuild the BPE with byte fallback on.
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in style.specials:
        vocab[token] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=style.unk, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)
    # Llama-2's decoder: "▁" back to spaces, bytes back to text, then drop the prepended space.
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style.prepend_first:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([*style.specials, *style.extra_specials])
    if style.add_bos:
        bos_id = vocab[style.bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A",
            pair=f"{style.bos} $A {style.bos} $B",
            special_tokens=[(style.bos, bos_id)],
        )
    return tokenizer


def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


def build_config(arch: str, tokenizer) -> object:
    """The transformers config of the tiny ``arch`` model, sized to ``tokenizer``."""
    import transformers

    arch = _check_arch(arch)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=CONTEXT,
            initializer_range=INIT_RANGE,
            **ids,
        )
    common = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": CONTEXT,
        "initializer_range": INIT_RANGE,
        **ids,
    }
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **common)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=CONTEXT, tie_word_embeddings=False, **common)
    if arch == "gemma":
        return transformers.GemmaConfig(
            head_dim=HIDDEN // HEADS, hidden_activation="gelu_pytorch_tanh", **common
        )
    return transformers.Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **common)


def build_model(arch: str, tokenizer, seed: int | None = None):
    """A randomly initialised fp32 causal LM of ``arch``, the same for the same seed.

    The default seed differs per architecture, so that e.g. Llama and Mistral don't share weights.
    """
    if seed is None:
        seed = SEED + ARCHITECTURES.index(_check_arch(arch))
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def build_tiny_model(arch: str, out_dir: Path) -> Path:
    """Build the tiny ``arch`` model + tokenizer and save them into ``out_dir``; return ``out_dir``."""
    arch = _check_arch(arch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch)
    model = build_model(arch, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _check_arch(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")
    return arch
