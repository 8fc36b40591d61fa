"""The revision of a model directory: a content hash of its files, computed once per file version.

The saliency cache key includes this revision, so results computed with one set of weights are
never served for another, even when new weights are written into the same directory under the
same model id (a fine-tune re-saved in place, a checkpoint copied over the old one).

Every file that defines the model (config, tokenizer, weights) is hashed in full with SHA-256:
a sampled hash (size plus first and last blocks) misses a fine-tune that changes only middle
layers, since safetensors files of the same shapes have the same size and header. Hashing in
full costs about a second per GB (SHA-256 with the CPU's SHA instructions, ~1.4 GB/s measured
here); to pay it once, each file's hash is remembered in a small JSON file (``fingerprints.json``
under ``$XDG_CACHE_HOME/seqsal``, or ``~/.cache/seqsal``) together with its stat signature:
size, modification and change times in nanoseconds, inode and device. Any rewrite, copy or
rename into place changes the change time (which no ordinary tool can set back), so a file
whose signature still matches is the file that was hashed; anything else is hashed again.
An unwritable memo only costs the rehash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("seqsal.fingerprint")

#: Files that define a model: config, tokenizer and weights.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".gguf", ".pt", ".pth")

_MEMO_LOCK = threading.Lock()


def memo_path() -> Path:
    """Where file hashes are remembered between runs."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "seqsal" / "fingerprints.json"


def model_files(path: Path) -> list[Path]:
    """The files of a model directory that the fingerprint covers, in a stable order."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)


def stat_signature(file: Path) -> list[int]:
    """What changes whenever a file's content may have: size, mtime, ctime (ns), inode, device."""
    st = file.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def directory_signature(path: Path) -> list[tuple[str, list[int]]]:
    """The stat signatures of a model directory's files (to notice files replaced while loading)."""
    return [(str(f.relative_to(path)), stat_signature(f)) for f in model_files(path)]


def file_sha256(file: Path) -> str:
    with file.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _load_memo(where: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(where.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_memo(where: Path, memo: dict[str, dict[str, object]]) -> None:
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where.parent, prefix=".fingerprints-")
        with os.fdopen(fd, "w") as fh:
            json.dump(memo, fh)
        os.replace(tmp, where)  # atomic: concurrent servers never read half a file
    except OSError as exc:
        logger.debug("cannot write the fingerprint memo %s: %s", where, exc)


def model_revision(path: Path, *, memo: Path | None = None) -> str:
    """A content fingerprint of a model directory (16 hex digits), stable across copies and hosts.

    SHA-256 over every model file's relative name and its own SHA-256; a file's hash is reused
    from the memo while its stat signature is unchanged.
    """
    where = memo or memo_path()
    with _MEMO_LOCK:
        known = _load_memo(where)
        changed = False
        digest = hashlib.sha256()
        for file in model_files(path):
            key = str(file.resolve())
            signature = stat_signature(file)
            entry = known.get(key)
            if (
                isinstance(entry, dict)
                and entry.get("stat") == signature
                and isinstance(entry.get("sha256"), str)
            ):
                file_hash = str(entry["sha256"])
            else:
                file_hash = file_sha256(file)
                # written to while hashing: not remembered (the loader notices and loads again)
                if stat_signature(file) == signature:
                    known[key] = {"stat": signature, "sha256": file_hash}
                    changed = True
            digest.update(str(file.relative_to(path)).encode())
            digest.update(bytes.fromhex(file_hash))
        if changed:
            _save_memo(where, {k: v for k, v in known.items() if Path(k).exists()})
    return digest.hexdigest()[:16]
