"""Test-wide setup: the repository root on sys.path, deterministic CPU runs."""

import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# CPU computations run on the thread that calls them, not on XLA's CPU thread pool (one
# thread per core: 2 in CI). The Mosaic GPU interpreter runs each warpgroup of a kernel as
# its own computation, and they wait on each other's barriers inside host callbacks; with
# async dispatch two of them blocked in those waits held both pool threads while the other
# three waited for a pool thread, and a full local run hung there twice
# (test_interpret_mode_schedules_match_reference, four consumers). Set before any backend
# exists (the client reads it when it is created).
jax.config.update("jax_cpu_enable_async_dispatch", False)
