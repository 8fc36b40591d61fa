"""Segment scores: the sums of their tokens' scores, per method.

Apart from :mod:`seqsal.segmentation` (which makes segments and needs RE2) because the client
needs it too: it restores the segments of a ``tokens_once`` SaliencyAllSegments stream from the
first message's (:class:`seqsal.client.WholeMessages`), exactly as the server computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from seqsal.v1 import common_pb2

__all__ = ["with_scores"]


def with_scores(
    segments: Sequence[common_pb2.Segment], token_scores: Sequence[Sequence[float]]
) -> list[common_pb2.Segment]:
    """Copies of ``segments`` whose ``scores`` hold, per method, the sum of their token scores.

    ``token_scores`` has one score list per method, each indexed like the token list the
    segments came from. Sums are taken in float64 (``math.fsum``) before the proto's float32.
    """
    n_tokens = len(token_scores[0]) if token_scores else 0
    if any(len(scores) != n_tokens for scores in token_scores):
        raise ValueError(f"token score lists differ in length: {[len(s) for s in token_scores]}")
    rows = [[float(x) for x in scores] for scores in token_scores]
    out: list[common_pb2.Segment] = []
    for segment in segments:
        if token_scores and not 0 <= segment.token_start < segment.token_end <= n_tokens:
            raise ValueError(
                f"segment [{segment.token_start}, {segment.token_end}) is out of range for {n_tokens} tokens"
            )
        copy = common_pb2.Segment()
        copy.CopyFrom(segment)
        del copy.scores[:]
        copy.scores.extend(math.fsum(row[segment.token_start : segment.token_end]) for row in rows)
        out.append(copy)
    return out
