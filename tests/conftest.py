"""Test-wide setup: the repository root on sys.path, deterministic CPU runs."""

import os
import sys

# XLA's CPU client runs computations on a pool of PJRT_NPROC threads (default: one per core,
# 2 in CI). The Mosaic GPU interpreter runs each warpgroup of a kernel (up to five) as its
# own computation, and they wait on each other's barriers inside host callbacks, which XLA
# may run on pool threads: two warpgroups blocked there held both threads while the others
# waited for one, and full local runs hung in test_attention_mgpu.py (sessions 11 and 12).
# With PJRT_NPROC=1 the schedule cases hang every time; with 16 they ran as fast as with 2.
# 8 leaves room above the 5 warpgroups without oversubscribing the 2 cores as much (a
# 2048^2 matmul ran 7% slower at 16).
# Set before jax creates its CPU client.
os.environ.setdefault("PJRT_NPROC", "8")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
