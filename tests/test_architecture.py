"""docs/architecture.md names only modules that exist (so the drawing of the request path stays true)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"


def test_every_module_the_architecture_names_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    named = set(
        re.findall(
            r"\b((?:seqsal|server_kit|seqsal_cli|saliency_server|inference_server|ui|proto)/[\w/]+\.(?:py|proto))",
            text,
        )
    )
    bare = set(re.findall(r"\(((?:validation|memory|checkpointing|logprobs|params)\.py)\)", text))
    assert len(named) >= 25, named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    for name in bare:  # short names in parentheses are siblings of the line's module
        assert any(REPO.glob(f"*/{name}")), name


#: Who may import whom: each package only the ones under it (the contract and client at the bottom).
LAYERS: dict[str, set[str]] = {
    "seqsal": set(),
    "server_kit": {"seqsal"},
    "saliency_server": {"seqsal", "server_kit"},
    "inference_server": {"seqsal", "server_kit"},
    "ui": {"seqsal"},
    "seqsal_cli": {"seqsal", "server_kit", "saliency_server", "inference_server"},
}


def _imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in a file, those inside functions included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_packages_import_only_the_layers_under_them() -> None:
    wrong = []
    for package, allowed in LAYERS.items():
        for path in sorted((REPO / package).rglob("*.py")):
            if "v1" in path.relative_to(REPO / package).parts:
                continue  # generated stubs
            for name in _imported_packages(path) & (set(LAYERS) - allowed - {package}):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "imports against the layers of docs/architecture.md:\n" + "\n".join(wrong)
