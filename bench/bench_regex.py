"""Custom-regex time, before (Python's ``re``) and after (RE2 through ``seqsal.segmentation``).

The issue's freeze: ``(a+)+$`` on ``n`` times ``a`` then ``b`` (and kin; ``(a+)+c`` makes RE2 scan
the whole text, where an end anchor lets it start from the end). Python's ``re`` backtracks
about ``2**n`` times while holding the interpreter lock; each ``re`` measurement runs in a
subprocess killed after ``--timeout`` seconds, so the blow-up is shown without hanging this
process. RE2 (``seqsal.segmentation.validate_regex``, what the servers and the UI use) is
timed in this process on the same texts and on much longer ones. Ratios are ``re`` / RE2
at the same ``n``, both taken in this run. Not collected by pytest; run from the repo root:

    .venv/bin/python bench/bench_regex.py                # n = 14..24 (re and RE2), 900..1,000,000 (RE2)
    .venv/bin/python bench/bench_regex.py --timeout 5 --json bench/results/regex.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqsal.segmentation import validate_regex

PATTERNS = [r"(a+)+$", r"(a|a)+$", r"(a|aa)+$", r"(a+)+c"]

_RE_CHILD = """
import re, sys, time
pattern, n = sys.argv[1], int(sys.argv[2])
text = "a" * n + "b"
compiled = re.compile(pattern)
t0 = time.perf_counter()
found = sum(1 for _ in compiled.finditer(text))
print(time.perf_counter() - t0, found)
"""


def time_re(pattern: str, n: int, timeout_s: float) -> float | None:
    """Seconds Python's ``re`` takes for every match of ``pattern``, or None past ``timeout_s``."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _RE_CHILD, pattern, str(n)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return None
    return float(out.stdout.split()[0])


def time_re2(pattern: str, n: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds for the same work with RE2 (the servers' compile function)."""
    compiled = validate_regex(pattern)
    text = "a" * n + "b"
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sum(1 for _ in compiled.finditer(text))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="14,16,18,20,22,24", help="n for both engines")
    parser.add_argument("--re2-sizes", default="900,10000,1000000", help="n for RE2 only")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a re run is killed")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, object]] = []
    print(f"python {platform.python_version()} on {platform.machine()}, re killed after {args.timeout:g} s")
    print(f"{'pattern':<12} {'n':>9} {'re (s)':>12} {'RE2 (s)':>12} {'re / RE2':>12}")
    for pattern in PATTERNS:
        gave_up = False
        for n in sizes:
            before = None if gave_up else time_re(pattern, n, args.timeout)
            gave_up = gave_up or before is None
            after = time_re2(pattern, n)
            ratio = f"{before / after:,.0f}x" if before is not None else f"> {args.timeout / after:,.0f}x"
            shown = f"{before:.4f}" if before is not None else f"> {args.timeout:g}"
            print(f"{pattern:<12} {n:>9} {shown:>12} {after:>12.6f} {ratio:>12}")
            rows.append(
                {"pattern": pattern, "n": n, "re_s": before, "re2_s": after, "timeout_s": args.timeout}
            )
        for n in (int(s) for s in args.re2_sizes.split(",")):
            after = time_re2(pattern, n, repeats=3)
            print(f"{pattern:<12} {n:>9} {'-':>12} {after:>12.6f} {'':>12}")
            rows.append({"pattern": pattern, "n": n, "re_s": None, "re2_s": after, "timeout_s": None})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
