"""Training checkpoints through orbax's CheckpointManager: atomic, asynchronous, keep-N.

Each step is one directory `<directory>/<step>/` holding the train state (arrays) and a JSON
record (the metrics history, the config that produced it). orbax writes a step into a temporary
directory and renames it when every file is on disk, so a crash mid-save leaves the previous
steps intact and the half-written one is never restored (RELIABILITY 16).

Saves run in a background thread while training goes on. An error in that thread is raised at
the next `save` or at `close` (RELIABILITY 18) — `close` must therefore be called (the training
loop does it in a `finally`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores (state pytree, JSON metadata) pairs by step number."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 (checkpoints kept on disk)")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest committed step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving `state` and `meta` as `step` (returns once the arrays are copied off
        the device; files are written in the background). Raises the error of an earlier
        background save that failed."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """The state saved at `step`, with the structure, dtypes and shardings of `like` (a
        pytree of arrays or jax.ShapeDtypeStruct), and its metadata."""
        abstract = jax.tree.map(_abstract, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        """Blocks until background saves finish; raises the error of one that failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves (raising a failure) and releases the manager."""
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
