"""The JSON every benchmark writes: device, jax version, date and the rows (BENCHMARKS.md reads
them back)."""

from __future__ import annotations

import datetime
import json
import os

import jax


def write_results(path: str, rows: list[dict], **extra) -> dict:
    """Writes {device, jax, date, rows, **extra} to `path` (folders created) and returns it."""
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.date.today().isoformat(), "rows": rows, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result
