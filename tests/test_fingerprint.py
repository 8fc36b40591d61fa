"""The model revision (server_kit/fingerprint.py): a full content hash, remembered per file version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from server_kit.fingerprint import model_revision


def test_revision_follows_content_not_place_and_is_remembered(tiny_llama_dir: Path, tmp_path: Path) -> None:
    memo = tmp_path / "fingerprints.json"
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    first = model_revision(copy, memo=memo)
    assert model_revision(tiny_llama_dir, memo=memo) == first  # a copy elsewhere: the same model
    remembered = json.loads(memo.read_text())
    weights = str((copy / "model.safetensors").resolve())
    assert remembered[weights]["sha256"] and len(remembered[weights]["stat"]) == 5

    # one byte in the middle of the weights: same size, same header, same first and last blocks
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    changed = model_revision(copy, memo=memo)
    assert changed != first
    assert json.loads(memo.read_text())[weights]["sha256"] != remembered[weights]["sha256"]

    # a remembered hash is used only while the file's stat signature is unchanged
    remembered = json.loads(memo.read_text())
    remembered[weights]["sha256"] = "00" * 32
    memo.write_text(json.dumps(remembered))
    assert model_revision(copy, memo=memo) != changed  # same signature: the memo is trusted
    fresh = copy / "model.safetensors.new"
    fresh.write_bytes(bytes(data))
    fresh.replace(copy / "model.safetensors")  # put in place as tools do: another inode
    assert model_revision(copy, memo=memo) == changed  # hashed again
