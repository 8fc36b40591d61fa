"""Teacher-forced gradient saliency for one causal LM (PyTorch).

Given token ids ``x = prompt + target`` the objective for a selection ``w``
(one weight per target token, 1 = explain it) is

    L = sum_t w_t * log p(x_t | x_<t)                     (one forward pass)

and, with a foil, ``L - sum_f log p(foil_f | prompt, target_<a, foil_<f)``, where ``a`` is the
first selected target token: the foil is the alternative to the target *from the selection on*,
in the same context (the prompt and the target before the selection), so a selected sentence is
contrasted with the foil written in its place. With the whole target selected (``a = 0``) that
is ``log p(target | prompt) - log p(foil | prompt)``. The scores then cover the prompt and
the target before the selection (the context both continuations share). Gradients are
taken with respect to the input embeddings ``e_i`` (the output of the model's
input embedding module, so Gemma's scaling is included and GPT-2's position
embeddings are not):

    GRAD_L2[i]        = ||dL/de_i||_2
    GRAD_DOT_INPUT[i] = dL/de_i . e_i
    IG[i]             = e_i . sum_k w_k dL/de_i (alpha_k * e)   (zero baseline; see
                                                                 ``ig_schedule``)

Several selections share one forward pass: their gradients are vector-Jacobian
products of the same per-token log-probabilities, computed as one batched
backward (``is_grads_batched``). Tokens at or after the last selected
position get exactly 0.

A scheduler drives a computation through :class:`Steps`: it may pause it at
checkpoints (between chunks of selections, and at every decoder layer of a
forward or, on the CPU, a backward pass) and choose which selections go next;
the paused computation keeps its forward pass and resumes where it stopped.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from saliency_server.checkpointing import CheckpointPolicy, checkpointed_layers
from saliency_server.checkpointing import Mode as CheckpointMode
from saliency_server.forward_cache import ForwardCache, HeldForward, SavedBytes
from saliency_server.logprobs import token_logprobs
from saliency_server.memory import model_dims
from seqsal.errors import CancelledError
from seqsal.v1 import common_pb2
from server_kit.teacher_forcing import score_rows

logger = logging.getLogger("seqsal.engine")

GRADIENT_METHODS = (common_pb2.GRAD_L2, common_pb2.GRAD_DOT_INPUT)


@dataclass(frozen=True)
class SaliencyInputs:
    """Token ids of one teacher-forced problem."""

    prompt_ids: Sequence[int]
    target_ids: Sequence[int]
    foil_ids: Sequence[int] | None = None

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids) + len(self.foil_ids or ())


@dataclass
class SaliencyResult:
    """Scores for one selection: one float32 array per method over all tokens (prompt, target, foil)."""

    scores: dict[int, np.ndarray]
    target_token_logprobs: np.ndarray
    target_logprob: float
    foil_logprob: float | None = None
    ig_residual: float | None = None
    ig_steps: int = 0
    #: Index of the selection among the computation's masks (results may come out of order).
    selection: int = 0


CancelCheck = Callable[[], bool]


class Steps(Protocol):
    """How a scheduler drives one computation (see :mod:`saliency_server.scheduler`)."""

    def checkpoint(self, boundary: bool) -> None:
        """Called at every checkpoint (``boundary``: between steps, not inside a pass); may block
        while other work runs, and raises :class:`~seqsal.errors.CancelledError` to stop."""

    def next_chunk(self, remaining: Sequence[int], size: int) -> Sequence[int]:
        """Which of the ``remaining`` selections to compute next (a non-empty subset; ``size`` is
        the engine's default chunk size)."""


_current = threading.local()  # the Steps of the computation running on this thread, if any


def _layer_checkpoint(*_: Any) -> None:
    steps: Steps | None = getattr(_current, "steps", None)
    if steps is not None:
        steps.checkpoint(False)


def _layer_hook(module: Any, args: Any, output: Any) -> None:
    _layer_checkpoint()
    hidden = output[0] if isinstance(output, tuple) else output
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        # backward passes through here too; on CUDA the backward runs on autograd's device
        # thread, where no Steps are set, so it is never paused inside a pass there
        hidden.register_hook(_layer_checkpoint)


def install_layer_checkpoints(model: Any) -> int:
    """Checkpoints at every decoder layer (the longest ``ModuleList``), once per model; returns how many."""
    if getattr(model, "_seqsal_checkpoints", None) is not None:
        return int(model._seqsal_checkpoints)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    layers = max(lists, key=len) if lists else []
    for layer in layers:
        layer.register_forward_hook(_layer_hook)
    model._seqsal_checkpoints = len(layers)
    return len(layers)


#: IG interpolation schedule exponent: alpha = u**IG_POWER with u on a midpoint grid. 1 (uniform)
#: measured best on SmolLM2, whose objective changes most between alpha 0.3 and 1; powers 2-4
#: (points crowded near the baseline) gave 1-10x larger completeness residuals there.
IG_POWER = 1


def ig_schedule(steps: int, power: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolation points ``alpha_k`` and quadrature weights for integrated gradients.

    The path integral over alpha in [0, 1] is taken with the substitution
    ``alpha = u**power`` and the midpoint rule in ``u`` (u_k = (k + 0.5) / steps),
    so ``weight_k = power * u_k**(power - 1) / steps`` and the weights sum to ~1.
    ``power = 1`` is the plain midpoint Riemann sum; larger powers crowd the
    points near the zero baseline.
    """
    u = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    alphas = u**power
    weights = power * u ** (power - 1) / steps
    return alphas.to(device=device, dtype=torch.float32), weights.to(device=device, dtype=torch.float32)


class _GroupSteps:
    """The :class:`Steps` of a group of a computation's selections (indices local to the group)."""

    def __init__(self, steps: Steps, group: Sequence[int]) -> None:
        self.steps = steps
        self.group = list(group)
        self.local = {k: i for i, k in enumerate(group)}

    def checkpoint(self, boundary: bool) -> None:
        self.steps.checkpoint(boundary)

    def next_chunk(self, remaining: Sequence[int], size: int) -> Sequence[int]:
        chosen = self.steps.next_chunk([self.group[i] for i in remaining], size)
        return [self.local[k] for k in chosen if k in self.local]


def _checkpointer(cancelled: CancelCheck | None, steps: Steps | None) -> Callable[[], None]:
    """A step boundary: stop if the client went away, then let the scheduler decide (may block)."""

    def checkpoint() -> None:
        _check(cancelled)
        if steps is not None:
            steps.checkpoint(True)

    return checkpoint


def _ids_or_none(ids: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if ids is None else tuple(ids)


def _check(cancelled: CancelCheck | None) -> None:
    if cancelled is not None and cancelled():
        raise CancelledError("request cancelled by the client or its deadline passed")


class GradientEngine:
    """Computes saliency on one loaded model. Thread-safe; runs in worker threads."""

    def __init__(
        self,
        model: Any,
        *,
        ig_batch_size: int = 8,
        segment_batch_size: int = 8,
        checkpoint_policy: CheckpointPolicy | None = None,
        logprob_chunk: int = 256,
        forward_cache: ForwardCache | None = None,
    ) -> None:
        self.model = model
        #: forward passes kept for the next computation of the same ids (off unless given)
        self.forward_cache = forward_cache if forward_cache is not None else ForwardCache(max_bytes=0)
        self.checkpoint_policy = checkpoint_policy or CheckpointPolicy()
        self.logprob_chunk = logprob_chunk
        self.embeddings = model.get_input_embeddings()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.ig_batch_size = ig_batch_size
        self.segment_batch_size = segment_batch_size
        self._supports_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._batched_vjp_ok = True
        self.ig_power = IG_POWER
        self._lock = threading.Lock()
        self.pad_id = 0
        install_layer_checkpoints(model)
        self.last_checkpointing: CheckpointMode = "off"  # how the latest gradient pass was checkpointed

    # --- building blocks ---------------------------------------------------------------------------

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """Input embeddings ``(len(ids), D)`` as the model's embedding module produces them."""
        with torch.no_grad():
            tensor = torch.tensor(list(ids), dtype=torch.long, device=self.device)
            return self.embeddings(tensor)

    def _layout(self, inputs: SaliencyInputs) -> tuple[list[list[int]], int]:
        """Rows fed to the model (target row, then foil row) and the prompt length."""
        prompt = list(inputs.prompt_ids)
        rows = [prompt + list(inputs.target_ids)]
        if inputs.foil_ids is not None:
            rows.append(prompt + list(inputs.foil_ids))
        return rows, len(prompt)

    def _log_probs(
        self, leaf: torch.Tensor, inputs: SaliencyInputs, *, checkpoint: CheckpointMode = "off"
    ) -> torch.Tensor:
        """Per-token log-probs ``(B, n_target + n_foil)`` for each interpolation ``alpha``.

        ``checkpoint``: the decoder layers keep only their inputs (and, ``keep_attention``, the
        attention outputs) for the backward and recompute the rest when it runs (see
        :mod:`saliency_server.checkpointing`); same values.

        ``leaf`` is ``(B, T, D)`` without a foil (the whole sequence) and
        ``(B, P, D)`` with one: only the prompt is explained, so only the prompt
        is interpolated; target and foil embeddings stay as they are.
        """
        rows, n_prompt = self._layout(inputs)
        n_target = len(inputs.target_ids)
        batch = leaf.shape[0]
        if inputs.foil_ids is None:
            embeds = leaf
            attention = None
            # one row of ids per interpolation point: gather with a (1, T) index would silently
            # return only the first row's log-probs
            ids = torch.tensor(rows, device=self.device).expand(batch, -1)
        else:
            n_foil = len(inputs.foil_ids)
            width = n_prompt + max(n_target, n_foil)
            parts = []
            attention_rows = []
            for tail_ids in (inputs.target_ids, inputs.foil_ids):
                tail = self.embed(tail_ids).unsqueeze(0).expand(batch, -1, -1)
                pad = torch.zeros(batch, width - n_prompt - len(tail_ids), leaf.shape[-1], dtype=leaf.dtype)
                parts.append(torch.cat([leaf, tail, pad.to(leaf.device)], dim=1))
                attention_rows.append(
                    [1] * (n_prompt + len(tail_ids)) + [0] * (width - n_prompt - len(tail_ids))
                )
            # rows: [target_0, foil_0, target_1, foil_1, ...]
            embeds = torch.stack(parts, dim=1).reshape(batch * 2, width, leaf.shape[-1])
            attention = torch.tensor(attention_rows * batch, device=self.device)
            ids = torch.tensor(
                [r + [self.pad_id] * (width - len(r)) for r in rows] * batch, device=self.device
            )
        n_predict = ids.shape[1] - n_prompt
        positions = torch.arange(n_prompt - 1, n_prompt - 1 + n_predict, device=self.device)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "use_cache": False}
        if attention is not None:
            kwargs["attention_mask"] = attention
        with checkpointed_layers(self.model, checkpoint):
            if self._supports_logits_to_keep:
                logits = self.model(**kwargs, logits_to_keep=positions).logits
            else:
                logits = self.model(**kwargs).logits[:, positions]
        next_ids = ids[:, n_prompt : n_prompt + n_predict]
        token_lp = token_logprobs(logits, next_ids, chunk=self.logprob_chunk)
        if inputs.foil_ids is None:
            return token_lp  # (B, n_target)
        token_lp = token_lp.view(batch, 2, n_predict)
        return torch.cat([token_lp[:, 0, :n_target], token_lp[:, 1, : len(inputs.foil_ids)]], dim=1)

    def _checkpoint(
        self, inputs: SaliencyInputs, rows: int, n_selections: int, backward_passes: int
    ) -> CheckpointMode:
        """How a forward pass of ``rows`` rows of this problem is checkpointed (the policy decides)."""
        n_prompt = len(inputs.prompt_ids)
        width = n_prompt + max(len(inputs.target_ids), len(inputs.foil_ids or ()))
        mode = self.checkpoint_policy.choose(
            self.model.config,
            tokens=width,
            target_tokens=width - n_prompt,
            rows=rows,
            n_selections=min(n_selections, self.segment_batch_size),
            dtype=self.dtype,
            backward_passes=backward_passes,
        )
        self.last_checkpointing = mode
        return mode

    def _objective_weights(self, inputs: SaliencyInputs, masks: np.ndarray) -> torch.Tensor:
        """``(K, n_target + n_foil)`` weights: the selection, then -1 on every foil token."""
        weights = torch.tensor(masks, dtype=torch.float32, device=self.device)
        if inputs.foil_ids is not None:
            foil = -torch.ones(weights.shape[0], len(inputs.foil_ids), device=self.device)
            weights = torch.cat([weights, foil], dim=1)
        return weights

    def _vjp(self, outputs: torch.Tensor, leaf: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Gradients of ``(weights[k] * outputs).sum()`` w.r.t. ``leaf`` for every k: ``(K, *leaf.shape)``."""
        k = weights.shape[0]
        grad_outputs = weights.unsqueeze(1).expand(k, *outputs.shape).contiguous()
        if k == 1:
            (grad,) = torch.autograd.grad(outputs, leaf, grad_outputs=grad_outputs[0], retain_graph=True)
            return grad.unsqueeze(0)
        if self._batched_vjp_ok:
            try:
                (grads,) = torch.autograd.grad(
                    outputs, leaf, grad_outputs=grad_outputs, retain_graph=True, is_grads_batched=True
                )
                return grads
            except RuntimeError as exc:  # an op without a vmap rule: loop instead, once and for all
                logger.warning("batched backward unsupported for this model (%s); looping instead", exc)
                self._batched_vjp_ok = False
        return torch.stack(
            [torch.autograd.grad(outputs, leaf, grad_outputs=g, retain_graph=True)[0] for g in grad_outputs]
        )

    # --- public API --------------------------------------------------------------------------------

    def saliency(
        self,
        inputs: SaliencyInputs,
        mask: Sequence[bool],
        methods: Sequence[int],
        *,
        ig_steps: int = 16,
        cancelled: CancelCheck | None = None,
    ) -> SaliencyResult:
        """Saliency for one selection (one forward and one backward for the gradient methods)."""
        masks = np.asarray([mask], dtype=bool)
        return next(self.saliency_batch(inputs, masks, methods, ig_steps=ig_steps, cancelled=cancelled))

    def saliency_batch(
        self,
        inputs: SaliencyInputs,
        masks: np.ndarray,
        methods: Sequence[int],
        *,
        ig_steps: int = 16,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        """Saliency for K selections ``masks (K, n_target)`` sharing one forward pass.

        Yields one result per selection as soon as its chunk of the batched backward
        is done (IG, when asked, needs all its passes first): in order, unless
        ``steps`` picks the chunks or a foil is set (selections with the same first selected
        token then share a pass and come together; ``selection`` says which each is). Without
        ``steps`` one computation runs per engine at a time; with them the scheduler decides.
        """
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != len(inputs.target_ids) or not masks.any(axis=1).all():
            raise ValueError("masks must be (K, n_target) with at least one selected token per row")
        with self._driven(steps):
            if inputs.foil_ids is None:
                yield from self._saliency_batch(inputs, masks, methods, ig_steps, cancelled, steps)
            else:
                yield from self._contrastive_batch(inputs, masks, methods, ig_steps, cancelled, steps)

    def _contrastive_batch(
        self,
        inputs: SaliencyInputs,
        masks: np.ndarray,
        methods: Sequence[int],
        ig_steps: int,
        cancelled: CancelCheck | None,
        steps: Steps | None,
    ) -> Iterator[SaliencyResult]:
        """Selections with a foil: those with the same first selected token ``a`` share one pass,
        the target before ``a`` joining the prompt as the shared context (see the module docstring)."""
        firsts = [int(np.flatnonzero(m)[0]) for m in masks]
        target_lp: np.ndarray | None = None
        pending = list(range(len(masks)))
        while pending:
            lead = steps.next_chunk(pending, 1)[0] if steps is not None else pending[0]
            a = firsts[lead if lead in pending else pending[0]]
            group = [k for k in pending if firsts[k] == a]
            pending = [k for k in pending if firsts[k] != a]
            framed = SaliencyInputs(
                prompt_ids=[*inputs.prompt_ids, *inputs.target_ids[:a]],
                target_ids=inputs.target_ids[a:],
                foil_ids=inputs.foil_ids,
            )
            if a and target_lp is None:  # the log-probs of every target token, as without a frame
                whole = SaliencyInputs(inputs.prompt_ids, inputs.target_ids)
                with torch.no_grad():
                    leaf = self.embed([*inputs.prompt_ids, *inputs.target_ids]).unsqueeze(0)
                    target_lp = self._log_probs(leaf, whole)[0].cpu().numpy().astype(np.float32)
            framed_steps = None if steps is None else _GroupSteps(steps, group)
            for result in self._saliency_batch(
                framed, masks[group][:, a:], methods, ig_steps, cancelled, framed_steps
            ):
                if a:
                    assert target_lp is not None
                    result.target_token_logprobs = target_lp.copy()
                result.selection = group[result.selection]
                yield result

    def saliency_many(
        self,
        items: Sequence[tuple[SaliencyInputs, Sequence[bool]]],
        methods: Sequence[int],
        *,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        """Saliency for one selection of each of several problems, as one padded batch.

        One forward and one backward pass for all of them (cross-request batching). Rows are
        padded on the right and masked: a causal model never attends to the right, and each
        row keeps its own positions 0..n-1, so every result equals a separate call's to float
        tolerance. Gradient methods only, no foil. Results come in item order
        (``selection`` = the item's index).
        """
        if any(m not in GRADIENT_METHODS for m in methods) or any(i.foil_ids is not None for i, _ in items):
            raise ValueError("saliency_many computes the gradient methods of problems without a foil")
        for inputs, mask in items:
            if len(mask) != len(inputs.target_ids) or not any(mask):
                raise ValueError("each mask must have one bool per target token and select at least one")
        with self._driven(steps):
            yield from self._saliency_many(items, methods, cancelled, steps)

    def _saliency_many(
        self,
        items: Sequence[tuple[SaliencyInputs, Sequence[bool]]],
        methods: Sequence[int],
        cancelled: CancelCheck | None,
        steps: Steps | None,
    ) -> Iterator[SaliencyResult]:
        checkpoint = _checkpointer(cancelled, steps)
        checkpoint()
        rows = [list(inputs.prompt_ids) + list(inputs.target_ids) for inputs, _ in items]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)
        attention = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, device=self.device)
            attention[b, : len(row)] = 1
        with torch.no_grad():
            embeds = self.embeddings(ids)
        leaf = embeds.clone().requires_grad_(True)
        # the positions that predict some row's target tokens: one range for the whole batch
        first = min(len(inputs.prompt_ids) for inputs, _ in items) - 1
        last = width - 1
        positions = torch.arange(first, last, device=self.device)
        kwargs: dict[str, Any] = {"inputs_embeds": leaf, "attention_mask": attention, "use_cache": False}
        with torch.enable_grad():
            if self._supports_logits_to_keep:
                logits = self.model(**kwargs, logits_to_keep=positions).logits
            else:
                logits = self.model(**kwargs).logits[:, positions]
            token_lp = token_logprobs(logits, ids[:, first + 1 : last + 1], chunk=self.logprob_chunk)
        weights = torch.zeros_like(token_lp)
        for b, (inputs, mask) in enumerate(items):
            start = len(inputs.prompt_ids) - 1 - first
            weights[b, start : start + len(mask)] = torch.tensor(list(mask), dtype=weights.dtype)
        checkpoint()
        (grads,) = torch.autograd.grad(token_lp, leaf, grad_outputs=weights)
        lp = token_lp.detach().cpu().numpy().astype(np.float32)
        for b, (inputs, mask) in enumerate(items):
            n = len(rows[b])
            n_prompt, n_target = len(inputs.prompt_ids), len(inputs.target_ids)
            selected = np.asarray(mask, dtype=bool)
            row_grads, row_embeds = grads[b, :n].float(), embeds[b, :n].float()
            limit = n_prompt + int(np.flatnonzero(selected)[-1])
            scores: dict[int, np.ndarray] = {}
            for method in methods:
                if method == common_pb2.GRAD_L2:
                    values = row_grads.norm(dim=-1).cpu().numpy().astype(np.float32)
                else:
                    values = (row_grads * row_embeds).sum(-1).cpu().numpy().astype(np.float32)
                values[limit:] = 0.0
                scores[method] = values
            start = n_prompt - 1 - first
            target_lp = lp[b, start : start + n_target].copy()
            yield SaliencyResult(
                scores=scores,
                target_token_logprobs=target_lp,
                target_logprob=float(target_lp[selected].astype(np.float64).sum()),
                selection=b,
            )

    @contextmanager
    def _driven(self, steps: Steps | None) -> Iterator[None]:
        """One computation per engine at a time unless a scheduler decides (autograd graphs are
        large); the layer checkpoints of this thread report to ``steps`` meanwhile."""
        with self._lock if steps is None else nullcontext():
            previous = getattr(_current, "steps", None)
            _current.steps = steps
            try:
                yield
            finally:
                _current.steps = previous

    def score_rows(
        self,
        rows: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        batch_tokens: int = 8192,
        cancelled: CancelCheck | None = None,
        steps: Steps | None = None,
    ) -> list[np.ndarray]:
        """Teacher-forced log-probs of many (prompt, target) rows in batched no-grad passes
        (:func:`server_kit.teacher_forcing.score_rows`), with a step boundary before every batch and
        the layer checkpoints inside each: the perturbation methods' fallback without an
        inference server, scheduled like any other computation."""
        with self._driven(steps):
            return score_rows(
                self.model,
                rows,
                batch_tokens=batch_tokens,
                pad_id=self.pad_id,
                between=_checkpointer(cancelled, steps),
            )

    def probe(self) -> None:
        """A two-token forward pass: raises if the model (or its device) no longer works."""
        with torch.no_grad():
            ids = torch.tensor([[self.pad_id, self.pad_id]], device=self.device)
            logits = self.model(input_ids=ids, use_cache=False).logits
            if not torch.isfinite(logits).all():
                raise RuntimeError("the model produces non-finite logits")

    def _saliency_batch(
        self,
        inputs: SaliencyInputs,
        masks: np.ndarray,
        methods: Sequence[int],
        ig_steps: int,
        cancelled: CancelCheck | None,
        steps: Steps | None = None,
    ) -> Iterator[SaliencyResult]:
        checkpoint = _checkpointer(cancelled, steps)
        checkpoint()
        rows, n_prompt = self._layout(inputs)
        total = inputs.total_tokens
        n_target = len(inputs.target_ids)
        full_embeds = self.embed(rows[0])
        leaf_embeds = full_embeds[:n_prompt] if inputs.foil_ids is not None else full_embeds
        want_grad = any(m in GRADIENT_METHODS for m in methods)
        weights = self._objective_weights(inputs, masks)
        # Tokens at or after the last selected position get 0 (prompt only with a foil).
        last_selected = np.array([n_prompt + int(np.flatnonzero(m)[-1]) for m in masks])
        limit = np.full(len(masks), n_prompt) if inputs.foil_ids is not None else last_selected

        if want_grad:
            leaf, outputs, token_lp = self._gradient_forward(inputs, leaf_embeds, len(masks))
        else:
            with torch.no_grad():
                outputs = self._log_probs(leaf_embeds.unsqueeze(0), inputs)
            leaf, token_lp = leaf_embeds.unsqueeze(0), outputs[0].cpu().numpy().astype(np.float32)
        checkpoint()

        ig_scores: np.ndarray | None = None
        ig_residuals: np.ndarray | None = None
        if common_pb2.INTEGRATED_GRADIENTS in methods:
            ig_scores, ig_residuals = self._integrated_gradients(
                inputs, leaf_embeds, weights, outputs.detach(), ig_steps, checkpoint
            )

        embeds32 = leaf_embeds.float()
        remaining = list(range(len(masks)))
        while remaining:
            grads = None
            if want_grad:
                checkpoint()  # before choosing the chunk: what is urgent may change while paused
            if steps is None:
                chunk = remaining[: self.segment_batch_size]
            else:
                chunk = [k for k in steps.next_chunk(remaining, self.segment_batch_size) if k in remaining]
                chunk = chunk or remaining[:1]
            remaining = [k for k in remaining if k not in chunk]
            if want_grad:
                grads = self._vjp(outputs, leaf, weights[chunk])[:, 0].float()  # (k, T_leaf, D)
            for offset, k in enumerate(chunk):
                scores: dict[int, np.ndarray] = {}
                for method in methods:
                    values = np.zeros(total, dtype=np.float32)
                    if method == common_pb2.GRAD_L2:
                        assert grads is not None
                        values[: leaf.shape[1]] = grads[offset].norm(dim=-1).cpu().numpy()
                    elif method == common_pb2.GRAD_DOT_INPUT:
                        assert grads is not None
                        values[: leaf.shape[1]] = (grads[offset] * embeds32).sum(-1).cpu().numpy()
                    elif method == common_pb2.INTEGRATED_GRADIENTS:
                        assert ig_scores is not None
                        values[: leaf.shape[1]] = ig_scores[k]
                    values[limit[k] :] = 0.0
                    scores[method] = values
                selected_lp = float(token_lp[:n_target][masks[k]].astype(np.float64).sum())
                foil_lp = (
                    float(token_lp[n_target:].astype(np.float64).sum())
                    if inputs.foil_ids is not None
                    else None
                )
                yield SaliencyResult(
                    scores=scores,
                    target_token_logprobs=token_lp[:n_target].copy(),
                    target_logprob=selected_lp,
                    foil_logprob=foil_lp,
                    ig_residual=None if ig_residuals is None else float(ig_residuals[k]),
                    ig_steps=ig_steps if ig_scores is not None else 0,
                    selection=k,
                )

    def _gradient_forward(
        self, inputs: SaliencyInputs, leaf_embeds: torch.Tensor, n_selections: int
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The leaf, per-token log-probs (with their graph) and their values for a gradient pass:
        the forward cache's when it holds this problem's, else a new forward (kept when it may be)."""
        key = (tuple(inputs.prompt_ids), tuple(inputs.target_ids), _ids_or_none(inputs.foil_ids))
        held = self.forward_cache.get(key)
        if held is not None:
            self.last_checkpointing = held.mode  # type: ignore[assignment]
            return held.leaf, held.outputs, held.token_lp
        rows = 2 if inputs.foil_ids is not None else 1
        chunk = self.segment_batch_size if self._batched_vjp_ok else 1
        passes = -(-n_selections // chunk)
        if self.forward_cache.enabled and n_selections > 1:
            # a response's segments (SaliencyAllSegments): another granularity of the same response
            # is likely next, so the pass is checkpointed in a way it can be backpropagated again
            passes = max(passes, 2)
        mode = self._checkpoint(inputs, rows, n_selections, passes)
        leaf = leaf_embeds.unsqueeze(0).clone().requires_grad_(True)
        saved = SavedBytes(self.model)
        with torch.enable_grad(), saved.counting() if self.forward_cache.keeps(mode) else nullcontext():
            outputs = self._log_probs(leaf, inputs, checkpoint=mode)
        token_lp = outputs[0].detach().cpu().numpy().astype(np.float32)
        if self.forward_cache.keeps(mode):
            nbytes = saved.nbytes + (self._layer_inputs_bytes(inputs, rows) if mode == "full" else 0)
            self.forward_cache.put(key, HeldForward(leaf, outputs, token_lp, mode, nbytes))
        return leaf, outputs, token_lp

    def _layer_inputs_bytes(self, inputs: SaliencyInputs, rows: int) -> int:
        """What a fully checkpointed pass keeps outside autograd's saved tensors: each layer's input."""
        dims = model_dims(self.model.config)
        width = len(inputs.prompt_ids) + max(len(inputs.target_ids), len(inputs.foil_ids or ()))
        element = torch.empty((), dtype=self.dtype).element_size()
        return dims.layers * rows * width * dims.hidden * element

    def _integrated_gradients(
        self,
        inputs: SaliencyInputs,
        embeds: torch.Tensor,
        weights: torch.Tensor,
        outputs_at_input: torch.Tensor,
        steps: int,
        checkpoint: Callable[[], None],
    ) -> tuple[np.ndarray, np.ndarray]:
        """IG with a zero baseline for K objectives; returns scores ``(K, T_leaf)`` and residuals ``(K,)``."""
        alphas, quad_weights = ig_schedule(steps, self.ig_power, self.device)
        total_grad = torch.zeros(weights.shape[0], *embeds.shape, dtype=torch.float32, device=self.device)
        for start in range(0, steps, self.ig_batch_size):
            checkpoint()
            batch_alphas = alphas[start : start + self.ig_batch_size]
            batch_weights = quad_weights[start : start + self.ig_batch_size]
            scale = batch_alphas.view(-1, 1, 1).to(self.dtype)
            leaf = (embeds.unsqueeze(0) * scale).detach().requires_grad_(True)
            rows = len(batch_alphas) * (2 if inputs.foil_ids is not None else 1)
            with torch.enable_grad():
                passes = 1 if self._batched_vjp_ok or weights.shape[0] == 1 else weights.shape[0]
                mode = self._checkpoint(inputs, rows, weights.shape[0], passes)
                outputs = self._log_probs(leaf, inputs, checkpoint=mode)
                grads = self._vjp(outputs, leaf, weights)  # (K, B, T, D)
            total_grad += (grads.float() * batch_weights.view(1, -1, 1, 1)).sum(dim=1)
        scores = (total_grad * embeds.float().unsqueeze(0)).sum(-1)  # (K, T)
        with torch.no_grad():
            zero = torch.zeros_like(embeds).unsqueeze(0)
            baseline_out = self._log_probs(zero, inputs)
        objective_x = (weights * outputs_at_input.float()).sum(-1)  # (K,)
        objective_0 = (weights * baseline_out.float()).sum(-1)
        residual = (scores.sum(-1) - (objective_x - objective_0)).abs()
        return scores.cpu().numpy(), residual.cpu().numpy()
