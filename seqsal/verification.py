"""A Verify result in words and as a compact record: the CLI, the UI and ``seqsal batch`` share these.

"removing the 3 most salient sentences lowers log p(target) by 4.1 nats; 3 random sentences:
0.6 ± 0.3" - a sentence a practitioner can act on before editing the prompt on a heatmap's word.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from seqsal.v1 import common_pb2, saliency_pb2

#: (singular, plural) of a segment at each granularity.
NOUNS = {
    common_pb2.TOKENS: ("token", "tokens"),
    common_pb2.WORDS: ("word", "words"),
    common_pb2.SENTENCES: ("sentence", "sentences"),
    common_pb2.LINES: ("line", "lines"),
    common_pb2.PARAGRAPHS: ("paragraph", "paragraphs"),
    common_pb2.CUSTOM_REGEX: ("segment", "segments"),
}


def noun(granularity: int, k: int) -> str:
    singular, plural = NOUNS.get(granularity, ("segment", "segments"))
    return singular if k == 1 else plural


def nats(value: float) -> str:
    """One decimal, never "-0.0"."""
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


def _change(drop: float) -> str:
    verb = "lowers" if drop >= 0 else "raises"
    return f"{verb} log p(target) by {nats(abs(drop))} nats"


def describe_step(step: saliency_pb2.VerifyStep, granularity: int) -> str:
    """One k of a Verify result, in words."""
    most = "the most salient" if step.k == 1 else f"the {step.k} most salient"
    return (
        f"removing {most} {noun(granularity, step.k)} {_change(step.topk_drop)}; "
        f"{step.k} random {noun(granularity, step.k)}: "
        f"{nats(step.random_drop_mean)} ± {nats(step.random_drop_std)}"
    )


def describe_sufficiency(step: saliency_pb2.VerifyStep, full_logprob: float, granularity: int) -> str:
    """What the top-k alone keep, in words."""
    return (
        f"keeping only {'it' if step.k == 1 else 'those ' + str(step.k)}: log p(target) = "
        f"{nats(step.topk_only_logprob)} (full prompt: {nats(full_logprob)})"
    )


def headline(response: saliency_pb2.VerifyResponse, k: int = 3) -> str:
    """The sentence for ``k`` (or the largest k there is below it), or why there is none."""
    granularity = response.saliency.granularity
    steps = [s for s in response.steps if s.k <= k]
    if not steps:
        segments = noun(granularity, response.removable_segments)
        return f"the prompt has {response.removable_segments} removable {segments}: nothing to compare"
    return describe_step(steps[-1], granularity)


def record(response: saliency_pb2.VerifyResponse) -> dict[str, Any]:
    """The result without the explanation it checked (an export carries that already)."""
    compact = saliency_pb2.VerifyResponse()
    compact.CopyFrom(response)
    compact.ClearField("saliency")
    for step in compact.steps:
        step.ClearField("ablated_prompt_token_ids")
    out = json_format.MessageToDict(compact, preserving_proto_field_name=True)
    out["granularity"] = common_pb2.Granularity.Name(response.saliency.granularity)
    return out
