"""docs/architecture.md names only modules that exist (so the drawing of the request path stays true)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"


def test_every_module_the_architecture_names_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    named = set(
        re.findall(r"\b((?:seqsal|saliency_server|inference_server|ui|proto)/[\w/]+\.(?:py|proto))", text)
    )
    bare = set(re.findall(r"\(((?:validation|memory|checkpointing|logprobs|params)\.py)\)", text))
    assert len(named) >= 25, named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    for name in bare:  # short names in parentheses are siblings of the line's module
        assert any(REPO.glob(f"*/{name}")), name
