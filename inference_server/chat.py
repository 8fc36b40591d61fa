"""Chat templates, applied so that generation and saliency see exactly the same ids.

The templated text is what both services receive as the prompt. Because the
prompt is always tokenised *with* the tokenizer's special tokens, a template
that writes the BOS token itself would get it twice; such a leading BOS is
removed from the text, and the tokenizer adds it back.
"""

from __future__ import annotations

from typing import Any

from seqsal.errors import InvalidArgumentError


def apply_chat_template(tokenizer: Any, prompt: str, system_prompt: str = "") -> str:
    """The prompt as a user turn (after an optional system turn), ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(
            "this model has no chat template; send the prompt as is (use_chat_template = false)",
            field="use_chat_template",
        )
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        added = tokenizer("", add_special_tokens=True)["input_ids"]
        if tokenizer.bos_token_id in added:
            text = text[len(bos) :]
    return text
