"""Log-probabilities of given next tokens from logits, a chunk of positions at a time.

``log_softmax(logits).gather(ids)`` materialises a second ``(rows, positions, vocab)``
tensor (and, for half-precision models, a float32 copy of the logits) and keeps it for the
backward. ``logits.gather(ids) - logsumexp(logits)`` is the same number and keeps only the
(float) logits; in chunks of positions, the float32 upcast of a bf16 model's logits exists
for one chunk at a time outside autograd. The engine only ever asks for the logits of the
predicted positions (``logits_to_keep``), never of every prompt position.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # half-precision logits are upcast; float32 and float64 keep their precision
    values = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(values, dim=-1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """``log softmax(logits)[..., ids]``: ``logits (B, N, V)``, ``ids (B, N)`` → ``(B, N)``.

    float32 (float64 for float64 logits), computed ``chunk`` positions at a time.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    upcast = logits.dtype not in (torch.float32, torch.float64)
    recompute = upcast and logits.requires_grad and torch.is_grad_enabled()

    def part(start: int) -> torch.Tensor:
        args = (logits[:, start : start + chunk], ids[:, start : start + chunk])
        if recompute:  # keep the half-precision slice, not its float32 copy, for the backward
            return checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        return _chunk_logprobs(*args)

    n = logits.shape[1]
    if n <= chunk:
        return part(0)
    return torch.cat([part(start) for start in range(0, n, chunk)], dim=1)
