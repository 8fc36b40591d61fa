"""Teacher-forced log-probs of many (prompt ids, target ids) rows in batched no-grad passes.

The one batched scorer on transformers, shared by the inference server's transformers backend
(its ``Score`` RPC) and the saliency server's perturbation fallback (no inference server). Rows
are sorted by length and grouped into batches of at most ``batch_tokens`` tokens (rows x padded
width), padded on the right with an attention mask: a causal model never attends to the right
and each row keeps its own positions 0..n-1, so every row's log-probs equal a separate pass's to
float tolerance. Only the positions that predict some row's target tokens get logits
(``logits_to_keep``), so a long prompt costs no ``(width, vocab)`` tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Row = tuple[Sequence[int], Sequence[int]]


def _batches(rows: Sequence[Row], batch_tokens: int, logit_rows: int) -> list[list[int]]:
    """Row indices grouped by length (shortest first): each group at most ``batch_tokens`` padded
    tokens and at most ``logit_rows`` (row, predicting position) pairs, the logits it holds."""
    lengths = [len(p) + len(t) for p, t in rows]
    order = sorted(range(len(rows)), key=lambda i: (lengths[i], len(rows[i][0])))
    groups: list[list[int]] = []
    for index in order:
        if groups:
            group = [*groups[-1], index]
            width = lengths[index]  # sorted: the widest of its group
            span = width - min(len(rows[i][0]) for i in group) + 1
            if len(group) * width <= batch_tokens and len(group) * span <= logit_rows:
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


def supports_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def score_rows(
    model: Any,
    rows: Sequence[Row],
    *,
    batch_tokens: int = 8192,
    logit_rows: int = 2048,
    pad_id: int = 0,
    between: Callable[[], None] | None = None,
) -> list[np.ndarray]:
    """``log p(target_t | prompt, target_<t)`` (float32) for every token of every row, in row order.

    ``between`` is called before every batch (a scheduler checkpoint; it may block, or raise to
    stop). Each row needs a non-empty prompt and a non-empty target. ``logit_rows`` bounds the
    logits a batch holds (that many times the vocabulary, in float32).
    """
    if any(not prompt or not target for prompt, target in rows):
        raise ValueError("every row needs a non-empty prompt and target")
    device = next(model.parameters()).device
    keep = supports_logits_to_keep(model)
    lengths = [len(p) + len(t) for p, t in rows]
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(rows)
    for group in _batches(rows, batch_tokens, logit_rows):
        if between is not None:
            between()
        width = max(lengths[i] for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long, device=device)
        attention = torch.zeros(len(group), width, dtype=torch.long, device=device)
        for b, i in enumerate(group):
            prompt, target = rows[i]
            ids[b, : lengths[i]] = torch.tensor([*prompt, *target], device=device)
            attention[b, : lengths[i]] = 1
        first = min(len(rows[i][0]) for i in group) - 1  # the first position predicting a target token
        positions = torch.arange(first, width - 1, device=device)
        with torch.no_grad():
            if keep:
                output = model(
                    input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=positions
                )
                values = output.logits
            else:
                values = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, positions]
            values = values.float()
            next_ids = ids[:, first + 1 : width]
            lp = values.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(values, dim=-1)
        lp_np = lp.cpu().numpy().astype(np.float32)
        for b, i in enumerate(group):
            prompt, target = rows[i]
            start = len(prompt) - 1 - first
            out[i] = lp_np[b, start : start + len(target)].copy()
    return out
