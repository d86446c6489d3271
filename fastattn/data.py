"""Training data: documents packed into fixed-length rows, and a deterministic batch order.

Packing puts several documents in one row of length T, so no compute is spent on padding;
segment ids keep attention inside each document and positions restart per document:

    row:          [ a0 a1 a2 a3 | b0 b1 b2 | c0 c1 | pad pad ]
    segment_ids:  [  1  1  1  1 |  2  2  2 |  3  3 |   0   0 ]
    positions:    [  0  1  2  3 |  0  1  2 |  0  1 |   0   0 ]
    targets:      [ a1 a2 a3  - | b1 b2  - | c1  - |   -   - ]   ("-": weight 0)

Targets never cross a document boundary. A per-token weight lets a task train only on part of
each document (the answer of a prompt/answer pair, say).

The batch for step i is a pure function of (seed, i): rows are visited in a fresh permutation
per epoch, drawn from the seed and the epoch number. Resuming at step k therefore continues the
exact data order of an uninterrupted run, with no iterator state to checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of packed rows, all int32 [B, T] except `weights` (float32 [B, T])."""

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class PackedDataset:
    """Rows of packed documents (arrays [R, T], fields as in `Batch`)."""

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_target_tokens(self) -> int:
        return int(np.count_nonzero(self.weights))

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The rows of training step `step` (see the module docstring for the order)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        first = step * batch_size
        index = np.arange(first, first + batch_size)
        epochs, offsets = np.divmod(index, self.num_rows)
        rows = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            order = np.random.default_rng([seed, int(epoch)]).permutation(self.num_rows)
            rows[epochs == epoch] = order[offsets[epochs == epoch]]
        return self._take(rows)

    def batches(self, batch_size: int):
        """All rows in order, in batches of `batch_size` (the last one may be smaller): for
        evaluation."""
        for start in range(0, self.num_rows, batch_size):
            yield self._take(np.arange(start, min(start + batch_size, self.num_rows)))

    def _take(self, rows) -> Batch:
        return Batch(*(getattr(self, f.name)[rows] for f in dataclasses.fields(Batch)))


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, *,
                   weights: Sequence[Sequence[float]] | None = None,
                   pad_id: int = 0) -> PackedDataset:
    """Packs token-id documents into rows of `seq_len` in their given order.

    A document goes into the current row if it fits, else it starts a new row; a document
    longer than `seq_len` is cut into pieces of `seq_len` (each trained as its own segment).
    `weights[d][t]` weighs the loss of predicting token t + 1 of document d from token t
    (default 1 everywhere; the last token of a document has nothing to predict).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a token and its successor)")
    if weights is not None and len(weights) != len(documents):
        raise ValueError(f"len(weights)={len(weights)} must equal len(documents)={len(documents)}")
    pieces = []  # (tokens, weights) with len <= seq_len
    for d, doc in enumerate(documents):
        doc = np.asarray(doc, np.int64)
        w = np.ones(len(doc), np.float32) if weights is None else np.asarray(weights[d], np.float32)
        if w.shape != doc.shape:
            raise ValueError(f"weights[{d}] has {w.shape[0]} entries for a document of "
                             f"{doc.shape[0]} tokens")
        if doc.size and (doc.min() < 0):
            raise ValueError(f"documents[{d}] holds a negative token id {int(doc.min())}")
        for start in range(0, len(doc), seq_len):
            if len(doc[start:start + seq_len]) >= 2:  # one token alone predicts nothing
                pieces.append((doc[start:start + seq_len], w[start:start + seq_len]))
    if not pieces:
        raise ValueError("no document has two or more tokens: nothing to train on")

    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for piece in pieces:
        if used + len(piece[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])

    R = len(rows)
    out = {name: np.zeros((R, seq_len), np.int32) for name in
           ("tokens", "targets", "positions", "segment_ids")}
    out["tokens"][:] = pad_id
    out["weights"] = np.zeros((R, seq_len), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for segment, (toks, w) in enumerate(row, start=1):
            n = len(toks)
            out["tokens"][r, at:at + n] = toks
            out["targets"][r, at:at + n - 1] = toks[1:]
            out["weights"][r, at:at + n - 1] = w[:-1]
            out["positions"][r, at:at + n] = np.arange(n)
            out["segment_ids"][r, at:at + n] = segment
            at += n
    return PackedDataset(**out)
