"""Generate the Python gRPC stubs in ``seqsal/v1`` from ``proto/seqsal/v1``.

``python -m seqsal.protogen`` rewrites the stubs; ``--check`` exits non-zero
when the committed stubs differ from what the protos generate (the test suite
runs it). The stubs are never edited by hand.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE_DIR = Path("seqsal") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto files of the contract, relative to ``proto/``."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` and return the generated files, relative to it."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency, imported only here

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(
        p.relative_to(out_root)
        for p in (out_root / PACKAGE_DIR).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def stale_files() -> list[str]:
    """Generated files that are missing, different or left over in the repository."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp)))
        committed = {
            p.relative_to(REPO_ROOT)
            for p in (REPO_ROOT / PACKAGE_DIR).iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        stale = [str(p) for p in sorted(committed - fresh)]
        for rel in sorted(fresh):
            target = REPO_ROOT / rel
            if not target.exists() or not filecmp.cmp(Path(tmp) / rel, target, shallow=False):
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        stale = stale_files()
        if stale:
            print("stale generated stubs (run `make proto`):", *stale, sep="\n  ")
            return 1
        print("generated stubs are up to date")
        return 0
    for p in (REPO_ROOT / PACKAGE_DIR).iterdir():
        if p.name.endswith(GENERATED_SUFFIXES):
            p.unlink()
    for rel in generate(REPO_ROOT):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
