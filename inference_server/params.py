"""Validate a GenerateRequest's sampling fields, naming the field and the allowed range."""

from __future__ import annotations

from inference_server.backends.base import SamplingParams
from seqsal.errors import InvalidArgumentError
from seqsal.v1 import inference_pb2

MAX_STOP_STRINGS = 16


def sampling_params(
    request: inference_pb2.GenerateRequest, *, max_candidates: int, default_max_tokens: int, room: int
) -> SamplingParams:
    """Sampling settings for ``request``; ``room`` is how many tokens fit after the prompt."""
    n = request.n or 1
    if not 1 <= n <= max_candidates:
        raise InvalidArgumentError(f"n = {request.n} is out of range; use 1..{max_candidates}", field="n")
    max_tokens = request.max_tokens or min(default_max_tokens, room)
    if max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens = {request.max_tokens} must be positive", field="max_tokens")
    if max_tokens > room:
        raise InvalidArgumentError(
            f"max_tokens = {max_tokens} does not fit: the prompt leaves room for {room} new tokens in the "
            "model's context; lower max_tokens or shorten the prompt",
            field="max_tokens",
        )
    if not 0.0 <= request.temperature <= 2.0:
        raise InvalidArgumentError(
            f"temperature = {request.temperature} is out of range; use 0 (greedy) to 2", field="temperature"
        )
    top_p = request.top_p or 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgumentError(
            f"top_p = {request.top_p} is out of range; use a value in (0, 1], or 0 for off", field="top_p"
        )
    if request.top_k < 0:
        raise InvalidArgumentError(f"top_k = {request.top_k} must be >= 0 (0 = off)", field="top_k")
    if len(request.stop) > MAX_STOP_STRINGS or any(not s for s in request.stop):
        raise InvalidArgumentError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", field="stop")
    if request.temperature == 0.0 and n > 1:
        raise InvalidArgumentError(
            f"n = {n} candidates with temperature 0 would all be the same greedy answer; "
            "set temperature > 0 for several candidates",
            field="n",
        )
    return SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=float(request.temperature),
        top_p=float(top_p),
        top_k=int(request.top_k),
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )
