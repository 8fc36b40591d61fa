"""``python -m bench [ARGS]`` (what ``make bench BENCH_ARGS=...`` runs): the saliency benchmark.

See bench/bench_saliency.py and bench/README.md.
"""

import sys

from bench.bench_saliency import main

sys.exit(main())
