"""Forward passes kept between calls, so that a second explanation of the same problem skips its forward.

A user who has precomputed a response's sentences and then switches to words (or clicks a custom
selection) asks the engine for new backward passes over *the same* teacher-forced sequence: the
forward pass, and the autograd graph it leaves, are identical. :class:`ForwardCache` keeps the
graph of the latest forward passes of one engine (by default at most one and ``1 GiB``), keyed by
the problem's token ids, and hands it to the next computation of the same ids, which only runs its
backward passes.

What it keeps and for how long:

- only graphs that may be backpropagated again: plain passes and fully checkpointed ones (the
  ``keep_attention`` mode's saved attention outputs are freed by the first backward, so those
  passes are never kept);
- their size is measured, not guessed: the saved tensors autograd packs during the forward
  (:class:`SavedBytes`, weights excluded) plus, for checkpointed passes, each decoder layer's
  input; a graph larger than the cache's byte limit is not kept;
- least recently used first out, and every entry expires ``ttl_s`` after its last use;
- the scheduler counts the held bytes against the server's memory budget and asks the cache to
  let go (:meth:`ForwardCache.release`) before it would refuse or delay a computation for them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class HeldForward:
    """One forward pass and its graph: the embeddings leaf, the per-token log-probs, their values."""

    leaf: torch.Tensor
    outputs: torch.Tensor
    token_lp: np.ndarray
    mode: str
    nbytes: int


class SavedBytes:
    """Counts the bytes of the tensors autograd saves for the backward while it is active.

    Storages are counted once (views share them) and the model's weights, which the graph
    references but does not own, are left out.
    """

    def __init__(self, model: Any) -> None:
        self._exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.nbytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._exclude and pointer not in self._seen:
            self._seen.add(pointer)
            self.nbytes += storage.nbytes()
        return tensor

    @contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


class ForwardCache:
    """A bounded, expiring LRU of :class:`HeldForward` per problem key. Thread-safe.

    ``max_bytes <= 0`` or ``max_entries <= 0`` turns it off (nothing is kept).
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        max_entries: int = 1,
        ttl_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[HeldForward, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_entries > 0

    def keeps(self, mode: str) -> bool:
        """Whether a pass checkpointed this way could be kept at all."""
        return self.enabled and mode in ("off", "full")

    def get(self, key: Hashable) -> HeldForward | None:
        """The held forward of ``key`` (now the most recently used), or None."""
        with self._lock:
            self._expire()
            found = self._entries.pop(key, None)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries[key] = (found[0], self._clock())
            return found[0]

    def put(self, key: Hashable, entry: HeldForward) -> bool:
        """Keep ``entry`` (evicting the least recently used to make room); False if it cannot be kept."""
        if not self.keeps(entry.mode) or entry.nbytes > self.max_bytes:
            return False
        with self._lock:
            self._entries.pop(key, None)
            self._expire()
            while self._entries and (
                len(self._entries) >= self.max_entries or self._held() + entry.nbytes > self.max_bytes
            ):
                self._entries.popitem(last=False)
            self._entries[key] = (entry, self._clock())
            return True

    def release(self) -> int:
        """Let go of everything held; returns the bytes released (freed once no computation uses them)."""
        with self._lock:
            freed = self._held()
            self._entries.clear()
            return freed

    def bytes_held(self) -> int:
        with self._lock:
            self._expire()
            return self._held()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _held(self) -> int:
        return sum(entry.nbytes for entry, _ in self._entries.values())

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (_, used) in self._entries.items() if now - used > self.ttl_s]:
            del self._entries[key]
