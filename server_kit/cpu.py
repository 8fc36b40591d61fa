"""What the host CPU offers for bfloat16 (fast bf16 matmuls need AVX512-BF16 or AMX)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_support() -> dict[str, bool | str]:
    """Which bf16 instructions the CPU has, and torch's CPU capability (e.g. ``AVX512``)."""
    import torch

    flags = cpu_flags()
    support: dict[str, bool | str] = {flag: flag in flags for flag in BF16_FLAGS}
    support["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    return support


def cpu_has_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX), so bf16 on CPU is worth it."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)
