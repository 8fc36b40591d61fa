"""Activation checkpointing of a frozen causal LM's decoder layers, for one forward pass at a time.

The saliency backward needs every decoder layer's activations; kept for all layers at once
they grow by ~1.3 MiB per token on SmolLM2-135M (10 GiB at 8k tokens). With checkpointing
only each layer's input is kept (``hidden_size`` floats per token per layer) and a layer's
activations are recomputed, one layer at a time, when the backward reaches it: one extra
forward pass of compute for a fraction of the memory.

transformers' own ``gradient_checkpointing_enable`` only acts in training mode, which
would also turn dropout on (GPT-2's tiny test models have dropout 0.1) and change the
numbers. Instead :func:`checkpointed_layers` wraps each decoder layer's ``forward`` in
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` for the duration of a ``with``
block and restores it afterwards. The wrapper captures the original bound ``forward``, so
a backward that runs after the block (the engine's batched backward chunks) recomputes
with the original code; the model itself is unchanged outside the block. The engine calls
it under its per-model lock, so no other thread sees the wrapped layers.

Non-reentrant checkpointing recomputes exactly the same operations on the same inputs
(eval mode, no dropout), so gradients equal the plain ones to float rounding; the tests
check it on every tiny architecture and method.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.checkpoint import CheckpointPolicy as CheckpointPolicyKind
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from saliency_server.memory import available_bytes, estimate_peak_bytes

#: What kind of checkpointing a pass gets: none, every layer recomputed in full, or recomputed
#: except the attention kernel's outputs (kept; see :func:`_keep_attention`).
Mode = Literal["off", "full", "keep_attention"]
#: ``auto``: checkpoint a pass from this many tokens (row width x rows) on. Below it the plain
#: pass is faster (no recomputation) and small; measured in bench/README.md (long prompts).
DEFAULT_MIN_TOKENS = 1024
#: ``auto``: also checkpoint when the plain pass's estimate exceeds this share of available memory.
FREE_MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class CheckpointPolicy:
    """How a gradient pass is checkpointed (``SEQSAL_CHECKPOINTING``, ``SEQSAL_CHECKPOINT_MIN_TOKENS``).

    ``off`` / ``full`` / ``keep_attention`` force that mode (``keep_attention`` falls back to
    ``full`` for a pass that is backpropagated more than once). ``auto`` checkpoints a pass
    of ``min_tokens`` tokens or more (row width times rows: a foil doubles the rows,
    integrated gradients multiplies them by its batch) and any pass whose plain estimate
    (:func:`~saliency_server.memory.estimate_peak_bytes`) exceeds ``FREE_MEMORY_FRACTION``
    of the memory available at that moment; it keeps the attention outputs when the pass has
    a single backward (a Saliency call, each integrated-gradients batch) and recomputes
    layers in full when it has several (SaliencyAllSegments with more selections than
    ``segment_batch_size``).
    """

    mode: Literal["auto", "off", "full", "keep_attention"] = "auto"
    min_tokens: int = DEFAULT_MIN_TOKENS
    free_bytes: Callable[[], int | None] = available_bytes

    def choose(
        self,
        config: Any,
        *,
        tokens: int,
        target_tokens: int,
        rows: int,
        n_selections: int,
        dtype: torch.dtype,
        backward_passes: int,
    ) -> Mode:
        """The mode for one forward pass of ``rows`` rows of ``tokens`` tokens."""
        single = "keep_attention" if backward_passes <= 1 else "full"
        if self.mode == "keep_attention":
            return single
        if self.mode != "auto":
            return self.mode
        if tokens * rows >= self.min_tokens:
            return single
        plain = estimate_peak_bytes(
            config,
            prompt_tokens=tokens - target_tokens,
            target_tokens=target_tokens,
            n_selections=n_selections,
            dtype=dtype,
            checkpointing=False,
            rows=rows,
        )
        free = self.free_bytes()
        return single if free is not None and plain > FREE_MEMORY_FRACTION * free else "off"


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' ``GradientCheckpointingLayer`` modules), in order.

    Falls back to the longest ``ModuleList`` of same-typed blocks for models whose layers are
    not ``GradientCheckpointingLayer`` subclasses; empty if there is none.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers < 4.52
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
    layers = [
        m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)
    ]
    # Only the outermost ones: a checkpointing layer inside another is recomputed with it.
    inner = {id(sub) for layer in layers for sub in layer.modules() if sub is not layer}
    layers = [m for m in layers if id(m) not in inner]
    if layers:
        return layers
    lists = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1
    ]
    return list(max(lists, key=len)) if lists else []


_MISSING = object()


def _attention_ops() -> frozenset[Any]:
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_ATTENTION_OPS = _attention_ops()


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicyKind:
    """Selective checkpointing: keep SDPA's outputs (output + logsumexp, ~hidden floats per token),
    recompute the rest. Attention is most of a long prompt's forward FLOPs (quadratic), the linear
    layers and pointwise ops that are recomputed are the cheap part; but a region may then be
    backpropagated only once, so the engine uses it only for passes with a single backward."""
    return CheckpointPolicyKind.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicyKind.PREFER_RECOMPUTE


def _checkpointed(forward: Any, mode: Mode) -> Any:
    extra: dict[str, Any] = {}
    if mode == "keep_attention":
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_attention)

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # preserve_rng_state (the default): nothing random runs in eval mode, but it costs
        # microseconds and keeps the recomputation identical even if something did
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed_layers(model: Any, mode: Mode = "full") -> Iterator[int]:
    """Within the block, the model's decoder layers are checkpointed; yields how many are.

    ``mode="off"`` is a no-op (yields 0), so callers can write one code path.
    """
    if mode == "off":
        yield 0
        return
    layers = decoder_layers(model)
    patched: list[tuple[torch.nn.Module, Any]] = []
    try:
        for layer in layers:
            # an instance attribute shadows the class's forward for nn.Module.__call__; one that is
            # there already (accelerate's hooks put one) is wrapped and put back afterwards
            patched.append((layer, layer.__dict__.get("forward", _MISSING)))
            layer.forward = _checkpointed(layer.forward, mode)
        yield len(patched)
    finally:
        for layer, previous in patched:
            if previous is _MISSING:
                del layer.forward
            else:
                layer.forward = previous
