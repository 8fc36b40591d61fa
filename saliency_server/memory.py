"""Peak-memory estimate of one saliency computation, and the server's memory budget.

:func:`estimate_peak_bytes` predicts, from the model's config alone (layers, hidden size,
heads, intermediate size, vocabulary), how many bytes a saliency computation adds on top of
the loaded weights, so that a request that can never fit is refused before any compute and
concurrent work can be admitted by the memory it needs. :func:`memory_budget_bytes` is how
much the server may spend on such computations.

The model (per forward row of ``T`` tokens, ``b`` bytes per activation element):

- every decoder layer keeps ``b * (ALPHA_HIDDEN * hidden + ALPHA_KV * kv + ALPHA_INTER * inter)``
  bytes per token for the backward (norm inputs and outputs, q/k/v, rotary copies, attention
  output, MLP gate/up/activation); ``kv = kv_heads * head_dim``;
- checkpointed, a layer keeps only its input and its attention output (``2 * hidden + heads``
  per token, ``KEPT_HIDDEN * hidden + heads`` as measured; full recomputation keeps less, the
  estimate does not distinguish) and one layer at a time is recomputed;
- the backward of ``n_selections`` cotangents at once (``is_grads_batched``) holds about
  ``BETA`` of one layer's activations per selection while it passes through that layer;
- the predicted positions' logits (float32, ``vocab`` each) with their gradient per
  selection, and the gradient of the embeddings per selection (float32).

The constants were fitted to peak RSS measured on SmolLM2-135M-Instruct (fp32, CPU) by
``bench/bench_long_prompts.py`` (see bench/README.md: estimate vs measured) and rounded up,
so the estimate errs on the large side.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("seqsal.memory")

MIB = 1024 * 1024
GIB = 1024 * MIB

ALPHA_HIDDEN = 10.0
ALPHA_KV = 4.0
ALPHA_INTER = 4.0
BETA = 1.0
#: Checkpointed: bytes kept per token per layer, in units of hidden floats. Layer input plus
#: attention output would be 2; 6 matches the peak RSS measured at 2048 tokens (keep_attention,
#: +1023 MiB against an estimate of 1.1 GiB).
KEPT_HIDDEN = 6.0
#: Fixed cost of a computation (allocator slack, small tensors, response building).
FIXED_BYTES = 64 * MIB
#: Margin kept free when the budget is derived from the machine's available memory.
MARGIN_FRACTION = 0.10
MIN_MARGIN_BYTES = 512 * MIB


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a decoder-only transformer that its memory depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_dims(config: Any) -> ModelDims:
    """Sizes from a transformers config (Llama-style names, GPT-2's ``n_*``, or a ``text_config``)."""
    text = getattr(config, "text_config", None)
    if text is not None and _get(config, "num_hidden_layers", "n_layer") is None:
        config = text
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(config, "num_attention_heads", "n_head", default=1))
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    head_dim = int(_get(config, "head_dim", default=hidden // max(heads, 1)))
    return ModelDims(
        layers=int(_get(config, "num_hidden_layers", "n_layer", "num_layers")),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=int(_get(config, "intermediate_size", "n_inner", default=4 * hidden)),
        vocab=int(_get(config, "vocab_size")),
    )


def estimate_peak_bytes(
    config: Any,
    *,
    prompt_tokens: int,
    target_tokens: int,
    n_selections: int,
    dtype: torch.dtype,
    checkpointing: bool,
    rows: int = 1,
) -> int:
    """Bytes one forward + backward adds on top of the weights (see the module docstring).

    ``prompt_tokens + target_tokens`` is the width of one row (with a foil: the longer of
    target and foil); ``rows`` the rows of one pass (2 with a foil, times the IG batch);
    ``n_selections`` the selections in one batched backward (at most the segment batch size).
    """
    dims = model_dims(config)
    b = torch.empty((), dtype=dtype).element_size()
    tokens = (prompt_tokens + target_tokens) * rows
    per_layer_token = b * (
        ALPHA_HIDDEN * dims.hidden
        + ALPHA_KV * dims.kv_heads * dims.head_dim
        + ALPHA_INTER * dims.intermediate
    )
    if checkpointing:
        # each layer's input and (keep_attention) its attention output and log-sum-exp are
        # 2 * hidden + heads per token; KEPT_HIDDEN (fitted) also covers what the allocator holds
        kept = KEPT_HIDDEN * dims.hidden + dims.heads
        activations = dims.layers * tokens * b * kept + tokens * per_layer_token
    else:
        activations = dims.layers * tokens * per_layer_token
    k = max(1, n_selections)
    backward = BETA * k * tokens * per_layer_token
    logits = 4 * target_tokens * rows * dims.vocab * (2 + k)
    embedding_grads = 4 * k * tokens * dims.hidden * 2
    return int(FIXED_BYTES + activations + backward + logits + embedding_grads)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), if there is one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory this process could still allocate: MemAvailable, or less under a cgroup limit."""
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not values and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            values.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(values) if values else None


def memory_budget_bytes(settings: Any, *, weights_bytes: int = 0, available: int | None = None) -> int | None:
    """Bytes the server's saliency computations may use together; None = no budget.

    ``SEQSAL_MEMORY_BUDGET_MB`` > 0 is the budget; 0 turns it off; unset (the default) takes
    the memory available now (``available``, else :func:`available_bytes`) less the weights
    still to be loaded (``weights_bytes``; 0 when they already are) and a margin
    (``MARGIN_FRACTION``, at least ``MIN_MARGIN_BYTES``).
    """
    configured = getattr(settings, "memory_budget_mb", None)
    if configured is not None:
        return None if configured == 0 else int(configured) * MIB
    free = available if available is not None else available_bytes()
    if free is None:
        logger.warning("available memory unknown; no memory budget (set SEQSAL_MEMORY_BUDGET_MB)")
        return None
    margin = max(MIN_MARGIN_BYTES, int(free * MARGIN_FRACTION))
    return max(0, free - weights_bytes - margin)


def format_bytes(value: int) -> str:
    """``1.2 GiB`` / ``340 MiB``."""
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


def computation_peak_bytes(
    engine: Any, inputs: Any, *, n_selections: int, methods: Any, ig_steps: int, checkpointing: bool
) -> int:
    """Estimated peak of one engine computation: the larger of its gradient and IG passes.

    ``engine`` is a :class:`~saliency_server.engine.GradientEngine`, ``inputs`` its
    :class:`~saliency_server.engine.SaliencyInputs`.
    """
    from seqsal.v1 import common_pb2

    n_prompt = len(inputs.prompt_ids)
    width = max(len(inputs.target_ids), len(inputs.foil_ids or ()))
    foil_rows = 2 if inputs.foil_ids is not None else 1
    k = min(max(1, n_selections), engine.segment_batch_size)
    passes = [(foil_rows, k)]
    if common_pb2.INTEGRATED_GRADIENTS in methods:
        passes.append((foil_rows * min(ig_steps, engine.ig_batch_size), max(1, n_selections)))
    return max(
        estimate_peak_bytes(
            engine.model.config,
            prompt_tokens=n_prompt,
            target_tokens=width,
            n_selections=selections,
            dtype=engine.dtype,
            checkpointing=checkpointing,
            rows=rows,
        )
        for rows, selections in passes
    )


def check_fits(
    engine: Any,
    inputs: Any,
    *,
    n_selections: int,
    methods: Any,
    ig_steps: int,
    budget: int | None,
    model_id: str,
) -> int:
    """The bytes to reserve for this computation; ResourceExhaustedError if it can never fit.

    The reservation is the estimate of the mode the engine will most likely pick (checkpointed
    from its policy's token threshold, or always/never when forced); the refusal compares the
    least it could need (checkpointed, unless checkpointing is off) with the whole budget.
    """
    from seqsal.errors import ResourceExhaustedError

    policy = engine.checkpoint_policy
    can_checkpoint = policy.mode != "off"
    least = computation_peak_bytes(
        engine,
        inputs,
        n_selections=n_selections,
        methods=methods,
        ig_steps=ig_steps,
        checkpointing=can_checkpoint,
    )
    if budget is not None and least > budget:
        raise ResourceExhaustedError(
            f"this request ({inputs.total_tokens} tokens, {n_selections} selection(s) on model "
            f"{model_id!r}) needs about {format_bytes(least)} for its saliency computation, more than "
            f"this server's memory budget of {format_bytes(budget)} (SEQSAL_MEMORY_BUDGET_MB); shorten the "
            "prompt, ask for fewer methods or selections (integrated gradients and SaliencyAllSegments "
            "cost the most; SEQSAL_IG_BATCH_SIZE and SEQSAL_SEGMENT_BATCH_SIZE lower them), or use a "
            "server with more memory"
        )
    width = len(inputs.prompt_ids) + max(len(inputs.target_ids), len(inputs.foil_ids or ()))
    likely_checkpointed = can_checkpoint and (policy.mode != "auto" or width >= policy.min_tokens)
    if likely_checkpointed == can_checkpoint:
        return least
    return computation_peak_bytes(
        engine,
        inputs,
        n_selections=n_selections,
        methods=methods,
        ig_steps=ig_steps,
        checkpointing=likely_checkpointed,
    )
